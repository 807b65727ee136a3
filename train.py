"""MMedPO end to end: base model -> preference pairs (text + visual) -> clinical-relevance weights ->
weighted DPO with LoRA -> evaluation before and after.

    python train.py                                   # the embedded default, a few minutes on a laptop CPU
    python train.py --no-crs                          # ablation: every weight 1 (plain DPO)
    python train.py --noise global --heatmap mask     # ablation: global noise; ground-truth masks
    torchrun --nproc_per_node=2 train.py              # data parallel (gloo on CPU, nccl on CUDA)
    python train.py --model PATH --device cuda        # a transformers LLaVA checkpoint on a GPU

Every stage writes under --out and is reused on the next run: base/ (tiny model), pairs/ (pairs.jsonl,
PNGs, judge cache), RUN_NAME/ (checkpoint.pt, adapter/, metrics.json, log.jsonl, pictures).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import lora
from mmedpo import mmedpo_loss, sequence_logps


def get_parser():
    ap = argparse.ArgumentParser(description="MMedPO: clinical-aware multimodal preference optimization")
    a = ap.add_argument
    # where things go
    a("--out", default="out", help="folder for every stage's output (reused when present)")
    a("--run-name", default="mmedpo", help="subfolder of --out for this training run")
    a("--resume", action="store_true", help="continue from RUN_NAME/checkpoint.pt")
    # model
    a("--model", default=None, help="a transformers LLaVA checkpoint folder; default: the tiny built-in model")
    a("--prompt-format", default="plain",
      help="plain, mistral (LLaVA-Med v1.5: [INST] <image>\\n{question} [/INST]), chat (the processor's chat template), "
           "or a string with <image> and {question}")
    a("--pad-to-square", action="store_true", help="pad images to a square (LLaVA's preprocessing) before the processor")
    a("--trust-remote-code", action="store_true", help="allow a checkpoint's own code (off unless asked)")
    a("--grad-ckpt", default="auto", choices=["auto", "on", "off"], help="gradient checkpointing of the policy; auto: on CUDA")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="weights; auto: bf16 on CUDA, fp32 on CPU")
    a("--max-length", type=int, default=None, help="prompt+response tokens (default: the model's context)")
    # the tiny base model (only without --model): built once with the SFT warm-up, then reused
    a("--base", default="assets/tiny-base", help="folder of the tiny base model (reused if present, else built)")
    a("--rebuild-base", action="store_true", help="build the tiny base again even if --base exists")
    a("--base-only", action="store_true", help="stop after building the base model")
    a("--image-size", type=int, default=32, help="synthetic image size (32 px = 16 image tokens)")
    a("--n-train", type=int, default=2000, help="synthetic training images")
    a("--n-test", type=int, default=200, help="synthetic test images")
    a("--sft-steps", type=int, default=3000, help="SFT warm-up steps of the tiny base (batch 32)")
    a("--sft-lr", type=float, default=2e-3)
    # preference data
    a("--data", default="synthetic", choices=["synthetic", "slake", "vqa-rad", "iu-xray"], help="dataset")
    a("--data-dir", default=None, help="folder of a downloaded dataset (slake, vqa-rad, iu-xray)")
    a("--max-test", type=int, default=None, help="evaluate on at most this many test items")
    a("--pairs", default=None, help="train on a released MMedPO preference file (JSON) instead of building pairs")
    a("--images", default=None, help="image folder of --pairs")
    a("--export-pairs", default=None, help="also write the pairs as {prompt, chosen, rejected, images} JSONL here")
    a("--strategies", default="text,visual", help="text (D_t), visual (D_v), or both")
    a("--n-text", type=int, default=512, help="questions turned into text pairs")
    a("--n-visual", type=int, default=256, help="questions turned into visual pairs")
    a("--samples", type=int, default=3, help="answers sampled per question for Strategy 1")
    a("--temperature", type=float, default=1.0, help="sampling temperature for Strategy 1")
    a("--judge", "--judges", action="append", default=[], metavar="NAME=URL,model=M[,key_env=VAR]",
      help="OpenAI-compatible scoring judge (repeat, in order); default: the rule judge")
    a("--selector", default=None, metavar="NAME=URL,model=M[,key_env=VAR]",
      help="the strong LLM that selects or writes the hallucination (the paper's GPT-4o); default: the first judge")
    a("--workers", type=int, default=4, help="pairs scored concurrently")
    a("--rounds", type=int, default=5, help="consensus rounds")
    a("--no-crs", action="store_true", help="no clinical-relevance weights (all 1): plain DPO")
    a("--noise", default="local", choices=["local", "global"], help="lesion-localized or whole-image noise")
    a("--noise-step", type=int, default=500, help="diffusion step k of the noise, in [0, 1000)")
    a("--heatmap", default="detector", choices=["detector", "mask", "attention"],
      help="where the lesion is: the DoG detector, ground-truth masks, or the model's own attention")
    # DPO
    a("--beta", type=float, default=0.1, help="DPO temperature (the paper's alpha)")
    a("--lr", type=float, default=2e-4, help="peak learning rate of the LoRA weights")
    a("--epochs", type=int, default=3)
    a("--batch-size", type=int, default=16, help="pairs per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--warmup", type=float, default=0.03, help="warmup, as a fraction of the steps")
    a("--clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--lora-r", type=int, default=8)
    a("--lora-alpha", type=float, default=16)
    a("--lora-dropout", type=float, default=0.05)
    a("--lora-targets", default=lora.DEFAULT_TARGETS, help="regex of module names to adapt")
    a("--ckpt-every", type=int, default=50, help="checkpoint every N optimizer steps")
    a("--halt-at-step", type=int, default=None, help="exit right after the checkpoint of step N (to test --resume)")
    a("--seed", type=int, default=0)
    return ap


def check_args(ap, args):
    bad = [(f, msg) for f, ok, msg in [
        ("--batch-size", args.batch_size >= 1, "must be >= 1"), ("--grad-accum", args.grad_accum >= 1, "must be >= 1"),
        ("--epochs", args.epochs >= 1, "must be >= 1"), ("--lr", args.lr > 0, "must be > 0"),
        ("--beta", args.beta > 0, "must be > 0"), ("--samples", args.samples >= 1, "must be >= 1"),
        ("--noise-step", 0 <= args.noise_step < 1000, "must be in [0, 1000)"),
        ("--warmup", 0 <= args.warmup < 1, "must be a fraction in [0, 1)"),
        ("--strategies", set(args.strategies.split(",")) <= {"text", "visual"} and args.strategies,
         "must be text, visual or text,visual"),
        ("--lora-r", args.lora_r >= 1, "must be >= 1"), ("--ckpt-every", args.ckpt_every >= 1, "must be >= 1")] if not ok]
    if bad:
        ap.error("; ".join(f"{f} {msg}" for f, msg in bad))
    if args.model and not os.path.isdir(args.model):
        ap.error(f"--model {args.model}: no such folder (download the checkpoint and pass its local path)")
    if args.data != "synthetic" and not args.data_dir:
        ap.error(f"--data {args.data} needs --data-dir: {data.DOWNLOAD_HINTS[args.data]}")
    if args.data != "synthetic" and not args.model:
        ap.error(f"--data {args.data} needs --model: the tiny built-in model only knows the synthetic vocabulary")
    try:
        data.check_prompt_format(args.prompt_format)
    except ValueError as e:
        ap.error(f"--prompt-format: {e}")
    if bool(args.pairs) != bool(args.images):
        ap.error("--pairs and --images go together (the released file names its images relative to --images)")
    if args.pairs and not os.path.isfile(args.pairs):
        ap.error(f"--pairs {args.pairs}: no such file")


# -----------------------------------------------------------------------------
# helpers

def get_lr(step, max_lr, warmup, total):
    """Linear warmup for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def setup_distributed(device_arg):
    """(rank, world, device). Multi-process only when launched by torchrun (RANK in the environment)."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_arg.startswith("cuda"):
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def weights_stamp(path):
    """Names, sizes and modification times of a checkpoint's weight files: a change means new weights."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    return [(f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))) for f in files]


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def to_device(batch, device, dtype):
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def forward_logps(model, batch):
    """Summed response log-probs of every row of an encoded batch: (N,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    return sequence_logps(logits, batch["labels"])


# -----------------------------------------------------------------------------
# the tiny base model: tokenizer, processor and LLaVA built from config, then an SFT warm-up

def build_tiny(corpus, image_size, vocab_size=160):
    """An untrained tiny LLaVA (CLIP 64 x 2 layers, patch 8; Llama 128 x 2 layers) and its processor,
    with a BPE tokenizer (Metaspace pre-tokenizer/decoder) trained in memory on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    patch = 8
    image_processor = ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                     image_mean=[0.5] * 3, image_std=[0.25] * 3, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    n_image_tokens = (image_size // patch) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=n_image_tokens + 96,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config), processor


def sft(model, processor, items, pil_of, steps, lr, seed, batch_size=32, log=print):
    """Supervised warm-up on (image, question, answer): AdamW (0.9, 0.98), warmup 30, cosine, clip 1."""
    rows = [(pil_of(it["image_id"]), it["question"], it["answer"]) for it in items]
    chunks = [data.encode_rows(processor, rows[i:i + 512]) for i in range(0, len(rows), 512)]
    T = max(c["input_ids"].shape[1] for c in chunks)
    pad = lambda t, v: F.pad(t, (0, T - t.shape[1]), value=v)
    ids = torch.cat([pad(c["input_ids"], processor.tokenizer.pad_token_id) for c in chunks])
    att = torch.cat([pad(c["attention_mask"], 0) for c in chunks])
    labels = torch.cat([pad(c["labels"], data.IGNORE_INDEX) for c in chunks])
    pixels = torch.cat([c["pixel_values"] for c in chunks])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, lr, 30, steps)
        idx = torch.randint(0, len(ids), (batch_size,), generator=g)
        logits = model(input_ids=ids[idx], attention_mask=att[idx], pixel_values=pixels[idx]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[idx][:, 1:].flatten(), ignore_index=data.IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            dt = time.time() - t0
            log(f"  sft {step + 1}/{steps} | loss {loss.item():.3f} | {dt / (step + 1) * 1000:.0f} ms/step | "
                f"ETA {dt / (step + 1) * (steps - step - 1):.0f}s")
    model.eval()


# -----------------------------------------------------------------------------
# preference pairs

def build_pairs(model, processor, args, train_qa, store, pairs_dir, device, log=print):
    """Both strategies, scores, weights; pairs.jsonl + PNGs under pairs_dir."""
    import score
    from eval import attention_tool
    rng = random.Random(args.seed)
    judges = [score.parse_judge(j) for j in args.judge] or [score.RuleJudge()]
    selector = score.parse_judge(args.selector) if args.selector else judges[0]
    strategies = args.strategies.split(",")
    pairs = []
    if "text" in strategies:
        items = rng.sample(train_qa, min(args.n_text, len(train_qa)))
        log(f"Strategy 1: sampling {args.samples} answers for {len(items)} questions (temperature {args.temperature})")
        from eval import generate_answers
        samples = generate_answers(model, processor, [(image_for_model(store.pil(it["image_id"]), args), it["question"])
                                                      for it in items], args.prompt_format, batch_size=128,
                                   do_sample=True, temperature=args.temperature, num_return_sequences=args.samples,
                                   generator_seed=args.seed, max_new_tokens=12, log=log)
        if args.samples == 1:
            samples = [[s] for s in samples]
        text = data.build_text_pairs(items, samples, selector, store.path, args.seed, log)
        if not args.no_crs:
            results = score.score_pairs(text, judges, os.path.join(pairs_dir, "judge_cache.jsonl"), args.workers,
                                        args.rounds, log)
            for p, r in zip(text, results):
                p["score"] = r["score"]
                p["provenance"] += f"; score {r['status']} by {'consensus' if r['consensus'] else 'mean'} of " \
                                   f"{[h['judge'] for h in r['history']]}"
        pairs += text
    if "visual" in strategies:
        candidates = [it for it in train_qa if args.heatmap != "mask" or store.has_lesion(it["image_id"])]
        items = rng.sample(candidates, min(args.n_visual, len(candidates)))
        log(f"Strategy 2: {args.noise} noise at k={args.noise_step} on {len(items)} images, heatmap {args.heatmap}")
        tool = args.heatmap
        if tool == "attention":
            tool = attention_tool(model, processor, args.prompt_format, store.pixels, device)
        pairs += data.build_visual_pairs(items, store, pairs_dir, tool, args.noise, args.noise_step, args.seed, log)
    return data.assign_weights(pairs, crs=not args.no_crs)


def image_for_model(image, args):
    """The PIL image as the model sees it: LLaVA pads to a square with the mean colour when asked."""
    return data.pad_to_square(image) if args.pad_to_square else image


def compute_logps(model, processor, pairs, load_image, fmt, batch_size, device, dtype, max_length=None, stats=None):
    """(chosen, rejected) summed log-probs of every pair, no grad, in batches: (N,), (N,)."""
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            batch = to_device(data.encode_rows(processor, data.pair_rows(chunk, load_image), fmt, max_length, stats),
                              device, dtype)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logps = forward_logps(model, batch).float().cpu()
            chosen.append(logps[:len(chunk)])
            rejected.append(logps[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    ap = get_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    run_dir, pairs_dir = os.path.join(args.out, args.run_name), os.path.join(args.out, "pairs")
    os.makedirs(run_dir, exist_ok=True)
    os.makedirs(pairs_dir, exist_ok=True)
    t_start = time.time()

    # 1. base model ------------------------------------------------------------------
    from transformers import AutoModelForImageTextToText, AutoProcessor
    if args.data == "synthetic":
        train_images, train_qa = data.make_synthetic(args.n_train, args.seed, args.image_size, "train")
        test_images, test_qa = data.make_synthetic(args.n_test, args.seed, args.image_size, "test")
        store = data.SyntheticStore(train_images + test_images, os.path.join(pairs_dir, "images"))
    else:
        train_qa, store = data.LOADERS[args.data](args.data_dir, "train", log)
        test_qa, test_store = data.LOADERS[args.data](args.data_dir, "test", log)
        store.masks.update(test_store.masks)
    test_qa = test_qa[:args.max_test] if args.max_test else test_qa
    base_path = args.model or args.base
    built = not args.model and (args.rebuild_base or not os.path.exists(os.path.join(base_path, "config.json")))
    if built:
        if master:
            log(f"[1/6] building the tiny base model (SFT warm-up, {args.sft_steps} steps) -> {base_path}")
            corpus = [data.PROMPT_FORMATS["plain"].format(question=q["question"]).replace("<image>", "") + " " + q["answer"]
                      for q in train_qa] + [im["report"] for im in train_images]
            model, processor = build_tiny(corpus, args.image_size)
            sft(model, processor, train_qa, store.pil, args.sft_steps, args.sft_lr, args.seed, log=log)
            model.save_pretrained(base_path)
            processor.save_pretrained(base_path)
        barrier(world)
    else:
        log(f"[1/6] base model: {base_path} (reused)")
    if args.base_only:
        return
    if not os.path.exists(os.path.join(base_path, "preprocessor_config.json")) and \
            not os.path.exists(os.path.join(base_path, "processor_config.json")):
        sys.exit(f"{base_path}: no processor files (preprocessor_config.json); save the processor with the model")
    processor = AutoProcessor.from_pretrained(base_path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model = model.to(device).eval()
    try:
        data.check_prompt_format(args.prompt_format, processor)
    except ValueError as e:
        sys.exit(f"{base_path}: {e}")
    max_length = args.max_length or getattr(model.config.get_text_config(), "max_position_embeddings", None)
    from eval import answer_prior, evaluate, format_table, save_attention_figure, save_curves, save_noise_grid
    prior = answer_prior(train_qa)

    # 2.-5. preference pairs with weights ----------------------------------------------
    pairs_path = os.path.join(pairs_dir, "pairs.jsonl")
    stage_keys = ["model", "data", "strategies", "n_text", "n_visual", "samples", "temperature", "judge", "selector", "rounds",
                  "no_crs", "noise", "noise_step", "heatmap", "seed", "n_train", "image_size", "base"]
    stage_cfg = json.loads(json.dumps({**{k: getattr(args, k) for k in stage_keys}, "weights": weights_stamp(base_path)}))
    cfg_path = os.path.join(pairs_dir, "pairs_config.json")
    reuse = not built and os.path.exists(pairs_path) and os.path.exists(cfg_path) and json.load(open(cfg_path)) == stage_cfg
    if master and args.pairs:
        log(f"[2/6] released preference pairs: {args.pairs}")
        released, _ = data.read_released_pairs(args.pairs, args.images, log)
        pairs_path = os.path.join(run_dir, "pairs.jsonl")
        data.write_jsonl(pairs_path, data.assign_weights(released, crs=not args.no_crs))
    elif master and not reuse:
        log(f"[2/6] building preference pairs -> {pairs_path}")
        pairs = build_pairs(model, processor, args, train_qa, store, pairs_dir, device, log)
        data.write_jsonl(pairs_path, pairs)
        with open(cfg_path, "w") as f:
            json.dump(stage_cfg, f, indent=1)
    elif reuse:
        log(f"[2/6] preference pairs: {pairs_path} (reused)")
    barrier(world)
    if args.pairs:
        pairs_path = os.path.join(run_dir, "pairs.jsonl")
    pairs, skipped = data.read_pairs(pairs_path, log)
    if master and args.export_pairs:
        data.export_pairs(pairs, args.export_pairs)
        log(f"      exported {len(pairs)} pairs to {args.export_pairs}")
    if not pairs:
        sys.exit(f"{pairs_path}: no usable pairs")
    for source in ("text", "visual"):
        ws = [p["weight"] for p in pairs if p["source"] == source]
        if ws:
            log(f"      {source}: {len(ws)} pairs, weights mean {np.mean(ws):.3f} min {min(ws):.3f} max {max(ws):.3f}")

    # 3. evaluation before (the base, no adapter) ---------------------------------------
    metrics_path = os.path.join(run_dir, "metrics.json")
    image_of = lambda it: image_for_model(store.pil(it["image_id"]), args)
    before_path = os.path.join(run_dir, "eval_before.json")
    before_key = {"model": os.path.abspath(base_path), "weights": weights_stamp(base_path), "data": args.data,
                  "test": [it["id"] for it in test_qa], "prompt_format": args.prompt_format, "pad": args.pad_to_square}
    before_key = json.loads(json.dumps(before_key))  # as it reads back from the file (tuples become lists)
    cached = json.load(open(before_path)) if os.path.exists(before_path) else None
    if master and (not cached or cached.get("key") != before_key):
        log(f"[3/6] evaluating the base model on {len(test_qa)} test questions")
        before, _ = evaluate(model, processor, test_qa, image_of, prior, args.prompt_format, log=log)
        with open(before_path, "w") as f:
            json.dump({"key": before_key, "metrics": before}, f)
    elif master:
        log(f"[3/6] evaluation of the base model: {before_path} (reused)")
    barrier(world)
    before = json.load(open(before_path))["metrics"]

    # 4. LoRA and the reference log-probs (adapter off, once) -------------------------------
    names = lora.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    n_train_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and device.type == "cuda"):
        # recompute activations in the backward pass; only in train mode, so the no-grad reference pass is unaffected
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log(f"[4/6] LoRA r={args.lora_r} alpha={args.lora_alpha} on {len(names)} layers ({n_train_params:,} trainable parameters)")
    image_cache = {}

    def load_image(path):
        if path not in image_cache:  # 8-bit grayscale survives the float round trip exactly
            if len(image_cache) > 4096:  # bounded: a real dataset's images do not all fit in memory
                image_cache.clear()
            image_cache[path] = image_for_model(data.to_pil(data.load_image(path)), args)
        return image_cache[path]

    ref_path = os.path.join(run_dir, "ref_logps.pt")
    trunc = {}
    ref_key = {"model": os.path.abspath(base_path), "weights": weights_stamp(base_path),
               "pairs": [(p["id"], p["chosen"], p["rejected"], p["image"], p["rejected_image"]) for p in pairs],
               "prompt_format": args.prompt_format, "pad": args.pad_to_square, "max_length": max_length,
               "dtype": str(dtype)}
    ref = torch.load(ref_path, weights_only=False) if os.path.exists(ref_path) else None
    if ref is None or ref.get("key") != ref_key:
        log(f"      reference log-probs for {len(pairs)} pairs (adapter disabled, no grad)")
        shard = pairs[rank::world]
        with lora.disable_lora(model):
            rc, rr = compute_logps(model, processor, shard, load_image, args.prompt_format, 2 * args.batch_size,
                                   device, dtype, max_length, trunc)
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, (rc, rr))
            rc, rr = torch.zeros(len(pairs)), torch.zeros(len(pairs))
            for r, (c, j) in enumerate(parts):
                rc[r::world], rr[r::world] = c, j
        ref = {"key": ref_key, "chosen": rc, "rejected": rr}
        if master:
            atomic_save(ref, ref_path)
    ref_chosen, ref_rejected = ref["chosen"], ref["rejected"]
    weights = torch.tensor([p["weight"] for p in pairs], dtype=torch.float32)

    # 5. weighted DPO -------------------------------------------------------------------
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = len(pairs) // global_batch
    if steps_per_epoch == 0:
        sys.exit(f"{len(pairs)} pairs are fewer than one global batch ({global_batch}); lower --batch-size")
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup * total))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    ckpt_path, history, start = os.path.join(run_dir, "checkpoint.pt"), [], 0
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        must_match = ["lr", "beta", "epochs", "batch_size", "grad_accum", "warmup", "clip", "lora_r", "lora_alpha",
                      "lora_dropout", "lora_targets", "seed", "no_crs", "strategies"]
        changed = [f"--{k.replace('_', '-')} {ck['config'].get(k)} -> {getattr(args, k)}" for k in must_match
                   if ck["config"].get(k) != getattr(args, k)]
        if ck["config"].get("world", world) != world:
            changed.append(f"processes {ck['config'].get('world')} -> {world}")
        if changed:
            sys.exit(f"--resume: {ckpt_path} was written with other settings: {'; '.join(changed)}. "
                     f"Resume with the same flags, or start a new --run-name.")
        with torch.no_grad():
            for name, m in lora.lora_layers(model):
                m.lora_A.weight.copy_(ck["lora"][f"{name}.lora_A.weight"])
                m.lora_B.weight.copy_(ck["lora"][f"{name}.lora_B.weight"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"][rank])
        start, history = ck["step"], ck["history"]
        log(f"      resumed from {ckpt_path} at step {start}/{total}")
    elif args.resume:
        log(f"      --resume: no {ckpt_path}, starting fresh")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log(f"[5/6] weighted DPO: {len(pairs)} pairs, {args.epochs} epochs x {steps_per_epoch} steps, global batch "
        f"{global_batch}, lr {args.lr}, beta {args.beta}")
    model.train()
    log_file = open(os.path.join(run_dir, "log.jsonl"), "a") if master else None
    t0 = time.time()
    for step in range(start, total):
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        idx = perm[i * global_batch:(i + 1) * global_batch]
        mine = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]   # this process's share
        lr = get_lr(step, args.lr, warmup, total)
        for group in opt.param_groups:
            group["lr"] = lr
        t_step = time.time()
        stats = torch.zeros(4)  # loss, correct, margin, pairs (summed over micro-batches)
        for micro in range(args.grad_accum):
            mb = mine[micro * args.batch_size:(micro + 1) * args.batch_size].tolist()
            chunk = [pairs[j] for j in mb]
            batch = to_device(data.encode_rows(processor, data.pair_rows(chunk, load_image), args.prompt_format,
                                               max_length, trunc), device, dtype)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                # one forward for chosen and rejected rows: policy log-probs (2B,)
                if world > 1 and micro < args.grad_accum - 1:
                    with ddp.no_sync():
                        logps = forward_logps(ddp, batch)
                else:
                    logps = forward_logps(ddp, batch)
            logps = logps.float()
            B = len(chunk)
            loss, cr, rr_ = mmedpo_loss(logps[:B], logps[B:], ref_chosen[mb].to(device), ref_rejected[mb].to(device),
                                        weights[mb].to(device), args.beta)
            (loss / args.grad_accum).backward()
            stats += torch.tensor([loss.item() * B, (cr > rr_).float().sum().item(), (cr - rr_).sum().item(), B])
        if world > 1:
            torch.distributed.all_reduce(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t_step
        rec = {"step": step + 1, "loss": stats[0].item() / stats[3].item(), "reward_acc": stats[1].item() / stats[3].item(),
               "margin": stats[2].item() / stats[3].item(), "lr": lr, "grad_norm": float(grad_norm), "ms": dt * 1000}
        history.append(rec)
        if master:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            elapsed = time.time() - t0
            eta = elapsed / (step + 1 - start) * (total - step - 1)
            log(f"step {step + 1:4d}/{total} | loss {rec['loss']:.4f} | acc {rec['reward_acc']:.2f} | margin "
                f"{rec['margin']:+.3f} | lr {lr:.2e} | {rec['ms']:.0f} ms | {global_batch / dt:.0f} pairs/s | ETA {eta:.0f}s")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == total or step + 1 == args.halt_at_step:
            rng_states = [rng_state()]
            if world > 1:  # each process's own generators (dropout masks differ between ranks)
                rng_states = [None] * world
                torch.distributed.all_gather_object(rng_states, rng_state())
            if master:
                atomic_save({"lora": {k: v.cpu() for k, v in lora.lora_state_dict(model).items()},
                             "optimizer": opt.state_dict(), "step": step + 1, "history": history,
                             "rng": rng_states, "config": {**vars(args), "world": world},
                             "schedule": {"max_lr": args.lr, "warmup": warmup, "total": total}}, ckpt_path)
            barrier(world)
        if args.halt_at_step is not None and step + 1 == args.halt_at_step:
            log(f"halting after step {step + 1} as asked (--halt-at-step); continue with --resume")
            sys.stdout.flush()
            os._exit(3)
    if log_file:
        log_file.close()
    if trunc.get("truncated"):
        log(f"      {trunc['truncated']} rows had their prompt truncated to fit {max_length} tokens, "
            f"{trunc.get('response_truncated', 0)} of them their response too")
    model.eval()

    # 6. adapter, evaluation after, metrics, pictures ---------------------------------------
    if master:
        lora.save_adapter(model, os.path.join(run_dir, "adapter"), base_model_name_or_path=os.path.abspath(base_path))
        log(f"[6/6] evaluating with the adapter; adapter saved to {os.path.join(run_dir, 'adapter')}")
        after, preds = evaluate(model, processor, test_qa, image_of, prior, args.prompt_format, log=log)
        metrics = {"before": before, "after": after, "prior": after["prior"], "seed": args.seed,
                   "pairs": {s: sum(p["source"] == s for p in pairs) for s in ("text", "visual")},
                   "skipped_pairs": skipped, "steps": total, "final_train": history[-1] if history else None,
                   "seconds": time.time() - t_start, "config": vars(args)}
        with open(metrics_path, "w") as f:
            json.dump(metrics, f, indent=1)
        data.write_jsonl(os.path.join(run_dir, "predictions.jsonl"), [{**it, "prediction": p} for it, p in zip(test_qa, preds)])
        save_noise_grid(pairs, os.path.join(run_dir, "noise_grid.png"))
        save_curves(history, os.path.join(run_dir, "curves.png"))
        lesion_items = ([it for it in test_qa if it["qtype"] == "where"] or test_qa)[:4]
        save_attention_figure(model, processor, lesion_items, store.pixels, args.prompt_format, device,
                              os.path.join(run_dir, "attention.png"))
        log("\n" + format_table({"answer prior": after["prior"], "before": before, "after": after}))
        log(f"\ndone in {time.time() - t_start:.0f}s; metrics in {metrics_path}")
    barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
