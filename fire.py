"""FiRe-MPO (arXiv 2606.12590), whole: its records and its loss.

The published abstract gives no equations; this is our reading, and beta, gamma, eta, lambda are ours.
The policy answers a question; an editor that knows the truth corrects only the wrong spans (the rule
editor offline, an LLM with --editor, held to the same checks); token masks from the diff mark the
edited tokens. Three terms (`mmedpo.py`): L_tok, a DPO margin over the edited tokens only; L_vis, the
edited answer preferred under the clean image over the lesion-corrupted one; L_KL, a bidirectional
token-wise KL to the reference summed over the response (as the authors' earlier RRPO sums it).
L = L_tok + gamma L_vis + eta L_KL. Rounds: the policy answers anew from the adapter being trained;
the reference stays the base model in every round.

    python train.py --objective fire

Tests:  python -m pytest -q tests/test_fire.py
"""
import difflib
import os
import random
from collections import Counter

import torch

import data
import lora
import score
from mmedpo import bidirectional_kl, fire_token_loss, fire_visual_loss
from rule_judge import edit_kind, polarity


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
        h, _ = data.lesion_heatmap(it, store, tool, log)
        h = torch.ones_like(x) if h is None or cfg.noise == "global" or float(h.sum()) == 0 else h
        rid = f"fire-{it['id']}"
        corrupted, heatmap_path = data.write_noised(x, h, cfg.noise_step, gen, f"{rid}-r{round_index}", pairs_dir)
        records.append({"id": rid, "source": "fire", "image": store.path(it["image_id"]), "rejected_image": None,
                        "corrupted_image": corrupted, "heatmap": heatmap_path, "prompt": it["question"],
                        "chosen": y_w, "rejected": y_l, "mask_chosen": m_w, "mask_rejected": m_l, "edit": kind,
                        "direction": direction, "score": None, "weight": None,
                        "provenance": f"round {round_index}, {e['how']}"})
    log(f"FiRe-MPO records: {len(records)} edited answers ({counts['minimal']} minimal edits, {counts['rewritten']} "
        f"rewritten; corrections no->yes {counts['no->yes']}, yes->no {counts['yes->no']}, open {counts['open']}); "
        f"{counts['right']} already right, {counts['leaked']} with leaked scaffolding, {counts['failed']} editor "
        f"failures, {counts['rejected LLM edits']} LLM edits rejected for the rule editor's")
    return records, counts["failed"] == 0


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


def fire_objective_loss(model, batch, ref, weights, args):
    """FiRe-MPO on a batch of 3B rows (y_w on x, y_l on x, y_w on the corrupted x*; response-major):
    L_tok + gamma L_vis + eta L_KL. The token-level terms need the reference's per-token log-probs and
    full distributions, so the reference runs here, on the clean-image rows, with the adapter disabled
    and no grad; the cached sums `ref` (B, 3) serve L_vis exactly."""
    logits, policy, response = data.response_logps(model, batch, 3)                # (B, 3, T, V), (B, 3, T-1)
    with torch.no_grad(), lora.disable_lora(model):
        ref_logits, ref_tok, _ = data.response_logps(model, batch, 3, first=2)        # the clean-image rows
    edit = data.per_response(batch["edit_mask"][:, 1:].float(), 3)                     # aligned with the labels' shift
    l_tok, m_tok = fire_token_loss(policy[:, 0], ref_tok[:, 0], edit[:, 0], policy[:, 1], ref_tok[:, 1], edit[:, 1],
                                   args.beta)
    sums = policy.sum(-1)                                                               # (B, 3)
    l_vis, m_vis = fire_visual_loss(sums[:, 0], ref[:, 0], sums[:, 2], ref[:, 2], args.beta)
    l_kl = bidirectional_kl(logits[:, 0, :-1], ref_logits[:, 0, :-1], response[:, 0], args.fire_lambda)
    losses = weights * (l_tok + args.fire_gamma * l_vis + args.fire_eta * l_kl)
    return losses, {"reward_acc": (m_tok > 0).float(), "margin": m_tok, "margin_vis": m_vis,
                    "l_tok": l_tok.detach(), "l_vis": l_vis.detach(), "l_kl": l_kl.detach(),
                    "kl_share": (args.fire_eta * l_kl / (l_tok + args.fire_gamma * l_vis + args.fire_eta * l_kl)).detach()}
