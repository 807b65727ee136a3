"""The math of the objectives: token and sequence log-probs, clinical-score normalization, and one
loss per objective (MMedPO's weighted DPO, HSCR's multi-level loss, FiRe-MPO's three terms).

Pure tensor functions, torch only: copy this file into another project and it works. Every loss
returns per-example losses (the caller reduces, e.g. with .mean()) and the detached rewards it logs.

    sequence_logps(logits, labels)          log pi(y | x), the sum of token_logps over the response
    token_logps(logits, labels)             log pi(y_t | y_<t, x) per response token, and its mask
    normalize_scores(scores)                Z(.) of the paper (Sec. 3.3, App. B)
    mmedpo_loss(...)                        weighted DPO, paper Eq. 3
    hscr_step_scores(full, dropped, tokens) HSCR's logit shift and implicit reward per step (our reading)
    hscr_loss(...)                          HSCR's multi-level preference loss (our reading)
    fire_token_loss(...)                    FiRe-MPO's preference over the edited tokens only (our reading)
    fire_visual_loss(...)                   FiRe-MPO's clean-over-corrupted-image term (our reading)
    bidirectional_kl(...)                   FiRe-MPO's token-wise KL anchor to the reference (our reading)

Run its tests with:  python -m pytest -q tests/test_mmedpo.py tests/test_objectives.py
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
    _check_same_shape("mmedpo_loss", tensors + [weights])
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -weights.detach() * F.logsigmoid(logits)
    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


# -----------------------------------------------------------------------------
# HSCR (Hierarchical Self-Contrastive Rewarding, arXiv 2506.00805). The published summary gives no
# equations: what follows is our reading, and every free value (p, n, lambda) is ours, not the paper's.

def hscr_step_scores(full_logits, dropped_logits, tokens):
    """Per decoding step, how much the next-token distribution depends on the image.

        shift_t  = KL( pi(.|x, v, y<t) || pi(.|x, D_p(v), y<t) )
        reward_t = log pi(y_t|x, v, y<t) - log pi(y_t|x, D_p(v), y<t)

    full_logits, dropped_logits: (..., V) next-token logits with the full image and with a fraction
    of its tokens hidden (D_p); tokens: (...) long, the token emitted at each step.
    returns (shift (...), reward (...)) float32. The modality-coupled steps are those of largest shift.
    """
    if full_logits.shape != dropped_logits.shape or full_logits.shape[:-1] != tokens.shape:
        raise ValueError(f"expected two (..., V) logits and (...) tokens; got {tuple(full_logits.shape)}, "
                         f"{tuple(dropped_logits.shape)}, {tuple(tokens.shape)}")
    logp, logq = full_logits.float().log_softmax(-1), dropped_logits.float().log_softmax(-1)
    shift = (logp.exp() * (logp - logq)).sum(-1)
    index = tokens.long().unsqueeze(-1)
    reward = (logp.gather(-1, index) - logq.gather(-1, index)).squeeze(-1)
    return shift, reward


def hscr_loss(policy_w, policy_l1, policy_l2, ref_w, ref_l1, ref_l2, beta=0.1, lam=1.0, weights=None):
    """HSCR's multi-level preference loss, y_w > y_l1 > y_l2, per example (our reading).

        D(y) = log pi(y|x) - log ref(y|x)
        L = -log s(b(D_w - D_l1)) - log s(b(D_w - D_l2)) + lam * [-log s(b(D_l1 - D_l2))]

    two explicit terms (the preferred answer over each dispreferred one) and an implicit one (the
    less corrupted answer over the more corrupted). An optional per-example weight (MMedPO's clinical
    relevance) multiplies the whole loss and carries no gradient.

    all inputs: (B,) float tensors. returns (losses (B,), {"margin_w_l1", "margin_w_l2", "margin_l1_l2"}:
    the detached reward margins b*(D_a - D_b), for logging).
    """
    tensors = [policy_w, policy_l1, policy_l2, ref_w, ref_l1, ref_l2]
    _check_same_shape("hscr_loss", tensors)
    d_w, d_l1, d_l2 = policy_w - ref_w, policy_l1 - ref_l1, policy_l2 - ref_l2
    m_w1, m_w2, m_12 = beta * (d_w - d_l1), beta * (d_w - d_l2), beta * (d_l1 - d_l2)
    losses = -F.logsigmoid(m_w1) - F.logsigmoid(m_w2) - lam * F.logsigmoid(m_12)
    losses = _weights_like(weights, losses) * losses
    return losses, {"margin_w_l1": m_w1.detach(), "margin_w_l2": m_w2.detach(), "margin_l1_l2": m_12.detach()}


# -----------------------------------------------------------------------------
# FiRe-MPO (arXiv 2606.12590). The published abstract gives no equations: what follows is our reading;
# beta, lambda, gamma, eta are ours, not the paper's. Total: L = L_tok + gamma * L_vis + eta * L_KL.

def fire_token_loss(policy_w, ref_w, mask_w, policy_l, ref_l, mask_l, beta=0.1):
    """Token-level preference on minimal edits: only the edited tokens count.

        rho_t = log pi(y_t|.) - log ref(y_t|.)
        L_tok = -log s( beta * [ sum_t m_w,t rho_w,t - sum_t m_l,t rho_l,t ] )

    policy_*, ref_*: (B, T) per-token log-probs (0 off the response); mask_*: (B, T) 0/1, the tokens of
    y_w replaced or inserted by the edit, and those of y_l replaced or deleted.
    returns (losses (B,), margin (B,) detached)."""
    if not (policy_w.shape == ref_w.shape == mask_w.shape and policy_l.shape == ref_l.shape == mask_l.shape):
        raise ValueError(f"fire_token_loss: shapes differ: {[tuple(t.shape) for t in (policy_w, ref_w, mask_w)]} "
                         f"and {[tuple(t.shape) for t in (policy_l, ref_l, mask_l)]}")
    margin = beta * (((policy_w - ref_w) * mask_w).sum(-1) - ((policy_l - ref_l) * mask_l).sum(-1))
    return -F.logsigmoid(margin), margin.detach()


def fire_visual_loss(policy_clean, ref_clean, policy_corrupt, ref_corrupt, beta=0.1):
    """The same preferred answer under the clean image x is preferred to it under the lesion-corrupted
    image x*:  L_vis = -log s( beta * [D(y_w|x) - D(y_w|x*)] ),  D = log pi - log ref over the response.
    all inputs (B,). returns (losses (B,), margin (B,) detached)."""
    _check_same_shape("fire_visual_loss", [policy_clean, ref_clean, policy_corrupt, ref_corrupt])
    margin = beta * ((policy_clean - ref_clean) - (policy_corrupt - ref_corrupt))
    return -F.logsigmoid(margin), margin.detach()


def bidirectional_kl(policy_logits, ref_logits, mask, lam=0.5):
    """Token-wise KL anchor, both directions, on the full next-token distributions:

        L_KL = sum over the masked positions of [ lam * KL(ref || pi) + (1 - lam) * KL(pi || ref) ]

    summed, not averaged, over the response, as the authors' earlier RRPO sums its token-wise KL (a
    mean shrinks the term by the response length and left it inert).
    policy_logits, ref_logits: (B, T, V); mask: (B, T) 0/1 (the response positions). The reference
    carries no gradient. returns (B,) float32 (0 for a row with no masked position)."""
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != mask.shape:
        raise ValueError(f"bidirectional_kl: expected (B, T, V) logits and a (B, T) mask, got "
                         f"{tuple(policy_logits.shape)}, {tuple(ref_logits.shape)}, {tuple(mask.shape)}")
    logp = policy_logits.float().log_softmax(-1)
    logq = ref_logits.detach().float().log_softmax(-1)
    kl_ref_pi = (logq.exp() * (logq - logp)).sum(-1)           # (B, T)
    kl_pi_ref = (logp.exp() * (logp - logq)).sum(-1)
    mask = mask.float()
    per_token = lam * kl_ref_pi + (1 - lam) * kl_pi_ref
    return (per_token * mask).sum(-1)


# -----------------------------------------------------------------------------
# the losses' input checks

def _check_same_shape(name, tensors):
    shapes = [tuple(t.shape) for t in tensors]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1 or shapes[0][0] == 0:
        raise ValueError(f"{name}: expected {len(tensors)} non-empty (B,) tensors of one shape, got {shapes}")


def _weights_like(weights, like):
    """Per-example weights as a detached tensor like `like`; None means all 1."""
    if weights is None:
        return torch.ones_like(like)
    return torch.as_tensor(weights, dtype=like.dtype, device=like.device).detach()
