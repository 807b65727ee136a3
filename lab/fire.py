"""FiRe-MPO (arXiv 2606.12590), whole: its records and its loss.

The loss is the authors' public code's (its loss module and trainer, which follow the paper's Eq. 3-5
and Appendix B); the records and the rounds are our reading. The policy answers a question; an editor
that knows the truth corrects only the wrong spans (the rule editor offline, an LLM with --editor, held
to the same checks); token masks from the diff mark the edited tokens, and every reward counts those
only: r(v, y) = sum over y's edited tokens of log pi(y_t | v, .) - log ref(y_t | v, .). Four rows per
record: (v, y_w), (v, y_l), (v*, y_w), (v*, y_l), v* the image with its lesion noised away.

    L = -log s(beta [r(v, y_w) - r(v, y_l)])                    the token-level preference
        + gamma * -log s(beta [r(v*, y_l) - r(v*, y_w)])        the visual pair (--fire-visual corrupted)
        + alpha * sum_t [lambda KL(ref || pi) + (1 - lambda) KL(pi || ref)]   on y_w's edited positions

Defaults as the authors': beta 0.1, gamma 0.1, alpha 0.01, lambda 0.5. Their ablations replace the
visual pair: v1 (v, y_w) > (v*, y_w), v2 (v, y_w) > (v*, y_l) (--fire-visual v1|v2). Rounds: the policy
answers anew from the adapter being trained; the reference stays the base model in every round.

    python train.py --objective fire

Tests:  python -m pytest -q tests/lab/test_fire.py tests/lab/test_lab_losses.py
"""
import difflib
import os
import random
import sys
from collections import Counter

import torch
import torch.nn.functional as F

import data
import lora
import score
from guard.checkpoint import write_jsonl
from world.rule_judge import edit_kind, polarity


def build_fire_pairs(model, processor, cfg, pool, store, pairs_dir, device, log=print, round_index=0):
    """FiRe-MPO's records: the current policy answers --n-text questions greedily (y_l); the editor
    corrects them (y_w, `score.edit_answers`); the token masks come from the diff; the clean image's
    lesion is noised for the visual term (x*, as in Strategy 2; global noise where the tool sees no
    lesion). Answers already right give no record; edits are counted as minimal or rewritten, and
    closed answers by the direction of the correction. returns (records, complete)."""
    items = random.Random(f"{cfg.seed}-{round_index}").sample(pool, min(cfg.n_text, len(pool)))
    log(f"FiRe-MPO round {round_index}: the policy answers {len(items)} questions; the editor corrects them")
    answers = data.generate_answers(model, processor, [(store.for_model(it["image_id"]), it["question"]) for it in items],
                                    cfg.prompt_format, batch_size=128, max_new_tokens=cfg.sample_max_new_tokens, log=log)
    editor = score.parse_judge(cfg.editor, "--editor") if cfg.editor else score.RuleJudge()
    cleaned = [score.clean_answer(a) or "" for a in answers]
    edits = score.edit_answers(items, cleaned, editor, os.path.join(pairs_dir, "edit_cache.jsonl"), cfg.workers, log)
    tool = data.heatmap_tool(cfg.heatmap, model, processor, cfg.prompt_format, store, device, cfg.seed, log)
    gen, records, counts = torch.Generator().manual_seed(cfg.seed + round_index), [], Counter()
    for it, answer, y_l, e in zip(items, answers, cleaned, edits):
        if not y_l and answer.strip():
            counts["leaked"] += 1
            continue
        if e["status"] != "edited":
            counts[e["status"]] += 1
            continue
        y_w = e["edited"]
        kind = edit_kind(y_l, y_w, it["answer"])
        counts[kind] += 1
        counts["rejected LLM edits"] += "rejected" in e["how"]
        direction = f"{polarity(y_l)}->{polarity(y_w)}" if polarity(y_l) and polarity(y_w) else "open"
        counts[direction] += 1
        m_w, m_l = edit_masks(data.response_ids(processor.tokenizer, y_w), data.response_ids(processor.tokenizer, y_l))
        x = torch.as_tensor(store.pixels(it["image_id"]))
        h, _ = tool(it)
        h = torch.ones_like(x) if h is None or cfg.noise == "global" or float(h.sum()) == 0 else h
        rid = f"fire-{it['id']}"
        corrupted, heatmap_path = data.write_noised(x, h, cfg.noise_step, gen, f"{rid}-r{round_index}", pairs_dir)
        records.append({"id": rid, "source": "fire", "image": store.path(it["image_id"]), "rejected_image": None,
                        "corrupted_image": corrupted, "heatmap": heatmap_path, "prompt": it["question"],
                        "chosen": y_w, "rejected": y_l, "edit_masks": [m_w, m_l, m_w, m_l], "edit": kind,
                        "direction": direction, "score": None, "weight": None, "qtype": it.get("qtype") or it["type"],
                        "provenance": f"round {round_index}, {e['how']}"})
    log(f"FiRe-MPO records: {len(records)} edited answers ({counts['minimal']} minimal edits, {counts['rewritten']} "
        f"rewritten; corrections no->yes {counts['no->yes']}, yes->no {counts['yes->no']}, open {counts['open']}); "
        f"{counts['right']} already right, {counts['leaked']} with leaked scaffolding, {counts['failed']} editor "
        f"failures, {counts['rejected LLM edits']} LLM edits rejected for the rule editor's")
    return records, counts["failed"] == 0


def train_in_rounds(run, model, processor, pref_qa, store, records, train):
    """FiRe-MPO's rounds (--policy-rounds): round 0 trains on the records built by the base model; each
    later round first answers anew with the adapter being trained, then trains on those edits (a fresh
    optimizer each round; the reference stays the base). Every round gets its share of --steps. A later
    round with fewer records than one global batch ends the run with the last adapter: finished work is
    reported, not lost. train(records, tag) -> (history, finished). returns (records, history, finished)."""
    n, history = run.args.policy_rounds, []
    global_batch = run.args.batch_size * run.args.grad_accum * run.world
    for r in range(n):
        if r > 0:
            fresh = next_round_records(run, model, processor, pref_qa, store, r)
            if len(fresh) < global_batch:
                run.log(f"      round {r + 1}: {len(fresh)} records, fewer than one global batch ({global_batch}): "
                        f"the run ends with round {r}'s adapter")
                break
            records = fresh
        round_history, finished = train(records, f"_round{r}" if n > 1 else "")
        history += round_history
        if not finished:
            break
    return records, history, finished


def next_round_records(run, model, processor, pref_qa, store, r):
    """FiRe-MPO round r > 0: the records built from the answers of the adapter being trained, written to
    RUN_NAME/fire_round{r}.jsonl (with their token masks) for a reader to see. returns the records."""
    path = run.path(f"fire_round{r}.jsonl")
    if run.master:
        run.log(f"[2/6] round {r + 1}/{run.args.policy_rounds}: new answers from the adapter -> {path}")
        try:
            records, _ = build_fire_pairs(model, processor, run.args, pref_qa, store, run.pairs_dir, run.device,
                                          run.log, round_index=r)
        except score.JudgeError as e:
            sys.exit(f"--editor: {e}")
        write_jsonl(path, records)
    run.barrier()
    records, _ = data.read_pairs(path, run.log)
    return data.assign_weights(records, "none")


def edit_masks(tokens_w, tokens_l):
    """FiRe-MPO's token masks from a diff of two token sequences (difflib.SequenceMatcher): m_w marks the
    tokens of y_w that the edit replaced or inserted, m_l those of y_l it replaced or deleted.
    ["left", "lung", "nodule"] -> ["right", "lung", "nodule"] gives [1, 0, 0] on both sides."""
    m_w, m_l = [0] * len(tokens_w), [0] * len(tokens_l)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, list(tokens_l), list(tokens_w), autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            m_l[i1:i2] = [1] * (i2 - i1)
        if tag in ("replace", "insert"):
            m_w[j1:j2] = [1] * (j2 - j1)
    return m_w, m_l


VISUAL_PAIRS = {  # --fire-visual: (the preferred row, the dispreferred row) of the visual pair, rows as above
    "corrupted": (3, 2),   # (v*, y_l) > (v*, y_w): on the corrupted image the corrected-away answer is preferred
    "v1": (0, 2),          # (v, y_w) > (v*, y_w)
    "v2": (0, 3),          # (v, y_w) > (v*, y_l)
}


def fire_objective_loss(model, batch, ref, weights, args):
    """FiRe-MPO on a batch of 4B rows ((v, y_w), (v, y_l), (v*, y_w), (v*, y_l); response-major). Every
    reward sums over the edited tokens only, so the reference runs here too, per token, with the adapter
    disabled and no grad (the cached full sums `ref` are not what the loss needs)."""
    start = data.response_start(batch)                                               # the same window for both
    logits, policy, response = data.response_logps(model, batch, 4, start=start)     # (B, 4, L, V), (B, 4, L-1)
    with torch.no_grad(), lora.disable_lora(model):
        ref_logits, ref_tok, _ = data.response_logps(model, batch, 4, start=start)
    edit = data.per_response(batch["edit_mask"][:, start + 1:].float(), 4)             # aligned with the labels' shift
    l_tok, m_tok = fire_token_loss(policy[:, 0], ref_tok[:, 0], edit[:, 0], policy[:, 1], ref_tok[:, 1], edit[:, 1],
                                   args.beta)
    good, bad = VISUAL_PAIRS[args.fire_visual]
    l_vis, m_vis = fire_token_loss(policy[:, good], ref_tok[:, good], edit[:, good], policy[:, bad], ref_tok[:, bad],
                                   edit[:, bad], args.beta)
    l_kl = bidirectional_kl(logits[:, 0, :-1], ref_logits[:, 0, :-1], edit[:, 0], args.fire_lambda)
    total = l_tok + args.fire_gamma * l_vis + args.fire_alpha * l_kl
    return weights * total, {"reward_acc": (m_tok > 0).float(), "margin": m_tok, "margin_vis": m_vis,
                             "l_tok": l_tok.detach(), "l_vis": l_vis.detach(), "l_kl": l_kl.detach(),
                             "kl_share": (args.fire_alpha * l_kl / total).detach()}


# -----------------------------------------------------------------------------
# FiRe-MPO's math


def fire_token_loss(policy_w, ref_w, mask_w, policy_l, ref_l, mask_l, beta=0.1):
    """One ranking term of FiRe-MPO: row w preferred to row l by their masked token rewards.

        rho_t = log pi(y_t|.) - log ref(y_t|.)
        L = -log s( beta * [ sum_t m_w,t rho_w,t - sum_t m_l,t rho_l,t ] )

    policy_*, ref_*: (B, T) per-token log-probs (0 off the response); mask_*: (B, T) 0/1, the edited tokens
    of each row's answer (y_w's replaced or inserted ones, y_l's replaced or deleted ones).
    returns (losses (B,), margin (B,) detached)."""
    if not (policy_w.shape == ref_w.shape == mask_w.shape and policy_l.shape == ref_l.shape == mask_l.shape):
        raise ValueError(f"fire_token_loss: shapes differ: {[tuple(t.shape) for t in (policy_w, ref_w, mask_w)]} "
                         f"and {[tuple(t.shape) for t in (policy_l, ref_l, mask_l)]}")
    margin = beta * (((policy_w - ref_w) * mask_w).sum(-1) - ((policy_l - ref_l) * mask_l).sum(-1))
    return -F.logsigmoid(margin), margin.detach()


def bidirectional_kl(policy_logits, ref_logits, mask, lam=0.5):
    """Token-wise KL anchor, both directions, on the full next-token distributions:

        L_KL = sum over the masked positions of [ lam * KL(ref || pi) + (1 - lam) * KL(pi || ref) ]

    summed, not averaged, over the masked positions (the chosen answer's edited tokens), as the authors'
    code does. policy_logits, ref_logits: (B, T, V); mask: (B, T) 0/1. The reference carries no gradient.
    returns (B,) float32 (0 for a row with no masked position)."""
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
