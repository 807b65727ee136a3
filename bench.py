"""Benchmark of the weighted-DPO step on the tiny model: this project's loop against a naive one.

    ours:  chosen and rejected rows in ONE policy forward; reference log-probs precomputed once
    naive: separate policy forwards for chosen and for rejected, and two reference forwards
           (adapter disabled, no grad) in every step

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
    ref = {}
    if args.variant == "ours":  # the one-time reference pass, outside the timed steps (as in train.py)
        with torch.no_grad(), lora.disable_lora(model):
            for i in range(0, len(pairs), B):
                chunk = pairs[i:i + B]
                logps = forward_logps(model, to_device(data.encode_rows(processor, data.pair_rows(chunk, load)), device, torch.float32))
                for j, p in enumerate(chunk):
                    ref[id(p)] = (logps[j].item(), logps[len(chunk) + j].item())
    times = []
    model.train()
    for step in range(args.warmup + args.steps):
        chunk = [pairs[(step * B + j) % len(pairs)] for j in range(B)]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = data.pair_rows(chunk, load)
        if args.variant == "ours":
            batch = to_device(data.encode_rows(processor, rows), device, torch.float32)
            logps = forward_logps(model, batch)
            pc, pr = logps[:B], logps[B:]
            rc = torch.tensor([ref[id(p)][0] for p in chunk], device=device)
            rr = torch.tensor([ref[id(p)][1] for p in chunk], device=device)
        else:
            chosen = to_device(data.encode_rows(processor, rows[:B]), device, torch.float32)
            rejected = to_device(data.encode_rows(processor, rows[B:]), device, torch.float32)
            pc, pr = forward_logps(model, chosen), forward_logps(model, rejected)
            with torch.no_grad(), lora.disable_lora(model):
                rc, rr = forward_logps(model, chosen), forward_logps(model, rejected)
        loss, _, _ = mmedpo_loss(pc, pr, rc, rr, torch.ones(B, device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"variant": args.variant, "ms_per_step": ms, "pairs_per_s": B / ms * 1000, "peak_mb": peak}))


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
    print(f"{'':8s} {'ms/step':>9s} {'pairs/s':>9s} {'peak MB':>9s}")
    for v, r in results.items():
        print(f"{v:8s} {r['ms_per_step']:9.1f} {r['pairs_per_s']:9.1f} {r['peak_mb']:9.0f}")
    print(f"speed-up of ours over naive: {results['naive']['ms_per_step'] / results['ours']['ms_per_step']:.2f}x")


if __name__ == "__main__":
    main()
