"""HSCR (Hierarchical Self-Contrastive Rewarding, arXiv 2506.00805), whole: its records and its loss.

The published summary gives no equations; this is our reading, and every free value (the two dropout
rates, the share of steps, lambda) is ours, not the paper's. Hide a fraction p of the image tokens
(D_p(v)); at each decoding step the reward r_t = log pi(y_t | v) - log pi(y_t | D_p(v)) says how much
the emitted token owes to the image. Dispreferred answers take the image-blind argmax instead, at two
levels of blindness (two dropout rates):
    y_l1  D_p(v), p = 0.7 (--hscr-p): the most image-coupled steps only, at most a share s = 0.34 of the
          greedy answer's steps (--hscr-share); the rest is decoded with the image
    y_l2  D_p2(v), p2 = 1.0 (--hscr-p2): every step whose blind argmax differs, the image-blind answer
The loss prefers y_w (the ground truth) over both and y_l1 over y_l2 (`hscr_loss`, below).

How y_l1's steps are chosen: the greedy answer's rewards fix a budget n = ceil(s * L) (L its steps, EOS
included) and a threshold (the n-th largest reward). y_l1 is then decoded anew and r_t is *re-scored
along the new trajectory*: a step is replaced while budget is left, its own reward reaches the
threshold and the blind argmax differs. Replacing by index would hit the wrong tokens once the text has
diverged. Measured on the default: once one step is replaced, D_0.7(v) and the full image agree on the
rest of the answer, so two budgets under D_0.7 alone gave equal levels on 370 of 371 triplets; the
second dropout rate is what makes the levels differ.

A yes/no answer has one content step, so its two levels cannot differ: HSCR builds its triplets on the
questions with a longer answer (where, what, reports), and counts the triplets whose levels coincide.

    python train.py --objective hscr

Tests:  python -m pytest -q tests/test_hscr.py
"""
import math
import random
import time

import torch
import torch.nn.functional as F

import data
from mmedpo import check_same_shape, weights_like
from world.rule_judge import polarity, words


def build_hscr_pairs(model, processor, cfg, pool, store, pairs_dir, device, log=print):
    """HSCR triplets for --n-text questions of the preference split whose answer is not a bare yes/no
    (weights 1). returns (triplets, True)."""
    longer = [it for it in pool if not polarity(it["answer"])]
    items = random.Random(cfg.seed).sample(longer, min(cfg.n_text, len(longer)))
    log(f"HSCR: contrastive decoding on {len(items)} questions with answers longer than yes/no "
        f"(y_l1: p={cfg.hscr_p}, at most {cfg.hscr_share} of the steps; y_l2: p={cfg.hscr_p2})")
    triplets = build_hscr_triplets(model, processor, items, store, cfg, log=log)
    return triplets, True


def build_hscr_triplets(model, processor, items, store, cfg, batch_size=64, log=print):
    """The triplets (y_w = ground truth, y_l1, y_l2) of `items`, with cfg's (train.py's flags) prompt
    format, dropout rates, share of steps, generation cap and seed. A triplet is dropped (and counted)
    when y_w coincides with y_l1 or y_l2: it holds no preference. One where y_l1 = y_l2 is kept and
    counted (its implicit term is a constant ln 2 and it trains as one pair counted twice).
    returns records {id, source: hscr, image, prompt, chosen, rejected, rejected2, ...}."""
    prompt_format, p, p2, share = cfg.prompt_format, cfg.hscr_p, cfg.hscr_p2, cfg.hscr_share
    max_new_tokens, seed = cfg.sample_max_new_tokens, cfg.seed
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    gen = torch.Generator().manual_seed(seed)
    triplets, same, one_level, replaced, t0 = [], 0, 0, [0, 0], time.time()
    last = t0
    was_training = model.training
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts, pixels = prompt_batch(processor, [(store.for_model(it["image_id"]), it["question"]) for it in chunk],
                                       prompt_format)
        # per level and row: the attention mask of its prompt under D_p(v), fixed for all its steps
        keep = [[visual_token_dropout(torch.ones(1, len(ids), dtype=torch.long), torch.tensor([ids]) == image_token_id,
                                      rate, gen)[0] for ids in prompts] for rate in (p, p2)]
        level1, level2 = (contrast_logits(model, prompts, pixels, k, tok.pad_token_id) for k in keep)
        n, eos = len(chunk), tok.eos_token_id
        greedy, rewards, _ = decode_levels(level1, n, [0] * n, [math.inf] * n, max_new_tokens, eos)
        plans = [level_plan(r, share) for r in rewards]
        y_l1, _, used1 = decode_levels(level1, n, [b for b, _ in plans], [t for _, t in plans], max_new_tokens, eos)
        y_l2, _, used2 = decode_levels(level2, n, [max_new_tokens] * n, [-math.inf] * n, max_new_tokens, eos)
        replaced = [replaced[0] + sum(used1), replaced[1] + sum(used2)]
        for it, y, y1, y2 in zip(chunk, greedy, y_l1, y_l2):
            y, y1, y2 = (tok.decode(a, skip_special_tokens=True).strip() for a in (y, y1, y2))
            chosen = y if words(y) == words(it["answer"]) else it["answer"]
            if words(chosen) in (words(y1), words(y2)):
                same += 1
                continue
            one_level += words(y1) == words(y2)
            triplets.append({"id": f"hscr-{it['id']}", "source": "hscr", "image": store.path(it["image_id"]),
                             "rejected_image": None, "prompt": it["question"], "chosen": chosen, "rejected": y1,
                             "rejected2": y2, "score": None, "weight": None, "qtype": it.get("qtype") or it["type"],
                             "provenance": f"HSCR decoding, greedy answer {y!r}, p={p}, share {share}, p2={p2}"})
        if log and time.time() - last >= 10 and start + len(chunk) < len(items):   # never silent for long
            done, last = start + len(chunk), time.time()
            rate = done / (last - t0)
            log(f"  HSCR {done}/{len(items)} | {rate:.1f} questions/s | ETA {(len(items) - done) / rate:.0f}s")
    model.train(was_training)
    log(f"HSCR triplets: {len(triplets)} of {len(items)} questions ({same} dropped: y_w equals a dispreferred answer); "
        f"levels equal (y_l1 = y_l2) in {one_level} ({one_level / max(1, len(triplets)):.0%}); steps replaced: "
        f"{replaced[0]} for y_l1, {replaced[1]} for y_l2")
    return triplets


def contrast_logits(model, prompts, pixels, blind_keep, pad_id):
    """next_logits(rows, prefixes) -> (full, dropped): the next-token logits (len(rows), V) of the rows'
    answer prefixes with the full image and with D_p(v) (blind_keep[i]: row i's prompt attention mask),
    in one forward of 2 * len(rows) right-padded sequences."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype

    def next_logits(rows, prefixes):
        seqs = [prompts[i] + prefix for i, prefix in zip(rows, prefixes)]
        ids = data.right_pad(seqs + seqs, pad_id)
        att = data.right_pad([[1] * len(s) for s in seqs + seqs], 0)
        for j, i in enumerate(rows):  # the dropped-image rows hide their image tokens
            att[len(rows) + j, :len(prompts[i])] = blind_keep[i]
        last = torch.tensor([len(s) - 1 for s in seqs] * 2, device=device)
        lo = int(last.min())                     # logits only for the positions some row's next token is read at
        inputs = dict(input_ids=ids.to(device), attention_mask=att.to(device), pixel_values=pixels[rows + rows].to(device, dtype))
        with torch.no_grad():
            if data.keeps_logits(model):
                logits = model(**inputs, logits_to_keep=torch.arange(lo, int(last.max()) + 1, device=device)).logits
            else:
                logits = model(**inputs).logits[:, lo:]
        out = logits[torch.arange(len(last), device=device), last - lo].float().cpu()
        return out[:len(rows)], out[len(rows):]
    return next_logits


def level_plan(rewards, share):
    """(budget, threshold) of y_l1 from the greedy answer's step rewards: the budget is ceil(share * L)
    steps, the threshold the budget-th largest reward. [0.1, 2.0, 0.5, 3.0] with share 0.5 -> (2, 2.0)."""
    order = sorted(rewards, reverse=True)
    budget = min(len(order), math.ceil(share * len(order)))
    return budget, (order[budget - 1] if budget else math.inf)


def decode_levels(next_logits, n_rows, budgets, thresholds, max_new_tokens, eos_id):
    """Greedy decoding of `n_rows` answers with the full image, where at each step of row i the image-
    blind argmax is emitted instead of the greedy token when row i has budget left, the step's reward
    r_t (of the greedy token, on the prefix decoded so far) reaches thresholds[i], and the two differ.

    next_logits(rows, prefixes) -> (full (len(rows), V), dropped (len(rows), V)): next-token logits of
    the given rows' answer prefixes (lists of token ids) with the full and the dropped image.
    returns (answers: token-id lists without EOS, rewards: per row r_t of every step taken (EOS step
    included), replaced: per row how many steps were replaced)."""
    answers, rewards, active = [[] for _ in range(n_rows)], [[] for _ in range(n_rows)], list(range(n_rows))
    budgets, replaced = list(budgets), [0] * n_rows
    for t in range(max_new_tokens):
        if not active:
            break
        full, dropped = next_logits(active, [answers[i] for i in active])
        greedy, blind = full.argmax(-1), dropped.argmax(-1)
        _, reward = hscr_step_scores(full, dropped, greedy)
        still = []
        for j, i in enumerate(active):
            token = int(greedy[j])
            if budgets[i] > 0 and float(reward[j]) >= thresholds[i] and int(blind[j]) != token:
                token, budgets[i], replaced[i] = int(blind[j]), budgets[i] - 1, replaced[i] + 1
            rewards[i].append(float(reward[j]))
            if token == eos_id:
                continue
            answers[i].append(token)
            still.append(i)
        active = still
    return answers, rewards, replaced


def visual_token_dropout(attention_mask, image_positions, p, generator=None):
    """D_p(v) of HSCR: hide a fraction p of each row's image-token positions from attention.

    attention_mask: (N, T) 0/1; image_positions: (N, T) bool. Exactly round(p * n_image) positions of
    each row, drawn with `generator`, are set to 0; text and padding positions are left as they are.
    returns a new (N, T) mask."""
    out = attention_mask.clone()
    for i in range(out.shape[0]):
        where = image_positions[i].nonzero().flatten()
        k = int(round(p * len(where)))
        if k:
            out[i, where[torch.randperm(len(where), generator=generator)[:k]]] = 0
    return out


def prompt_batch(processor, rows, prompt_format):
    """Encoded prompts (no response) of (PIL image, question) rows: input_ids as lists without padding,
    and pixel_values (N, 3, H, W)."""
    enc = processor(images=[im for im, _ in rows], text=[data.format_prompt(processor, prompt_format, q) for _, q in rows],
                    return_tensors="pt", padding=True)
    ids = [enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist() for i in range(len(rows))]
    return ids, enc["pixel_values"]


def hscr_objective_loss(model, batch, ref, weights, args):
    """HSCR's multi-level loss on a batch of 3B rows (y_w, y_l1, y_l2; response-major)."""
    policy = data.response_logps(model, batch, 3)[1].sum(-1)              # (B, 3): y_w, y_l1, y_l2
    losses, m = hscr_loss(policy[:, 0], policy[:, 1], policy[:, 2], ref[:, 0], ref[:, 1], ref[:, 2], args.beta,
                          args.hscr_lambda, weights)
    return losses, {"reward_acc": (m["margin_w_l1"] > 0).float(), "margin": m["margin_w_l1"],
                    "margin_w_l2": m["margin_w_l2"], "margin_l1_l2": m["margin_l1_l2"]}


# -----------------------------------------------------------------------------
# HSCR's math (our reading: the published summary gives no equations; p, the share and lambda are ours)


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
    check_same_shape("hscr_loss", tensors)
    d_w, d_l1, d_l2 = policy_w - ref_w, policy_l1 - ref_l1, policy_l2 - ref_l2
    m_w1, m_w2, m_12 = beta * (d_w - d_l1), beta * (d_w - d_l2), beta * (d_l1 - d_l2)
    losses = -F.logsigmoid(m_w1) - F.logsigmoid(m_w2) - lam * F.logsigmoid(m_12)
    losses = weights_like(weights, losses) * losses
    return losses, {"margin_w_l1": m_w1.detach(), "margin_w_l2": m_w2.detach(), "margin_l1_l2": m_12.detach()}
