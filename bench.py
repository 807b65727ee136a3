"""Benchmark of the weighted-DPO step on the tiny model: this project's loop against a naive one.

    ours:  every pair tokenised once (data.RecordDataset), chosen and rejected rows in ONE policy
           forward; reference log-probs precomputed once
    naive: the processor encodes the pairs in every step, separate policy forwards for chosen and
           for rejected, and two reference forwards (adapter disabled, no grad) in every step

The median time of each part of a step is printed too: batch (collate or encode), forward (+ loss),
backward, optimizer.

Each variant runs in its own process (so peak memory is its own) over the same pairs, and the ratio
is printed. Peak memory: CUDA's max_memory_allocated on a GPU, the process's max RSS on a CPU.

    python bench.py                      # CPU, batch 16, 30 timed steps
    python bench.py --device cuda --batch-size 32
    python bench.py study                # the synthetic benchmark: every objective x 3 seeds -> out/study/
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def setup(args):
    import data
    import lora
    import synthetic
    images, qa = synthetic.make_synthetic(64, 0, args.image_size)
    corpus = [f"{q['question']}\nAnswer: {q['answer']}" for q in qa] + [im["report"] for im in images]
    torch.manual_seed(0)
    model, processor = synthetic.build_tiny(corpus, args.image_size)
    model.to(args.device)
    lora.add_lora(model, r=8, alpha=16)
    pil = {im["image_id"]: data.to_pil(im["pixels"]) for im in images}
    noised = {im["image_id"]: data.to_pil(im["pixels"][::-1].copy()) for im in images}  # any other image
    pairs = [{"image": q["image_id"], "rejected_image": None if i % 2 else "n" + q["image_id"], "prompt": q["question"],
              "chosen": q["answer"], "rejected": "no" if q["answer"] == "yes" else "yes"} for i, q in enumerate(qa)]
    load = lambda key: noised[key[1:]] if key.startswith("n") else pil[key]
    return model, processor, pairs, load


def run_variant(args):
    import data
    import lora
    from mmedpo import mmedpo_loss
    from data import forward_logps
    from train import to_device
    model, processor, pairs, load = setup(args)
    device, B = torch.device(args.device), args.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    dataset = data.RecordDataset(pairs, processor, load)          # every pair tokenised once, then kept
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    ref = None
    if args.variant == "ours":  # the one-time reference pass, outside the timed steps (as in train.py)
        with torch.no_grad(), lora.disable_lora(model):
            ref = torch.cat([forward_logps(model, to_device(data.collate_records([dataset[j] for j in range(i, min(i + B, len(pairs)))],
                                                                                processor.tokenizer.pad_token_id),
                                                            device, torch.float32)).view(2, -1).T
                             for i in range(0, len(pairs), B)])
    times, parts = [], {"batch": [], "forward": [], "backward": [], "optimizer": []}
    model.train()
    for step in range(args.warmup + args.steps):
        idx = [(step * B + j) % len(pairs) for j in range(B)]
        sync()
        t0 = time.perf_counter()
        if args.variant == "ours":
            batch = to_device(data.collate_records([dataset[j] for j in idx], processor.tokenizer.pad_token_id), device, torch.float32)
            t1 = time.perf_counter()
            logps = forward_logps(model, batch).view(2, -1).T
            pc, pr, rc, rr = logps[:, 0], logps[:, 1], ref[idx, 0].to(device), ref[idx, 1].to(device)
        else:  # encode every step; chosen and rejected apart; the reference inside the step
            rows = [(load(data.record_rows(pairs[j])[r][0]), pairs[j]["prompt"], data.record_rows(pairs[j])[r][1])
                    for r in (0, 1) for j in idx]
            chosen = to_device(data.encode_rows(processor, rows[:B]), device, torch.float32)
            rejected = to_device(data.encode_rows(processor, rows[B:]), device, torch.float32)
            t1 = time.perf_counter()
            pc, pr = forward_logps(model, chosen), forward_logps(model, rejected)
            with torch.no_grad(), lora.disable_lora(model):
                rc, rr = forward_logps(model, chosen), forward_logps(model, rejected)
        losses, _, _ = mmedpo_loss(pc, pr, rc, rr, torch.ones(B, device=device))
        sync()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        sync()
        t3 = time.perf_counter()
        opt.step()
        sync()
        t4 = time.perf_counter()
        if step >= args.warmup:
            times.append(t4 - t0)
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name].append(dt)
    ms = statistics.median(times) * 1000
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"variant": args.variant, "ms_per_step": ms, "pairs_per_s": B / ms * 1000, "peak_mb": peak,
                      **{f"{k}_ms": statistics.median(v) * 1000 for k, v in parts.items()}}))


def main():
    if sys.argv[1:2] == ["study"]:
        return study_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variant", choices=["ours", "naive"], default=None, help="run one variant (used internally)")
    args = ap.parse_args()
    if args.variant:
        return run_variant(args)
    results = {}
    for variant in ("ours", "naive"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"DPO step, tiny LLaVA, batch {args.batch_size} pairs, {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'':8s} {'ms/step':>9s} {'pairs/s':>9s} {'peak MB':>9s} | median ms of: batch, forward(+loss), backward, optimizer")
    for v, r in results.items():
        print(f"{v:8s} {r['ms_per_step']:9.1f} {r['pairs_per_s']:9.1f} {r['peak_mb']:9.0f} | {r['batch_ms']:6.1f} "
              f"{r['forward_ms']:6.1f} {r['backward_ms']:6.1f} {r['optimizer_ms']:6.1f}")
    print(f"speed-up of ours over naive: {results['naive']['ms_per_step'] / results['ours']['ms_per_step']:.2f}x")


# -----------------------------------------------------------------------------
# the study: every objective and ablation on the synthetic benchmark, several seeds, one table

STUDY_ROWS = [  # (name, train.py flags); every row also gets --seed and its own --run-name
    ("SFT on the chosen answers (control)", ["--objective", "sft"]),
    ("DPO (text pairs, weights 1)", ["--objective", "dpo"]),
    ("MMedPO, text pairs only", ["--strategies", "text"]),
    ("MMedPO, visual pairs only", ["--strategies", "visual"]),
    ("MMedPO (text + visual)", []),
    ("MMedPO without CRS weights", ["--weighting", "none"]),
    ("MMedPO, global noise", ["--noise", "global"]),
    ("MMedPO, 3 judges in consensus", ["--judge", "rule:lenient", "--judge", "rule", "--judge", "rule:strict"]),
    ("MMedPO + NLL of the chosen answer", ["--nll-weight", "1"]),
    ("HSCR", ["--objective", "hscr"]),
    ("FiRe-MPO", ["--objective", "fire"]),
]
STUDY_METRICS = [  # (column, how to read it from one evaluation, higher is better)
    ("halluc", lambda m: m["prior_breaking"]["hallucination_rate"], False),
    ("pb-acc", lambda m: m["prior_breaking"]["accuracy_breaking"], True),
    ("prior-acc", lambda m: m["prior_breaking"]["accuracy_following"], True),
    ("closed", lambda m: m["closed"], True),
    ("open", lambda m: m["open"], True),
    ("BLEU", lambda m: 100 * m["bleu_mean"], True),
    ("ROUGE-L", lambda m: 100 * m["rouge_l"], True),
    ("CHAIR", lambda m: m["report_findings"]["chair"], False),
    ("omitted", lambda m: m["report_findings"]["omission"], False),
]
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def paired_ci(xs, ys):
    """Mean of the paired differences xs - ys and its 95 % t-interval (half-width; inf for one seed)."""
    m, sd = mean_sd([x - y for x, y in zip(xs, ys)])
    return m, T_975[len(xs)] * sd / len(xs) ** 0.5 if len(xs) in T_975 else float("inf")


def run_study_row(out, seed, index, flags, log_path):
    """One train.py run in this process (its output to log_path), reused when its flags are unchanged."""
    import contextlib
    import train
    run_dir = os.path.join(out, f"seed{seed}", f"row{index}")
    key_path, key = os.path.join(run_dir, "study_key.json"), {"flags": flags, "seed": seed}
    if os.path.exists(key_path) and os.path.exists(os.path.join(run_dir, "metrics.json")):
        with open(key_path) as f:
            if json.load(f) == key:
                with open(os.path.join(run_dir, "metrics.json")) as g:
                    return json.load(g), True
    os.makedirs(run_dir, exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        train.main(["--out", os.path.join(out, f"seed{seed}"), "--run-name", f"row{index}", "--seed", str(seed)] + flags)
    with open(key_path, "w") as f:
        json.dump(key, f)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f), False


def study_tables(rows, results, seeds):
    """Markdown: every row's mean ± sd over seeds, then each row's paired difference from the base and
    from the SFT control with 95 % intervals."""
    names = ["base (before training)"] + [name for name, _ in rows]
    value = lambda r, s, read: read(results[(0, s)]["before"] if r == 0 else results[(r - 1, s)]["after"])
    lines = [f"Means ± standard deviations over seeds {', '.join(map(str, seeds))}.", "",
             "| run | " + " | ".join(c for c, _, _ in STUDY_METRICS) + " |",
             "|---|" + "---|" * len(STUDY_METRICS)]
    for r, name in enumerate(names):
        cells = [mean_sd([value(r, s, read) for s in seeds]) for _, read, _ in STUDY_METRICS]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" if abs(m) < 10 else f"{m:.2f} ± {sd:.2f}"
                                                for m, sd in cells) + " |")
    shown = [c for c in STUDY_METRICS if c[0] in ("halluc", "pb-acc", "prior-acc", "closed", "open", "BLEU", "CHAIR")]
    lines += ["", "Paired differences over seeds (mean [95 % interval]); **bold**: the interval excludes 0 in the "
              "better direction.", "",
              "| run | " + " | ".join(f"Δ{c} vs base" for c, _, _ in shown) + " | Δpb-acc vs SFT control |",
              "|---|" + "---|" * (len(shown) + 1)]
    fmt = lambda m, h, up: (f"**{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]**" if (m - h > 0 if up else m + h < 0)
                            else f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]")
    pb_read = STUDY_METRICS[1][1]
    for r in range(1, len(names)):
        cells = [fmt(*paired_ci([value(r, s, read) for s in seeds], [value(0, s, read) for s in seeds]), up)
                 for _, read, up in shown]
        cells.append(fmt(*paired_ci([value(r, s, pb_read) for s in seeds], [value(1, s, pb_read) for s in seeds]), True)
                     if r > 1 else "")
        lines.append(f"| {names[r]} | " + " | ".join(cells) + " |")
    return "\n".join(lines), names


def study_chart(names, results, seeds, path, width=980, bar=14):
    """Horizontal bars, one pair per run: hallucination rate (red) and accuracy on prior-breaking items
    (blue), mean over seeds with a line for ± one standard deviation."""
    from PIL import Image, ImageDraw
    reads = [("halluc", STUDY_METRICS[0][1], (200, 60, 60)), ("pb-acc", STUDY_METRICS[1][1], (60, 90, 200))]
    left, top, row_h = 290, 40, 2 * bar + 10
    img = Image.new("RGB", (width, top + row_h * len(names) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "prior-breaking test questions: hallucination rate (red) and accuracy (blue), mean ± sd", fill="black")
    scale = width - left - 40
    for r, name in enumerate(names):
        y = top + r * row_h
        d.text((10, y + bar // 2), name[:44], fill="black")
        for j, (_, read, colour) in enumerate(reads):
            vals = [read(results[(0, s)]["before"] if r == 0 else results[(r - 1, s)]["after"]) for s in seeds]
            m, sd = mean_sd(vals)
            y0 = y + j * bar
            d.rectangle([left, y0, left + scale * m, y0 + bar - 2], fill=colour)
            d.line([left + scale * max(0, m - sd), y0 + bar // 2, left + scale * min(1, m + sd), y0 + bar // 2], fill="black")
            d.text((left + scale * m + 6, y0), f"{m:.2f}", fill="black")
    for x in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([left + scale * x, top - 6, left + scale * x, top + row_h * len(names)], fill=(210, 210, 210))
        d.text((left + scale * x - 8, top + row_h * len(names) + 6), f"{x:.2f}", fill="black")
    img.save(path)


def study_main(argv):
    ap = argparse.ArgumentParser(description="the synthetic benchmark study: every objective and ablation over seeds")
    ap.add_argument("--out", default="out/study", help="runs go to OUT/seedS/rowI; reused when their flags are unchanged")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [STUDY_ROWS[int(i)] for i in args.rows.split(",")] if args.rows else STUDY_ROWS
    os.makedirs(args.out, exist_ok=True)
    results, t0 = {}, time.time()
    for seed in seeds:
        for i, (name, flags) in enumerate(rows):
            t = time.time()
            log_path = os.path.join(args.out, f"seed{seed}-row{i}.log")
            results[(i, seed)], reused = run_study_row(args.out, seed, i, flags, log_path)
            h = results[(i, seed)]["after"]["prior_breaking"]
            print(f"seed {seed} | {name:38s} | halluc {h['hallucination_rate']:.3f} | pb-acc {h['accuracy_breaking']:.3f}"
                  f" | {'reused' if reused else f'{time.time() - t:.0f}s'} | log {log_path}", flush=True)
    table, names = study_tables(rows, results, seeds)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(table + "\n")
    study_chart(names, results, seeds, os.path.join(args.out, "study.png"))
    print("\n" + table + f"\n\nwritten to {args.out}/study.md and study.png in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
