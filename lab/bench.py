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
    python -m lab.bench study              # = python -m lab.study: the study (lab/study.py)
    python -m lab.bench sweep              # = python -m lab.study sweep: the val sweep behind its settings
    python -m lab.bench shapes             # one DPO step at LLaVA-Med's vocabulary and lengths: full logits
                                           # against logits at the response positions only, each peak beside
                                           # lab/memory.py's figure (--sizes 512x2,768x3; --grad-ckpt)

lab/bench_trl.py puts this step beside TRL's DPOTrainer (in an environment where TRL is installed).
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

import data
import lora
from lab import memory
from mmedpo import mmedpo_loss
from train import to_device
from world import synthetic
from world.flags import NONNEG_INT, POS_INT, number

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: assets/, train.py
# A variant's environment on a CPU: every allocation of 64 KiB or more is its own mapping, given back when
# freed, so that the max RSS follows the live tensors (glibc otherwise raises its mmap threshold as blocks
# are freed, and freed blocks below it stay resident: +20-35 % on the peaks measured here)
LIVE_RSS = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def main():
    if sys.argv[1:2] in (["study"], ["sweep"]):   # the study and its val sweep live in lab/study.py
        from lab import study
        return (study.study_main if sys.argv[1] == "study" else study.sweep_main)(sys.argv[2:])
    if sys.argv[1:2] == ["shapes"]:
        return shapes_main(sys.argv[2:])
    ap = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=POS_INT, default=16)
    ap.add_argument("--image-size", type=number(int, 8), default=32)
    ap.add_argument("--steps", type=POS_INT, default=30)
    ap.add_argument("--warmup", type=NONNEG_INT, default=3)
    ap.add_argument("--text-pairs", action="store_true", help="text pairs only (no rejected image), as TRL takes them")
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
    model, processor, pairs, load = setup(args, text_only=args.text_pairs)
    device, B = torch.device(args.device), args.batch_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    dataset = data.RecordDataset(pairs, processor, load)          # every pair tokenised once, then kept
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    loaded = peak_mb(args.device)   # the model and the pairs: the level the step's own peak is measured above
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
    peak = peak_mb(args.device)
    print(json.dumps({"variant": args.variant, "ms_per_step": ms, "pairs_per_s": B / ms * 1000, "peak_mb": peak,
                      "step_peak_mb": peak - loaded, **{f"{k}_ms": statistics.median(v) * 1000 for k, v in parts.items()}}))


def peak_mb(device):
    """The process's peak memory so far in MiB: CUDA's max allocated on a GPU, the max RSS on a CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args, adapter=True, text_only=False):
    """The tiny model (with LoRA r 8 on lora.DEFAULT_TARGETS unless adapter=False), its processor and 64 pairs
    on synthetic images, every other one a visual pair (another image for the rejected row) unless text_only."""
    images, qa = synthetic.make_synthetic(64, 0, args.image_size)
    corpus = [f"{q['question']}\nAnswer: {q['answer']}" for q in qa] + [im["report"] for im in images]
    torch.manual_seed(0)
    model, processor = synthetic.build_tiny(corpus, args.image_size)
    model.to(args.device)
    if adapter:
        lora.add_lora(model, r=8, alpha=16)
    pil = {im["image_id"]: data.to_pil(im["pixels"]) for im in images}
    noised = {im["image_id"]: data.to_pil(im["pixels"][::-1].copy()) for im in images}  # any other image
    pairs = [{"image": q["image_id"], "rejected_image": None if i % 2 or text_only else "n" + q["image_id"],
              "prompt": q["question"], "chosen": q["answer"], "rejected": "no" if q["answer"] == "yes" else "yes"}
             for i, q in enumerate(qa)]
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
    ap.add_argument("--sizes", default="512x2", help="text towers as HIDDENxLAYERS, comma-separated (e.g. 512x2,1024x2)")
    ap.add_argument("--lora-dropout", type=number(float, 0.0), default=0.05, help="LoRA on all seven linear layers, r 8")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on the text tower's layers")
    ap.add_argument("--answers", default="5,60,256", help="answer lengths in tokens (comma-separated)")
    ap.add_argument("--prompt-text", type=POS_INT, default=80, help="text tokens of the prompt besides the 576 image tokens")
    ap.add_argument("--pairs", type=POS_INT, default=4)
    ap.add_argument("--steps", type=POS_INT, default=2)
    ap.add_argument("--repeats", type=POS_INT, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=["full", "window"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--answer", type=POS_INT, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        answers = [int(a) for a in args.answers.split(",")]
        assert answers and min(answers) >= 1
    except (ValueError, AssertionError):
        ap.error(f"--answers {args.answers!r}: comma-separated whole numbers >= 1")
    try:
        sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
        assert all(len(s) == 2 and s[0] >= 64 and s[0] % 64 == 0 and s[1] >= 1 for s in sizes)
    except (ValueError, AssertionError):
        ap.error(f"--sizes {args.sizes!r}: comma-separated HIDDENxLAYERS, hidden a multiple of 64 (e.g. 512x2,1024x2)")
    if args.variant:
        args.hidden, args.layers = (int(x) for x in args.size.split("x"))
        return print(json.dumps(shapes_variant(args)))
    print(f"one weighted-DPO step, {args.pairs} pairs, LLaVA shapes: vocabulary 32,000, 576 image tokens, "
          f"{args.prompt_text} prompt text tokens; Llama text towers {args.sizes} (hidden x layers), LoRA r 8 on all "
          f"seven linear layers, dropout {args.lora_dropout}, gradient checkpointing {'on' if args.grad_ckpt else 'off'}; "
          f"{args.device}, float32. peak MB: above the loaded model; model MB: lab/memory.py's figure", flush=True)
    print(f"{'size':>8s} {'answer':>6s} {'variant':>7s} {'ms/step':>9s} {'peak MB':>9s} {'model MB':>9s} {'model/peak':>10s} "
          f"{'logits MB':>10s}", flush=True)
    results = {}
    for _ in range(args.repeats):
        for size in sizes:
            for answer in answers:
                for variant in ("full", "window"):
                    cmd = [sys.executable, "-m", "lab.bench", "shapes", "--variant", variant, "--answer", str(answer),
                           "--size", "x".join(map(str, size))] + argv
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=LIVE_RSS)
                    if done.returncode != 0:
                        sys.exit(f"lab.bench shapes: the {variant} variant failed:\n{done.stderr[-2000:]}")
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    results.setdefault((size, answer, variant), []).append(r)
                    print(f"{'x'.join(map(str, size)):>8s} {answer:6d} {variant:>7s} {r['ms_per_step']:9.0f} {r['peak_mb']:9.0f} "
                          f"{r['model_mb']:9.0f} {r['model_mb'] / r['peak_mb']:10.2f} {r['logits_mb']:10.1f}", flush=True)
    print("\nratios (full / window), medians over repeats:")
    med = lambda s, a, v, k: statistics.median(r[k] for r in results[(s, a, v)])
    for size in sizes:
        for answer in answers:
            full, window = (lambda k: med(size, answer, "full", k)), (lambda k: med(size, answer, "window", k))
            print(f"  {'x'.join(map(str, size))}, answer {answer:3d} tokens: time {full('ms_per_step') / window('ms_per_step'):.2f}x, "
                  f"peak memory {full('peak_mb') / max(1.0, window('peak_mb')):.2f}x ({full('peak_mb'):.0f} MB against "
                  f"{window('peak_mb'):.0f} MB)")
    worst = max(abs(r["model_mb"] / r["peak_mb"] - 1) for rs in results.values() for r in rs)
    print(f"lab/memory.py against every measured peak: worst error {100 * worst:.0f} %")


def shapes_variant(args):
    """One variant of the real-shapes step in this process: the reference pass (no grad) first, then
    `args.steps` timed steps after one warm-up; returns its figures."""
    device = torch.device(args.device)
    model = real_shapes_model(args.hidden, args.layers).to(device)
    lora.add_lora(model, r=8, alpha=16, dropout=args.lora_dropout)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = {k: v.to(device) for k, v in real_shapes_batch(model.config, args.pairs, args.prompt_text, args.answer).items()}
    start = data.response_start(batch) if args.variant == "window" else 0
    # the level the peak is measured above: the loaded model and batch, taken before the reference pass (the
    # process's max RSS is a high-water mark: taken after that pass, it would hide the pass's own peak)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = torch.cuda.memory_allocated() / 2 ** 20 if device.type == "cuda" else rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), lora.disable_lora(model):
        ref = data.response_logps(model, batch, 2, start=start)[1].sum(-1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(1 + args.steps):
        sync()
        t0 = time.perf_counter()
        logits, tokens, _ = data.response_logps(model, batch, 2, start=start)
        logits_mb = logits.numel() * logits.element_size() / 2 ** 20
        del logits   # as in train.py: only the token log-probs outlive the forward
        policy = tokens.sum(-1)
        losses, _, _ = mmedpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], torch.ones(args.pairs, device=device))
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step()
        sync()
        if step:
            times.append(time.perf_counter() - t0)
        del tokens, policy, losses
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else rss()
    T = batch["input_ids"].shape[1]
    model_mb = memory.step_memory(model.config.to_dict(), batch["input_ids"].shape[0], T, T - start, lora_r=8,
                                  act_bytes=4, grad_ckpt=args.grad_ckpt, dropout=args.lora_dropout > 0)["step"] / 2 ** 20
    return {"variant": args.variant, "answer": args.answer, "ms_per_step": statistics.median(times) * 1000,
            "peak_mb": peak - before, "model_mb": model_mb, "logits_mb": logits_mb, "positions": int(T - start)}


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


if __name__ == "__main__":
    main()
