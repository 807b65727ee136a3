"""MMedPO's math: token and sequence log-probs, the clinical-score normalization Z(.), the weighted DPO
loss (paper Eq. 3), and the learning-rate schedule. HSCR's and FiRe-MPO's losses live with their
methods (lab/hscr.py, lab/fire.py).

Pure tensor functions, torch only: copy this file into another project and it works. Every loss
returns per-example losses (the caller reduces, e.g. with .mean()) and the detached rewards it logs.

    sequence_logps(logits, labels)          log pi(y | x), the sum of token_logps over the response
    token_logps(logits, labels)             log pi(y_t | y_<t, x) per response token, and its mask
    normalize_scores(scores)                Z(.) of the paper (Sec. 3.3, App. B)
    mmedpo_loss(...)                        weighted DPO, paper Eq. 3
    get_lr(step, max_lr, warmup, total)     linear warmup, then cosine decay

Run its tests with:  python -m pytest -q tests/method
"""
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value of prompt, image and padding positions


def sequence_logps(logits, labels):
    """Summed log-probability of the response tokens of each sequence: (B,) float32.

    The masked sum of `token_logps`; not length-normalized, as in DPO (Rafailov et al. 2023) and
    TRL's `sigmoid` loss. Shapes and conventions as in `token_logps` (below).
    """
    logps, _ = token_logps(logits, labels)
    return logps.sum(-1)


def token_logps(logits, labels):
    """Log-probability of every response token, and which positions are response tokens.

    logits: (B, T, V) any float dtype; upcast to float32 before log_softmax, because bf16
            log-probs summed over a long answer drift by whole nats.
    labels: (B, T) long; IGNORE_INDEX (-100) at prompt, image and padding positions.
    returns (logps (B, T-1) float32, mask (B, T-1) bool): logps[:, t] = log p(labels[:, t+1] | logits[:, t]),
    0 where mask is False.

    Position t predicts token t+1 (the one-token shift of causal LMs).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.dtype != torch.long:
        raise ValueError(f"labels must be torch.long, got {labels.dtype}")
    logits = logits[:, :-1, :].float()           # (B, T-1, V) predictions for positions 1..T-1
    targets = labels[:, 1:]                      # (B, T-1)
    mask = targets != IGNORE_INDEX
    safe_targets = targets.masked_fill(~mask, 0)  # any valid index; masked out below
    logps = torch.gather(logits.log_softmax(-1), 2, safe_targets.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def normalize_scores(scores, mu=1.0, var=0.1, lo=0.75, hi=1.25):
    """Z(.): map the clinical-relevance scores of one source to weights around 1.

        z  = (s - mean(s)) / std(s)
        s' = clip(mu + sqrt(var) * z, lo, hi)

    so that before clipping the weights have mean mu and variance var (population std,
    i.e. unbiased=False). Paper defaults (App. B): mu = 1, var = 0.1, clip to [0.75, 1.25].
    If every score is equal (std = 0) every weight is mu.

    scores: 1-D sequence or tensor of finite floats, at least one element.
    returns (N,) float32 tensor.
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D list of scores, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        bad = [i for i, ok in enumerate(torch.isfinite(s).tolist()) if not ok]
        raise ValueError(f"scores must be finite; positions {bad[:10]} are NaN or infinite")
    if var < 0 or lo > hi:
        raise ValueError(f"need var >= 0 and lo <= hi, got var={var}, lo={lo}, hi={hi}")
    std = s.std(unbiased=False)
    if std == 0:
        return torch.full_like(s, mu, dtype=torch.float32)
    z = (s - s.mean()) / std
    return (mu + math.sqrt(var) * z).clamp(lo, hi).float()


def mmedpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                weights, beta=0.1):
    """Weighted DPO loss of MMedPO (paper Eq. 3), per pair.

        L = mean_i [ -w_i * log sigmoid( beta * (log pi(y_w|x) - log ref(y_w|x))
                                        - beta * (log pi(y_l|x*) - log ref(y_l|x*)) ) ]

    x* is the noised image for visual pairs and x itself for text pairs; the caller puts the
    right log-probs in. The weight multiplies the whole per-pair loss (outside the log-sigmoid)
    and the paper's mean is a plain mean over the batch (the caller's .mean()), not divided by
    sum(w). Weights carry no gradient. With all weights 1 this is plain DPO.

    all inputs: (B,) float tensors. beta is the paper's alpha (0.1 by default).
    returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are
    beta * (log pi - log ref), detached, for logging.
    """
    tensors = [policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps]
    weights = torch.as_tensor(weights, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    check_same_shape("mmedpo_loss", tensors + [weights])
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -weights.detach() * F.logsigmoid(logits)
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


# -----------------------------------------------------------------------------
# the learning-rate schedule of every training loop (the preference step and the tiny base's SFT)

def get_lr(step, max_lr, warmup, total):
    """Linear warmup for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------
# the losses' input checks

def check_same_shape(name, tensors):
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1 or shapes[0][0] == 0:
        raise ValueError(f"{name}: expected {len(tensors)} non-empty (B,) tensors of one shape, got {shapes}")


def weights_like(weights, like):
    """Per-example weights as a detached tensor like `like`; None means all 1."""
    if weights is None:
        return torch.ones_like(like)
    return torch.as_tensor(weights, dtype=like.dtype, device=like.device).detach()

