"""Benchmark of the weighted-DPO step on the tiny model: this project's loop against a naive one.

    ours:  every pair tokenised once (data.RecordDataset), chosen and rejected rows in ONE policy
           forward; reference log-probs precomputed once
    naive: the processor encodes the pairs in every step, separate policy forwards for chosen and
           for rejected, and two reference forwards (adapter disabled, no grad) in every step

The median time of each part of a step is printed too: batch (collate or encode), forward (+ loss),
backward, optimizer.

Each variant runs in its own process (so peak memory is its own) over the same pairs, and the ratio
is printed. Peak memory: CUDA's max_memory_allocated on a GPU, the process's max RSS on a CPU.

    python -m lab.bench                  # CPU, batch 16, 30 timed steps
    python -m lab.bench --device cuda --batch-size 32
    python -m lab.bench study              # the synthetic benchmark: every row, 3 base models x 4 seeds -> out/study/
    python -m lab.bench sweep              # the validation runs behind each objective's learning rate
    python -m lab.bench shapes             # one DPO step at LLaVA-Med's vocabulary and lengths: full logits
                                           # against logits at the response positions only
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import data
import lora
import train
from guard import checkpoint
from mmedpo import mmedpo_loss
from train import record_loader, to_device
from world import synthetic
from world.eval import auroc, paired_change, t975
from world.flags import NONNEG_INT, POS_INT, number

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: assets/, train.py


def main():
    if sys.argv[1:2] == ["study"]:
        return study_main(sys.argv[2:])
    if sys.argv[1:2] == ["sweep"]:
        return sweep_main(sys.argv[2:])
    if sys.argv[1:2] == ["shapes"]:
        return shapes_main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=POS_INT, default=16)
    ap.add_argument("--image-size", type=number(int, 8), default=32)
    ap.add_argument("--steps", type=POS_INT, default=30)
    ap.add_argument("--warmup", type=NONNEG_INT, default=3)
    ap.add_argument("--variant", choices=["ours", "naive"], default=None, help="run one variant (used internally)")
    args = ap.parse_args()
    if args.variant:
        return run_variant(args)
    results = {}
    for variant in ("ours", "naive"):
        cmd = [sys.executable, "-m", "lab.bench", "--variant", variant] + sys.argv[1:]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:  # the child's own message, not a CalledProcessError
            sys.exit(f"lab.bench: the {variant} variant failed:\n{done.stderr[-2000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"DPO step, tiny LLaVA, batch {args.batch_size} pairs, {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'':8s} {'ms/step':>9s} {'pairs/s':>9s} {'peak MB':>9s} | median ms of: batch, forward(+loss), backward, optimizer")
    for v, r in results.items():
        print(f"{v:8s} {r['ms_per_step']:9.1f} {r['pairs_per_s']:9.1f} {r['peak_mb']:9.0f} | {r['batch_ms']:6.1f} "
              f"{r['forward_ms']:6.1f} {r['backward_ms']:6.1f} {r['optimizer_ms']:6.1f}")
    print(f"speed-up of ours over naive: {results['naive']['ms_per_step'] / results['ours']['ms_per_step']:.2f}x")


def run_variant(args):
    summed = lambda batch, k: data.response_logps(model, batch, k)[1].sum(-1)   # (B, k)
    model, processor, pairs, load = setup(args)
    device, B = torch.device(args.device), args.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    dataset = data.RecordDataset(pairs, processor, load)          # every pair tokenised once, then kept
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    ref = None
    if args.variant == "ours":  # the one-time reference pass, outside the timed steps (as in train.py)
        with torch.no_grad(), lora.disable_lora(model):
            ref = torch.cat([summed(to_device(data.collate_records([dataset[j] for j in range(i, min(i + B, len(pairs)))],
                                                                   processor.tokenizer.pad_token_id), device, torch.float32), 2)
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
            logps = summed(batch, 2)
            pc, pr, rc, rr = logps[:, 0], logps[:, 1], ref[idx, 0].to(device), ref[idx, 1].to(device)
        else:  # encode every step; chosen and rejected apart; the reference inside the step
            rows = [(load(data.record_rows(pairs[j])[r][0]), pairs[j]["prompt"], data.record_rows(pairs[j])[r][1])
                    for r in (0, 1) for j in idx]
            chosen = to_device(data.encode_rows(processor, rows[:B]), device, torch.float32)
            rejected = to_device(data.encode_rows(processor, rows[B:]), device, torch.float32)
            t1 = time.perf_counter()
            pc, pr = summed(chosen, 1)[:, 0], summed(rejected, 1)[:, 0]
            with torch.no_grad(), lora.disable_lora(model):
                rc, rr = summed(chosen, 1)[:, 0], summed(rejected, 1)[:, 0]
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


def setup(args):
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


# -----------------------------------------------------------------------------
# real shapes: LLaVA-Med v1.5's vocabulary (32,000), 576 image tokens and its prompt and answer lengths, at a
# width and depth this machine can run; one weighted-DPO step of 4 pairs with LoRA, two ways of scoring

def shapes_main(argv):
    """Each (answer length, variant) in its own process, alternated, `--repeats` times: peak memory (the
    process's max RSS above its level after building the model and batch; CUDA's max allocated on a GPU)
    and the median time of a step. full: logits at every position; window: only where a response token
    is scored (data.response_logps)."""
    ap = argparse.ArgumentParser(prog="python -m lab.bench shapes", description=shapes_main.__doc__.split(".")[0])
    ap.add_argument("--hidden", type=POS_INT, default=512)
    ap.add_argument("--layers", type=POS_INT, default=2)
    ap.add_argument("--answers", default="5,60,256", help="answer lengths in tokens (comma-separated)")
    ap.add_argument("--prompt-text", type=POS_INT, default=80, help="text tokens of the prompt besides the 576 image tokens")
    ap.add_argument("--pairs", type=POS_INT, default=4)
    ap.add_argument("--steps", type=POS_INT, default=2)
    ap.add_argument("--repeats", type=POS_INT, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=["full", "window"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--answer", type=POS_INT, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        answers = [int(a) for a in args.answers.split(",")]
        assert answers and min(answers) >= 1
    except (ValueError, AssertionError):
        ap.error(f"--answers {args.answers!r}: comma-separated whole numbers >= 1")
    if args.variant:
        return print(json.dumps(shapes_variant(args)))
    print(f"one weighted-DPO step, {args.pairs} pairs, LLaVA shapes: vocabulary 32,000, 576 image tokens, "
          f"{args.prompt_text} prompt text tokens; Llama {args.hidden} x {args.layers} layers, LoRA r 8 on q, v; "
          f"{args.device}, float32", flush=True)
    print(f"{'answer':>6s} {'variant':>7s} {'ms/step':>9s} {'peak MB':>9s} {'logits MB':>10s}", flush=True)
    results = {}
    for _ in range(args.repeats):
        for answer in answers:
            for variant in ("full", "window"):
                cmd = [sys.executable, "-m", "lab.bench", "shapes", "--variant", variant, "--answer", str(answer)] + argv
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    sys.exit(f"lab.bench shapes: the {variant} variant failed:\n{done.stderr[-2000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((answer, variant), []).append(r)
                print(f"{answer:6d} {variant:>7s} {r['ms_per_step']:9.0f} {r['peak_mb']:9.0f} {r['logits_mb']:10.1f}", flush=True)
    print("\nratios (full / window), medians over repeats:")
    med = lambda a, v, k: statistics.median(r[k] for r in results[(a, v)])
    for answer in answers:
        print(f"  answer {answer:3d} tokens: time {med(answer, 'full', 'ms_per_step') / med(answer, 'window', 'ms_per_step'):.2f}x, "
              f"peak memory {med(answer, 'full', 'peak_mb') / max(1.0, med(answer, 'window', 'peak_mb')):.2f}x "
              f"({med(answer, 'full', 'peak_mb'):.0f} MB against {med(answer, 'window', 'peak_mb'):.0f} MB)")


def shapes_variant(args):
    """One variant of the real-shapes step in this process: the reference pass (no grad) first, then
    `args.steps` timed steps after one warm-up; returns its figures."""
    device = torch.device(args.device)
    model = real_shapes_model(args.hidden, args.layers).to(device)
    lora.add_lora(model, r=8, alpha=16, targets=r".*language_model.*\.(q_proj|v_proj)")
    batch = {k: v.to(device) for k, v in real_shapes_batch(model.config, args.pairs, args.prompt_text, args.answer).items()}
    start = data.response_start(batch) if args.variant == "window" else 0
    with torch.no_grad(), lora.disable_lora(model):
        ref = data.response_logps(model, batch, 2, start=start)[1].sum(-1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = torch.cuda.memory_allocated() / 2 ** 20 if device.type == "cuda" else rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1 + args.steps):
        sync()
        t0 = time.perf_counter()
        logits, tokens, _ = data.response_logps(model, batch, 2, start=start)
        policy = tokens.sum(-1)
        losses, _, _ = mmedpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], torch.ones(args.pairs, device=device))
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step()
        sync()
        if step:
            times.append(time.perf_counter() - t0)
        logits_mb = logits.numel() * logits.element_size() / 2 ** 20
        del logits, tokens, policy, losses
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else rss()
    return {"variant": args.variant, "answer": args.answer, "ms_per_step": statistics.median(times) * 1000,
            "peak_mb": peak - before, "logits_mb": logits_mb, "positions": int(batch["input_ids"].shape[1] - start)}


def real_shapes_model(hidden=512, layers=2, vocab=32000, image_size=336, patch=14, generator_seed=0):
    """A randomly initialised LLaVA with LLaVA-Med v1.5's vocabulary and image-token count (336 / 14 = 24,
    576 tokens) and a Mistral-like text tower (intermediate 3.5 x hidden, 4 query heads per key-value head),
    at the given width and depth; a tiny vision tower (its cost is not what is measured). No download."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    heads = max(1, hidden // 64)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(hidden_size=hidden, intermediate_size=int(3.5 * hidden), num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab,
                                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_id=vocab - 1, vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng():
        torch.manual_seed(generator_seed)
        return LlavaForConditionalGeneration(config)


def real_shapes_batch(config, pairs=4, prompt_text=80, answer=60, seed=0):
    """2 * pairs rows (every chosen, then every rejected): BOS, the image tokens, `prompt_text` random
    prompt tokens, a random answer of about `answer` tokens (rows differ by a few) and EOS; labels on the
    answer and EOS only; random pixels."""
    g = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    vocab = config.text_config.vocab_size
    rows, labels = [], []
    for i in range(2 * pairs):
        prompt = [1] + [config.image_token_id] * n_image + torch.randint(3, vocab - 1, (prompt_text + i % 3,), generator=g).tolist()
        response = torch.randint(3, vocab - 1, (max(1, answer - i % 2),), generator=g).tolist() + [2]
        rows.append(prompt + response)
        labels.append([data.IGNORE_INDEX] * len(prompt) + response)
    return {"input_ids": data.right_pad(rows, 0), "attention_mask": data.right_pad([[1] * len(r) for r in rows], 0),
            "labels": data.right_pad(labels, data.IGNORE_INDEX),
            "pixel_values": torch.rand(2 * pairs, 3, vision.image_size, vision.image_size, generator=g)}


# -----------------------------------------------------------------------------
# the study: every objective and ablation on the synthetic benchmark, equal budgets, two base models x
# several seeds, one table; and the validation sweeps behind the chosen settings

STUDY_ROWS = [  # (name, train.py flags); every run also gets --steps (equal budgets), --seed, --base and its row's
    # objective's learning rate, chosen on the val split (train.OBJECTIVES, from `python -m lab.bench sweep`); the
    # MMedPO ablations share MMedPO's
    ("SFT on the chosen answers (control)", ["--objective", "sft"]),
    ("oracle: SFT on true presence labels", ["--objective", "oracle"]),
    ("lean: SFT on 'yes' to every presence question", ["--objective", "lean"]),
    ("DPO (text pairs, weights 1)", ["--objective", "dpo"]),
    ("MMedPO (text + visual)", []),
    ("MMedPO, text pairs only", ["--strategies", "text"]),
    ("MMedPO, visual pairs only", ["--strategies", "visual"]),
    ("MMedPO without CRS weights", ["--weighting", "none"]),
    ("MMedPO, global noise", ["--noise", "global"]),
    ("HSCR", ["--objective", "hscr"]),
    ("FiRe-MPO", ["--objective", "fire"]),
]
ORACLE_ROW, LEAN_ROW = STUDY_ROWS[1][0], STUDY_ROWS[2][0]
CONTRASTS = [  # (what is compared, row, against row)
    ("MMedPO vs SFT control", "MMedPO (text + visual)", "SFT on the chosen answers (control)"),
    ("MMedPO vs DPO", "MMedPO (text + visual)", "DPO (text pairs, weights 1)"),
    ("visual pairs vs none", "MMedPO (text + visual)", "MMedPO, text pairs only"),
    ("CRS weights vs none", "MMedPO (text + visual)", "MMedPO without CRS weights"),
    ("local vs global noise", "MMedPO (text + visual)", "MMedPO, global noise"),
]
STUDY_METRICS = [  # (column, how to read it from one evaluation, higher is better); the tie-proof headline first
    ("tb-order", lambda m: m["grounding"]["headline"]["tb_order"], True),
    ("Δnats", lambda m: m["grounding"]["headline"]["margin_diff"], True),
    ("pair-ord", lambda m: m["grounding"]["pair_order"], True),
    ("mAUROC", lambda m: m["grounding"]["macro_auroc"], True),
    ("ptx pair-ord", lambda m: m["grounding"]["per_finding"]["pneumothorax"]["pair_order"], True),
    ("bal-acc", lambda m: m["grounding"]["pope"]["accuracy"], True),
    ("cf-acc", lambda m: m["grounding"]["counterfactual"]["accuracy"], True),
    ("yes%", lambda m: m["grounding"]["pope"]["yes_ratio"], None),
    ("frag%", lambda m: m["fragments"]["share"], False),
    ("halluc", lambda m: m["prior_breaking"]["hallucination_rate"], False),
    ("pf-acc", lambda m: m["prior_breaking"]["accuracy_following"], True),
    ("closed", lambda m: m["closed"], True),
    ("BLEU", lambda m: 100 * m["bleu_mean"], True),
    ("CHAIR", lambda m: m["report_findings"]["chair"], False),
]


BASE_ROW = "base (before training)"
STUDY_BASES, STUDY_SEEDS = [0, 1, 2], [0, 1, 2, 3]   # the full study: three shipped bases x four seeds


def study_main(argv):
    ap = argparse.ArgumentParser(prog="python -m lab.bench study", description="the synthetic benchmark study: every objective and ablation, equal budgets")
    ap.add_argument("--out", default="out/study", help="runs go to OUT/baseB/seedS/ROW; reused when their flags are unchanged")
    ap.add_argument("--bases", type=int_list, default=STUDY_BASES,
                    help="base models: 0, 1 and 2 are shipped (assets/tiny-base, tiny-base-1, tiny-base-2); others are "
                    "built with seed b")
    ap.add_argument("--seeds", type=int_list, default=STUDY_SEEDS)
    ap.add_argument("--rows", type=int_list, default=None, help=f"row numbers 0..{len(STUDY_ROWS) - 1} (default: all)")
    ap.add_argument("--steps", type=int, default=144, help="optimizer steps of every row (MMedPO's 3 epochs)")
    args = ap.parse_args(argv)
    if args.rows and max(args.rows) >= len(STUDY_ROWS):
        ap.error(f"--rows: row numbers are 0..{len(STUDY_ROWS) - 1}")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: is a file; the study writes a folder of runs")
    rows = [STUDY_ROWS[i] for i in args.rows] if args.rows else STUDY_ROWS
    os.makedirs(args.out, exist_ok=True)
    bases, results, t0 = study_bases(args.out, args.bases), {}, time.time()
    runs = [(b, s) for b in args.bases for s in args.seeds]
    for b, s in runs:
        for name, flags in rows:
            t = time.time()
            log_path = os.path.join(args.out, f"base{b}-seed{s}-{slug(name)}.log")
            results[(name, (b, s))], reused = run_study_row(args.out, b, bases[b], s, name, flags, args.steps, log_path)
            g = results[(name, (b, s))]["after"]["grounding"]
            frag = results[(name, (b, s))]["after"]["fragments"]["share"]
            print(f"base {b} seed {s} | {name:38s} | tb-order {g['headline']['tb_order']:.3f} | "
                  f"Δnats {g['headline']['margin_diff']:+.2f} | pair-ord {g['pair_order']:.3f} | "
                  f"yes% {g['pope']['yes_ratio']:.3f} | frag% {frag:.3f} | {'reused' if reused else f'{time.time() - t:.0f}s'}",
                  flush=True)
    names = [name for name, _ in rows]
    if STUDY_ROWS[0][0] not in names:  # the base row is read from the SFT control's "before"
        for b, s in runs:
            results[(STUDY_ROWS[0][0], (b, s))], _ = run_study_row(args.out, b, bases[b], s, *STUDY_ROWS[0], args.steps,
                                                                    os.path.join(args.out, f"base{b}-seed{s}-sft.log"))
    table = study_tables(names, results, runs)
    hashes = "\n".join(f"- base {b}: {bases[b]}, weights sha256 {weights_digest(bases[b])}" for b in args.bases)
    hashes += "\n\n" + visual_tool_line(args.seeds)
    # a study of some rows only must not replace the full one: it goes to study-partial.*
    full = len(rows) == len(STUDY_ROWS) and set(STUDY_BASES) <= set(args.bases) and set(STUDY_SEEDS) <= set(args.seeds)
    stem = "study" if full else "study-partial"   # fewer rows, bases or seeds never replace the full study
    lrs = {name: objective.lr for name, objective in train.OBJECTIVES.items()}
    checkpoint.write_json(os.path.join(args.out, f"{stem}.json"),
                          [{"row": name, "base": b, "seed": s, **{c: read(results[(name, (b, s))]["after"]) for c, read, _ in STUDY_METRICS},
                            "before": {c: read(results[(name, (b, s))]["before"]) for c, read, _ in STUDY_METRICS}}
                           for name in names for b, s in runs], indent=1)
    command = (f"python -m lab.bench study --bases {','.join(map(str, args.bases))} --seeds {','.join(map(str, args.seeds))} "
               f"--steps {args.steps}" + (f" --rows {','.join(map(str, args.rows))}" if args.rows else ""))
    checkpoint.atomic_write(os.path.join(args.out, f"{stem}.md"), lambda f: f.write(
        f"{command}\n\nLearning rates (chosen on val): {lrs}\n\n{hashes}\n\n{table}\n"))
    study_chart(names, results, runs, os.path.join(args.out, f"{stem}.png"))
    print("\n" + table + f"\n\nwritten to {args.out}/{stem}.md, {stem}.json and {stem}.png in {time.time() - t0:.0f}s")


def int_list(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: numbers >= 0, each once")
    return values


def study_bases(out, bases, log=print):
    """The base models of the study: base 0 is the shipped tiny base, base 1 the shipped
    assets/tiny-base-1 (the same recipe with seed 1; shipped, since float sums on another thread count
    give other bits and a base trained on them differs); base b > 1 is built once under OUT/base{b}/model."""
    paths, assets = {}, os.path.join(ROOT, "assets")
    for b in bases:
        shipped = os.path.join(assets, "tiny-base" if b == 0 else f"tiny-base-{b}")
        paths[b] = shipped if os.path.exists(os.path.join(shipped, "config.json")) else os.path.join(out, f"base{b}", "model")
        if not os.path.exists(os.path.join(paths[b], "config.json")):
            log(f"building base model {b} (seed {b}) -> {paths[b]}")
            synthetic.build_base(paths[b], seed=b, log=lambda *a: None)
    return paths


def visual_tool_line(seeds, n_test=200):
    """The visual tool of each seed (trained on that seed's SFT split) on that seed's test split."""
    scores = []
    for s in seeds:
        sft_images, _ = synthetic.make_synthetic(2000, s, 32, "train")
        test_images, _ = synthetic.make_synthetic(n_test, s, 32, "test")
        classifier = synthetic.SyntheticStore([], None, sft_images=sft_images).visual_tool(s, lambda *a: None).classifier
        scores.append(visual_tool_auroc(classifier, test_images))
    mean = {k: sum(sc[k] for sc in scores) / len(scores) for k in scores[0]}
    per_seed = ", ".join(f"{sc['any']:.3f}" for sc in scores)
    return (f"Visual tool (lesion classifier trained on each seed's SFT split), test AUROC over seeds {seeds}: any finding "
            f"{mean['any']:.3f} (per seed {per_seed}); " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "any"))


def run_study_row(out, base, base_path, seed, name, flags, steps, log_path):
    """One train.py run in this process (its output to log_path), reused when its flags are unchanged.
    Its folder is named for the row, so that the order of --rows never mislabels a result."""
    import contextlib
    seed_dir = os.path.join(out, f"base{base}", f"seed{seed}")
    run_dir = os.path.join(seed_dir, slug(name))
    objective = flags[flags.index("--objective") + 1] if "--objective" in flags else "mmedpo"
    argv = ["--out", seed_dir, "--run-name", slug(name), "--seed", str(seed), "--base", base_path,
            "--steps", str(steps), "--lr", str(train.OBJECTIVES[objective].lr)] + flags
    metrics_path, computed = os.path.join(run_dir, "metrics.json"), []
    key = checkpoint.fingerprint({"argv": argv, "base": weights_digest(base_path)})  # the base's bytes, not its path

    def compute():
        computed.append(argv)
        with open(log_path, "w") as log, contextlib.redirect_stdout(log):
            train.main(argv)
        return checkpoint.read_json(metrics_path), True

    def load():
        return checkpoint.read_json(metrics_path) if os.path.exists(metrics_path) else None
    metrics = checkpoint.cached(os.path.join(run_dir, "study_key.json"), key, compute,
                                lambda m: None, load, lambda *a: None, name)
    return metrics, not computed


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:48]


def study_tables(names, results, runs):
    """Markdown: every row's mean ± sd over the runs (base model x seed), then each row's paired
    difference from the base and from the SFT control, then the contrasts, with 95 % intervals."""
    fmt_ci = lambda m, h, up: (f"**{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]**" if up is not None and (m - h > 0 if up else m + h < 0)
                               else f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]")
    lines = [f"Means ± standard deviations over {len(runs)} runs (base model, seed): {', '.join(f'{b}/{s}' for b, s in runs)}.",
             "", "| run | " + " | ".join(c for c, _, _ in STUDY_METRICS) + " |", "|---|" + "---|" * len(STUDY_METRICS)]
    for name in [BASE_ROW] + names:
        cells = [mean_sd([value(results, name, r, read) for r in runs]) for _, read, _ in STUDY_METRICS]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" if abs(m) < 10 else f"{m:.2f} ± {sd:.2f}"
                                                for m, sd in cells) + " |")
    shown = [c for c in STUDY_METRICS if c[0] in ("tb-order", "Δnats", "pair-ord", "bal-acc", "yes%", "frag%", "closed")]
    diff = lambda a, b, read: paired_ci([value(results, a, r, read) for r in runs], [value(results, b, r, read) for r in runs])
    sft = STUDY_ROWS[0][0]
    lines += ["", "Paired differences over the runs (mean [95 % interval]); **bold**: the interval excludes 0 in the "
              "better direction.", "", "| run | " + " | ".join(f"Δ{c} vs base" for c, _, _ in shown) +
              " | Δtb-order vs SFT | ΔΔnats vs SFT |", "|---|" + "---|" * (len(shown) + 2)]
    for name in names:
        cells = [fmt_ci(*diff(name, BASE_ROW, read), up) for _, read, up in shown]
        cells += [fmt_ci(*diff(name, sft, metric(col)), True) if name != sft and sft in names else ""
                  for col in ("tb-order", "Δnats")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if ORACLE_ROW in names:  # how much of what true labels teach does each row learn?
        gain = lambda name, read: sum(value(results, name, r, read) - value(results, BASE_ROW, r, read) for r in runs) / len(runs)
        lines += ["", "Share of the oracle's gain over the base that each row reaches (mean gain / the oracle's mean "
                  "gain; 1 = as much as supervision on the true labels, 0 = none, < 0 = worse than the base):", "",
                  "| run | tb-order | Δnats | pair-ord | mAUROC |", "|---|---|---|---|---|"]
        for name in names:
            cells = [gain(name, read) / gain(ORACLE_ROW, read) if abs(gain(ORACLE_ROW, read)) > 1e-9 else float("nan")
                     for col, read, _ in STUDY_METRICS if col in ("tb-order", "Δnats", "pair-ord", "mAUROC")]
            lines.append(f"| {name} | " + " | ".join(f"{c:+.2f}" for c in cells) + " |")
    bases = sorted({b for b, _ in runs})
    if len(bases) > 1:  # base models can differ in kind, not only in degree: each one's means
        lines += ["", "Per base model (mean over its seeds):", "",
                  "| run | " + " | ".join(f"{c} base {b}" for b in bases for c in ("tb-order", "Δnats", "pair-ord", "yes%")) + " |",
                  "|---|" + "---|" * (4 * len(bases))]
        cols = [c for c in STUDY_METRICS if c[0] in ("tb-order", "Δnats", "pair-ord", "yes%")]
        for name in [BASE_ROW] + names:
            cells = [mean_sd([value(results, name, r, read) for r in runs if r[0] == b])[0] for b in bases for _, read, _ in cols]
            lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    checks = [(name, r) for name in (ORACLE_ROW, LEAN_ROW) if name in names for r in runs
              if "pair_diffs" in results[(name, r)]["after"]["grounding"]]
    if checks:  # the instrument's two checks on every run: a run that fails them is flagged, not averaged in silently
        lines += ["", "The instrument's checks on every run (the paired change of the headline over the same pairs, "
                  "95 % interval over pairs): the oracle must raise it, the lean must not.", "",
                  "| row | base | seed | Δtb-order [95 %] | Δnats [95 %] | check |", "|---|---|---|---|---|---|"]
        for name, (b, s_) in checks:
            g = results[(name, (b, s_))]
            c = paired_change(g["before"]["grounding"], g["after"]["grounding"])
            ok = c["raises"] if name == ORACLE_ROW else not c["raises"]
            lines.append(f"| {name.split(':')[0]} | {b} | {s_} | {c['d_tb']:+.3f} [{c['d_tb'] - c['d_tb_ci']:+.3f}, "
                         f"{c['d_tb'] + c['d_tb_ci']:+.3f}] | {c['d_nats']:+.2f} [{c['d_nats'] - c['d_nats_ci']:+.2f}, "
                         f"{c['d_nats'] + c['d_nats_ci']:+.2f}] | {'pass' if ok else '**FAIL**'} |")
    contrasts = [c for c in CONTRASTS if c[1] in names and c[2] in names]
    if contrasts:
        lines += ["", "The questions (paired over the same runs):", "",
                  "| contrast | Δpair-ord | ΔmAUROC | Δbal-acc | Δfrag% | Δclosed |", "|---|---|---|---|---|---|"]
        for what, a, b in contrasts:
            cells = [fmt_ci(*diff(a, b, read), up) for col, read, up in STUDY_METRICS
                     if col in ("pair-ord", "mAUROC", "bal-acc", "frag%", "closed")]
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_chart(names, results, runs, path, width=980, bar=14):
    """Horizontal bars, one group per row: the headline's tie-banded order (blue) and the presence pairs'
    order (green), and the yes-ratio (grey), mean over runs with a line for ± one sd."""
    from PIL import Image, ImageDraw
    reads = [(metric("tb-order"), (60, 90, 200)), (metric("pair-ord"), (60, 160, 90)), (metric("yes%"), (150, 150, 150))]
    names = [BASE_ROW] + names
    left, top, row_h = 290, 40, 3 * bar + 10
    img = Image.new("RGB", (width, top + row_h * len(names) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "tie-banded order over the failure kinds (blue), presence pair order (green), yes-ratio (grey): "
                     "mean ± sd", fill="black")
    scale = width - left - 40
    for i, name in enumerate(names):
        y = top + i * row_h
        d.text((10, y + bar), name[:44], fill="black")
        for j, (read, colour) in enumerate(reads):
            m, sd = mean_sd([value(results, name, r, read) for r in runs])
            y0 = y + j * bar
            d.rectangle([left, y0, left + scale * m, y0 + bar - 2], fill=colour)
            d.line([left + scale * max(0, m - sd), y0 + bar // 2, left + scale * min(1, m + sd), y0 + bar // 2], fill="black")
            d.text((left + scale * m + 6, y0), f"{m:.2f}", fill="black")
    for x in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([left + scale * x, top - 6, left + scale * x, top + row_h * len(names)], fill=(210, 210, 210))
        d.text((left + scale * x - 8, top + row_h * len(names) + 6), f"{x:.2f}", fill="black")
    img.save(path)


def metric(column):
    """How STUDY_METRICS reads `column` from one evaluation."""
    return next(read for col, read, _ in STUDY_METRICS if col == column)


def value(results, name, run, read):
    """A metric of one run of a row; the row "base (before training)" is the SFT control's 'before'."""
    if name == BASE_ROW:
        return read(results[(STUDY_ROWS[0][0], run)]["before"])
    return read(results[(name, run)]["after"])


def paired_ci(xs, ys):
    """Mean of the paired differences xs - ys and its 95 % t-interval (half-width; inf for one run)."""
    m, sd = mean_sd([x - y for x, y in zip(xs, ys)])
    return m, t975(len(xs) - 1) * sd / len(xs) ** 0.5 if len(xs) > 1 else float("inf")


def mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def sweep_main(argv):
    """The validation runs behind the chosen settings, written with their commands to OUT/sweep.md:
    the noise's effect on the base model (no training), then every objective on the val split over
    learning rates. The test split is never read."""
    ap = argparse.ArgumentParser(prog="python -m lab.bench sweep", description="validation sweeps behind the default settings (val split only)")
    ap.add_argument("--out", default="out/study")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--objectives", default="mmedpo,dpo,sft,oracle,hscr,fire")
    args = ap.parse_args(argv)
    lrs, objectives = args.lrs.split(","), args.objectives.split(",")
    for lr in lrs:
        try:
            assert float(lr) > 0 and math.isfinite(float(lr))
        except (ValueError, AssertionError):
            ap.error(f"--lrs: {lr!r} is not a positive number")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: is a file; the sweep writes a folder of runs")
    if set(objectives) - set(train.OBJECTIVES):
        ap.error(f"--objectives: unknown {sorted(set(objectives) - set(train.OBJECTIVES))}; choose from {list(train.OBJECTIVES)}")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(ROOT, "assets", "tiny-base")
    lines = ["# Validation sweeps (val split; the test split is never read)", "",
             f"python -m lab.bench sweep --lrs {args.lrs} --objectives {args.objectives}", "",
             f"Base 0 weights sha256 {weights_digest(base)}", "", "## Does the noise hide the lesion from the base model?", ""]
    lines += noise_sweep(base)
    lines += ["", "## Each objective on the val split (base 0, seed 0, 144 steps) by learning rate", ""]
    sweep_lines, chosen = lr_sweep(args.out, objectives, lrs)
    lines += sweep_lines + ["", "Chosen (highest tie-banded headline with at most 1 % broken answers): " +
                            ", ".join(f"{o} {lr}" for o, lr in chosen.items())]
    checkpoint.atomic_write(os.path.join(args.out, "sweep.md"), lambda f: f.write("\n".join(lines) + "\n"))
    print(f"chosen: {chosen}\nwritten to {os.path.join(args.out, 'sweep.md')}")


def lr_sweep(out, objectives, lrs, max_fragments=0.01):
    """Each objective on the val split (base 0, seed 0, 144 steps) at each learning rate. The choice: the
    highest tie-banded headline among the rates with at most `max_fragments` broken answers (else the lowest
    rate). returns (markdown lines, {objective: chosen rate})."""
    import contextlib
    cols = [c for c in STUDY_METRICS if c[0] in SWEEP_COLUMNS]
    lines = ["| objective | lr | " + " | ".join(c for c, _, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    chosen = {}
    for objective in objectives:
        folder, results = os.path.join(out, "sweep", objective), {}
        os.makedirs(folder, exist_ok=True)
        for lr in lrs:  # one --out per objective: the preference data is built once and reused
            with open(os.path.join(folder, f"lr{lr}.log"), "w") as log, contextlib.redirect_stdout(log):
                train.main(["--out", folder, "--run-name", f"lr{lr}", "--objective", objective, "--eval-split", "val",
                            "--steps", "144", "--lr", lr])
            results[lr] = checkpoint.read_json(os.path.join(folder, f"lr{lr}", "metrics.json"))
            a = results[lr]["after"]
            lines.append(f"| {objective} | {lr} | " + " | ".join(f"{read(a):.3f}" for _, read, _ in cols) + " |")
            print(lines[-1], flush=True)
        before = results[lrs[0]]["before"]
        lines.append(f"| {objective} | (base) | " + " | ".join(f"{read(before):.3f}" for _, read, _ in cols) + " |")
        ok = [lr for lr in lrs if results[lr]["after"]["fragments"]["share"] <= max_fragments]
        chosen[objective] = max(ok, key=lambda lr: results[lr]["after"]["grounding"]["headline"]["tb_order"]) if ok else \
            min(lrs, key=float)
    return lines, chosen


SWEEP_COLUMNS = ["tb-order", "Δnats", "pair-ord", "ptx pair-ord", "bal-acc", "yes%", "frag%", "closed", "BLEU"]


def noise_sweep(base_path, steps=(500, 999), heatmaps=("classifier", "detector", "mask"), n=128):
    """Does Strategy 2's noise hide the lesion from the base model? On val-split questions whose answer
    states a finding, per heatmap and diffusion step: the drop of log P(y_w) from the clean to the noised
    image (median, share above 1 nat) and the share of greedy answers the noise changes. No training."""
    import tempfile
    model, processor = checkpoint.load_model(base_path, torch.float32, torch.device("cpu"))
    sft_images, _ = synthetic.make_synthetic(2000, 0, 32, "train")
    images, qa = synthetic.make_synthetic(200, 0, 32, "val")
    store = synthetic.SyntheticStore(images, tempfile.mkdtemp(), sft_images=sft_images)
    items = [it for it in qa if it["type"] != "report" and not data.states_absence(it["answer"])][:n]
    rows, quiet = [], lambda *a: None
    seen = visual_tool_auroc(store.visual_tool(0, quiet).classifier, images)
    print(f"visual tool (lesion classifier, trained on the SFT split) on val: AUROC {seen['any']:.3f} for any finding; "
          + ", ".join(f"{k} {v:.3f}" for k, v in seen.items() if k != "any"), flush=True)
    for heatmap in heatmaps:
        tool = data.heatmap_tool(heatmap, store=store, log=quiet)
        for k in steps:
            pairs = data.build_visual_pairs(items, store, tempfile.mkdtemp(), tool, "local", k, 0, log=quiet)
            data.answer_change(model, processor, pairs, "plain", False, 48, log=quiet)
            dataset = data.RecordDataset(pairs, processor, data.model_image_reader(False))
            batches = [list(range(i, min(i + 64, len(pairs)))) for i in range(0, len(pairs), 64)]
            with torch.no_grad():
                logps = torch.cat([data.response_logps(model, batch, 2)[1].sum(-1) for batch in
                                   record_loader(dataset, batches, processor.tokenizer.pad_token_id, 0)])
            drop = (logps[:, 0] - logps[:, 1]).numpy()
            rows.append((heatmap, k, len(pairs), float(np.median(drop)), float((drop > 1).mean()),
                         float(np.mean([p["answer_changes"] for p in pairs]))))
            print(f"noise {heatmap:10s} k={k:3d}: {rows[-1][2]} pairs | median drop {rows[-1][3]:.3f} nats | "
                  f"> 1 nat {rows[-1][4]:.0%} | answer changed {rows[-1][5]:.0%}", flush=True)
    return [f"The visual tool (lesion classifier trained on the SFT split) on the val split: AUROC {seen['any']:.3f} for "
            f"any finding; " + ", ".join(f"{k} {v:.3f}" for k, v in seen.items() if k != "any"), "",
            "| heatmap | k | pairs | median log P(y_w ; x) - log P(y_w ; x*) | share > 1 nat | greedy answer changed |",
            "|---|---|---|---|---|---|"] + [f"| {h} | {k} | {n} | {m:.3f} | {s:.0%} | {c:.0%} |" for h, k, n, m, s, c in rows]


def weights_digest(folder):
    """sha256 of a model folder's weight files (their bytes, in name order): what a study row depends on."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))):
        h.update(f.encode() + checkpoint.file_digest(os.path.join(folder, f)).encode())
    return h.hexdigest()[:16]


def visual_tool_auroc(classifier, images):
    """How well the visual tool sees: the AUROC of its confidence (largest finding probability) for
    "has any finding" against clear images, and of each finding's probability for that finding."""
    with torch.no_grad():
        p = classifier(torch.as_tensor(np.stack([im["pixels"] for im in images]))[:, None]).sigmoid().numpy()
    y = synthetic.finding_labels(images)
    return {"any": auroc(p.max(1).tolist(), (y.max(1) > 0).tolist()),
            **{k: auroc(p[:, i].tolist(), y[:, i].tolist()) for i, k in enumerate(synthetic.KINDS)}}


if __name__ == "__main__":
    main()
