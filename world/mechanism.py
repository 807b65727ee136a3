"""Does a method's own mechanism act on the data? Three readings printed by every run and kept in its
metrics.json (`mechanism`), so that a method is judged only where its mechanism did something:

    answer_change     whether the noise changes the target model's greedy answer on each visual pair
    visual_effect     what Strategy 2's noise does to the base: the drop of log P(y_w) from the clean to
                      the noised image, the greedy answers it changes, which findings the pairs are about
                      and whether the visual tool itself sees its finding fall
    gradient_shares   where the objective's first step goes, by the records' source and question type
    chosen_moves      how log P(chosen) moved on the training records, by the same groups (a fall while the
                      margin grows is likelihood displacement)

Tests:  python -m pytest -q tests/world/test_eval.py
"""
import random
from collections import Counter

import numpy as np
import torch

import data
from world.rule_judge import words


def visual_effect(records, ref, log=print):
    """Does Strategy 2's noise act on the base? The drop of log P(y_w) from the clean to the noised image,
    from the reference log-probs `ref` (N, 2) of the records, the share of greedy answers it changed, the
    findings the pairs ask about and, where the tool checked its own pairs, how far its probability fell.
    returns a dict of those numbers ({} without visual pairs)."""
    idx = [i for i, r in enumerate(records) if r["source"] == "visual"]
    if not idx:
        return {}
    drop = (ref[idx, 0] - ref[idx, 1]).numpy()
    changed = [records[i]["answer_changes"] for i in idx if "answer_changes" in records[i]]
    about = Counter(records[i].get("finding") or records[i].get("qtype") or "?" for i in idx)
    falls = np.array([records[i]["tool_fall"] for i in idx if records[i].get("tool_fall") is not None])
    out = {"pairs": len(idx), "median_drop": float(np.median(drop)), "mean_drop": float(drop.mean()),
           "share_above_1_nat": float(np.mean(drop > 1)), "answer_changed": float(np.mean(changed)) if changed else None,
           "about": dict(sorted(about.items())),
           "tool_fall_median": float(np.median(falls)) if len(falls) else None}
    log(f"      visual pairs: log P(y_w | x) - log P(y_w | x*) median {out['median_drop']:.3f}, mean "
        f"{out['mean_drop']:.3f} nats, {out['share_above_1_nat']:.0%} above 1 nat" +
        (f"; greedy answer changed by the noise on {out['answer_changed']:.0%}" if changed else ""))
    log(f"      visual pairs are about: {', '.join(f'{k} {v}' for k, v in out['about'].items())}" +
        (f"; the tool's probability of that finding falls by {out['tool_fall_median']:.3f} (median)" if len(falls) else ""))
    return out


def gradient_shares(model, loss_fn, load, records, args, per_group=16, batch_size=8, seed=0, log=print):
    """Where the objective's first step goes. For each group t (`group_of`), g_t is the gradient of the mean
    loss over up to `per_group` of its records (drawn with `seed`), scaled by the group's share of all
    records, so that g = sum_t g_t estimates the gradient of a uniform batch. share_t = <g_t, g> / |g|^2
    (the shares sum to 1; a negative one pulls against the step). Run with dropout off and the global
    generator untouched (forked), at the adapter's initial state. load(indices) -> (batch, ref, weights).
    returns {group: {"share", "norm", "n"}}."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault(group_of(r), []).append(i)
    rng, flat, was_training = random.Random(seed), {}, model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for name, members in sorted(groups.items()):
            idx = sorted(rng.sample(members, min(per_group, len(members))))
            g = [torch.zeros_like(p) for p in params]
            for k in range(0, len(idx), batch_size):
                batch, ref, weights = load(idx[k:k + batch_size])
                losses, _ = loss_fn(model, batch, ref, weights, args)
                for acc, part in zip(g, torch.autograd.grad(losses.sum() / len(idx), params, allow_unused=True)):
                    if part is not None:
                        acc += part.float()
            flat[name] = torch.cat([x.flatten() for x in g]) * (len(members) / len(records))
    model.train(was_training)
    total = sum(flat.values())
    norm2 = float(total @ total) or 1.0
    out = {name: {"share": float(v @ total) / norm2, "norm": float(v.norm()), "n": len(groups[name])}
           for name, v in flat.items()}
    log("      step 0's gradient by group (share of the step; records): " +
        ", ".join(f"{k} {v['share']:+.2f} ({v['n']})" for k, v in out.items()))
    return out


def chosen_moves(model, load, records, ref, responses, batch_size=16, log=print):
    """How log P(chosen) moved on the training records: the trained policy's against the reference's
    (`ref[:, 0]`), per group (`group_of`): mean change in nats and the share of records where it fell.
    load(indices) -> (batch, ref, weights); responses: the rows per record. returns {group: {...}}."""
    moved, was_training = torch.zeros(len(records)), model.training
    model.eval()
    with torch.no_grad():
        for k in range(0, len(records), batch_size):
            idx = list(range(k, min(k + batch_size, len(records))))
            batch, _, _ = load(idx)
            moved[idx] = data.response_logps(model, batch, responses, first=1)[1].sum(-1)[:, 0].float().cpu() - ref[idx, 0]
    model.train(was_training)
    out = {}
    for name in sorted({group_of(r) for r in records}):
        d = moved[[i for i, r in enumerate(records) if group_of(r) == name]]
        out[name] = {"mean": float(d.mean()), "fell": float((d < 0).float().mean()), "n": len(d)}
    log("      log P(chosen) after training minus before, by group (mean nats; share that fell): " +
        ", ".join(f"{k} {v['mean']:+.2f} ({v['fell']:.0%})" for k, v in out.items()))
    return out


def answer_change(model, processor, pairs, prompt_format, pad, max_new_tokens, log=print):
    """Does the noise act on the model? Greedy answers on the clean and on the noised image of every
    visual pair: each pair records `answer_changes`, and the share is printed."""
    if not pairs:
        return
    reader = data.model_image_reader(pad)
    clean = data.generate_answers(model, processor, [(reader(p["image"]), p["prompt"]) for p in pairs], prompt_format,
                             batch_size=128, max_new_tokens=max_new_tokens)
    noised = data.generate_answers(model, processor, [(reader(p["rejected_image"]), p["prompt"]) for p in pairs],
                              prompt_format, batch_size=128, max_new_tokens=max_new_tokens)
    for p, a, b in zip(pairs, clean, noised):
        p["answer_changes"] = words(a) != words(b)
    changed = sum(p["answer_changes"] for p in pairs)
    log(f"      the noise changes the target model's greedy answer on {changed} of {len(pairs)} visual pairs "
        f"({changed / len(pairs):.0%})")


def group_of(record):
    """A record's group for the readings below: its source and its question type (text/presence, ...)."""
    return f"{record['source']}/{record.get('qtype') or '?'}"
