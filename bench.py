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
    import train
    images, qa = data.make_synthetic(64, 0, args.image_size)
    corpus = [f"{q['question']}\nAnswer: {q['answer']}" for q in qa] + [im["report"] for im in images]
    torch.manual_seed(0)
    model, processor = train.build_tiny(corpus, args.image_size)
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
    from train import forward_logps, to_device
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


if __name__ == "__main__":
    main()
