"""Preference training of a medical VLM end to end: base model -> preference data (MMedPO's text and
visual pairs, HSCR's triplets, or FiRe-MPO's edited on-policy answers) -> clinical-relevance weights ->
reference log-probs -> LoRA training with the chosen objective -> evaluation before and after. The
stages follow MMedPO's Algorithm 1.

    python train.py                                   # MMedPO on the embedded default, under a minute on a laptop CPU
    python train.py --objective dpo                   # the paper's DPO baseline: text pairs, every weight 1
    python train.py --objective hscr                  # HSCR: self-contrastive triplets, multi-level loss
    python train.py --objective fire                  # FiRe-MPO: edited on-policy answers, 2 rounds
    python train.py --weighting none                  # ablation: MMedPO's pairs, no clinical-relevance weights
    python train.py --noise global --heatmap mask     # ablation: global noise; ground-truth masks
    torchrun --nproc_per_node=2 train.py              # data parallel (gloo on CPU, nccl on CUDA)
    python train.py --model PATH --device cuda        # a transformers LLaVA checkpoint on a GPU

Every stage writes under --out and is reused on the next run when its inputs are unchanged:
base (assets/tiny-base unless --base), pairs/OBJECTIVE.jsonl (+ PNGs, judge cache), and RUN_NAME/
(eval_before.json, ref_logps.pt, checkpoint.pt, adapter/, metrics.json, log.jsonl, pictures).
"""
import argparse
import contextlib
import hashlib
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
from mmedpo import (bidirectional_kl, fire_token_loss, fire_visual_loss, hscr_loss, mmedpo_loss, sequence_logps,
                    token_logps)


def get_parser():
    ap = argparse.ArgumentParser(description="Clinical-aware multimodal preference optimization (MMedPO, HSCR, DPO)")
    for add_flags in (run_and_model_flags, data_flags, training_flags):
        add_flags(ap.add_argument)
    return ap


def run_and_model_flags(a):
    """The run, the model, and the tiny base (`a` is an ArgumentParser's add_argument)."""
    # what is trained, and where things go
    a("--objective", default="mmedpo", choices=["sft", "dpo", "mmedpo", "hscr", "fire"],
      help="sft: the control, supervised fine-tuning on the chosen answers of MMedPO's pairs; "
           "dpo: text pairs, weights 1 (the paper's DPO baseline); mmedpo: text + visual pairs with clinical-"
           "relevance weights; hscr: self-contrastive triplets with the multi-level loss; fire: FiRe-MPO, "
           "minimally edited on-policy answers with token-level, visual and KL terms")
    a("--out", default="out", help="folder for every stage's output (reused when present)")
    a("--run-name", default=None, help="subfolder of --out for this training run (default: the objective)")
    a("--resume", action="store_true", help="continue from RUN_NAME/checkpoint.pt")
    # model
    a("--model", default=None, help="a transformers LLaVA checkpoint folder; default: the tiny built-in model")
    a("--prompt-format", default="plain",
      help="plain, vicuna (the LLaVA codebase's v1 conversation, as the MMedPO authors trained LLaVA-Med v1.5), "
           "mistral ([INST] <image>\\n{question} [/INST]), chat (the processor's chat template), "
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
    a("--n-pref", type=int, default=1000, help="synthetic images whose questions feed the preference data")
    a("--n-test", type=int, default=200, help="synthetic test images")
    a("--eval-split", default="test", choices=["test", "val"],
      help="synthetic split evaluated before and after: val to choose settings, test to report them")
    a("--sft-steps", type=int, default=3000, help="SFT warm-up steps of the tiny base (batch 32)")
    a("--sft-lr", type=float, default=2e-3)


def data_flags(a):
    """The dataset, the evaluation, and MMedPO's preference data."""
    # data and evaluation
    a("--data", default="synthetic", choices=["synthetic", "slake", "vqa-rad", "iu-xray", "mimic-cxr"], help="dataset")
    a("--data-dir", default=None, help="folder of a downloaded dataset")
    a("--max-test", type=int, default=None, help="evaluate on at most this many test items")
    a("--max-new-tokens", type=int, default=None,
      help="generation cap when evaluating; default per task: 16 synthetic, 64 Med-VQA, 256 reports")
    a("--sample-max-new-tokens", type=int, default=None,
      help="generation cap when sampling answers for pairs; default per task: 12 synthetic, 64 Med-VQA, 256 reports")
    a("--vqa-scoring", default="ours", choices=["ours", "llava-med"],
      help="ours (whole words) or llava-med (LLaVA-Med run_eval.py's substring rules, as in published tables)")
    # preference data
    a("--pairs", default=None, help="train on a released MMedPO preference file (JSON) instead of building pairs")
    a("--images", default=None, help="image folder of --pairs")
    a("--export-pairs", default=None, help="also write the pairs as {prompt, chosen, rejected, images} JSONL here")
    a("--strategies", default="text,visual", help="mmedpo: text (D_t), visual (D_v), or both")
    a("--n-text", type=int, default=512, help="questions turned into text pairs (HSCR: into triplets)")
    a("--n-visual", type=int, default=256, help="questions turned into visual pairs")
    a("--samples", type=int, default=3, help="answers sampled per question for Strategy 1")
    a("--temperature", type=float, default=1.0, help="sampling temperature for Strategy 1")
    a("--judge", "--judges", action="append", default=[], metavar="NAME=URL,model=M[,key_env=VAR]",
      help="OpenAI-compatible scoring judge (repeat, in order); default: the rule judge")
    a("--selector", default=None, metavar="NAME=URL,model=M[,key_env=VAR]",
      help="the strong LLM that selects or writes the hallucination (the paper's GPT-4o); default: the first judge")
    a("--editor", default=None, metavar="NAME=URL,model=M[,key_env=VAR]",
      help="FiRe-MPO: the LLM that minimally corrects the policy's answers; default: the offline rule editor")
    a("--workers", type=int, default=4, help="pairs scored (or answers edited) concurrently")
    a("--rounds", type=int, default=5, help="consensus rounds")
    a("--weighting", default="z", choices=list(data.WEIGHTINGS),
      help="z: the paper's Z(.) per source; raw: the score as it is (the authors' trainer on their released "
           "weighted_score); none: every weight 1")
    a("--no-crs", action="store_true", help="the same as --weighting none")
    a("--noise", default="local", choices=["local", "global"], help="lesion-localized or whole-image noise")
    a("--noise-step", type=int, default=500, help="diffusion step k of the noise, in [0, 1000)")
    a("--heatmap", default="detector", choices=["detector", "mask", "attention"],
      help="where the lesion is: the DoG detector, ground-truth masks, or the model's own attention")


def training_flags(a):
    """HSCR's free values, the optimisation, LoRA, checkpoints."""
    # FiRe-MPO (our reading of arXiv 2606.12590; these values are ours, not the paper's)
    a("--policy-rounds", type=int, default=2, help="FiRe-MPO: rounds; the policy's answers are sampled anew from "
      "the adapter being trained at the start of each (a fresh optimizer each round)")
    a("--fire-gamma", type=float, default=0.1, help="weight of the visual-contrastive term L_vis")
    a("--fire-eta", type=float, default=0.01, help="weight of the bidirectional token-wise KL term L_KL")
    a("--fire-lambda", type=float, default=0.5, help="lambda of L_KL: lambda KL(ref||pi) + (1 - lambda) KL(pi||ref)")
    # HSCR (our reading of arXiv 2506.00805; these values are ours, not the paper's)
    a("--hscr-p", type=float, default=0.7, help="fraction of image tokens hidden by visual-token dropout")
    a("--hscr-n", type=int, default=10, help="modality-coupled steps replaced for y_l2 (half of them for y_l1)")
    a("--hscr-lambda", type=float, default=1.0, help="weight of the implicit y_l1 > y_l2 term")
    # optimisation
    a("--beta", type=float, default=0.1, help="DPO temperature (the paper's alpha)")
    a("--nll-weight", type=float, default=0.0,
      help="dpo/mmedpo: add this times the chosen answer's mean token NLL (an anchor against likelihood "
           "displacement, as in RPO; not part of MMedPO)")
    a("--lr", type=float, default=1e-3, help="peak learning rate of the LoRA weights (1e-3: chosen on the synthetic "
      "val split, where 2e-4 changed nothing)")
    a("--epochs", type=int, default=3)
    a("--batch-size", type=int, default=16, help="pairs per micro-batch per process")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--warmup", type=float, default=0.03, help="warmup, as a fraction of the steps")
    a("--clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--lora-r", type=int, default=8)
    a("--lora-alpha", type=float, default=16)
    a("--lora-dropout", type=float, default=0.05)
    a("--lora-targets", default=lora.DEFAULT_TARGETS, help="regex of module names to adapt")
    a("--loader-workers", type=int, default=None, help="DataLoader workers that prefetch batches (default: 4 on CUDA, 0 on CPU)")
    a("--ckpt-every", type=int, default=50, help="checkpoint every N optimizer steps")
    a("--halt-at-step", type=int, default=None,
      help="stop after the checkpoint of step N (to split a run across sessions); continue with --resume")
    a("--seed", type=int, default=0)


def check_args(ap, args):
    finite = lambda v: v is not None and math.isfinite(v)
    bad = [(f, msg) for f, ok, msg in [
        ("--batch-size", args.batch_size >= 1, "must be >= 1"), ("--grad-accum", args.grad_accum >= 1, "must be >= 1"),
        ("--epochs", args.epochs >= 1, "must be >= 1"), ("--lr", finite(args.lr) and args.lr > 0, "must be finite and > 0"),
        ("--beta", finite(args.beta) and args.beta > 0, "must be finite and > 0"), ("--samples", args.samples >= 1, "must be >= 1"),
        ("--clip", finite(args.clip) and args.clip > 0, "must be finite and > 0"),
        ("--rounds", args.rounds >= 1, "must be >= 1"), ("--workers", args.workers >= 1, "must be >= 1"),
        ("--temperature", finite(args.temperature) and args.temperature > 0, "must be finite and > 0"),
        ("--n-text", args.n_text >= 0, "must be >= 0"), ("--n-pref", args.n_pref >= 1, "must be >= 1"), ("--n-visual", args.n_visual >= 0, "must be >= 0"),
        ("--noise-step", 0 <= args.noise_step < 1000, "must be in [0, 1000)"),
        ("--warmup", 0 <= args.warmup < 1, "must be a fraction in [0, 1)"),
        ("--lora-dropout", 0 <= args.lora_dropout < 1, "must be in [0, 1)"),
        ("--hscr-p", 0 <= args.hscr_p <= 1, "must be in [0, 1]"), ("--hscr-n", args.hscr_n >= 1, "must be >= 1"),
        ("--hscr-lambda", finite(args.hscr_lambda) and args.hscr_lambda >= 0, "must be finite and >= 0"),
        ("--policy-rounds", args.policy_rounds >= 1, "must be >= 1"),
        ("--fire-gamma", finite(args.fire_gamma) and args.fire_gamma >= 0, "must be finite and >= 0"),
        ("--fire-eta", finite(args.fire_eta) and args.fire_eta >= 0, "must be finite and >= 0"),
        ("--fire-lambda", 0 <= args.fire_lambda <= 1, "must be in [0, 1]"),
        ("--nll-weight", finite(args.nll_weight) and args.nll_weight >= 0, "must be finite and >= 0"),
        ("--strategies", set(args.strategies.split(",")) <= {"text", "visual"} and args.strategies,
         "must be text, visual or text,visual"),
        ("--image-size", args.image_size >= 8, "must be >= 8 (one 8-pixel patch)"),
        ("--max-length", args.max_length is None or args.max_length >= 8, "must be >= 8"),
        ("--max-new-tokens", args.max_new_tokens is None or args.max_new_tokens >= 1, "must be >= 1"),
        ("--sample-max-new-tokens", args.sample_max_new_tokens is None or args.sample_max_new_tokens >= 1, "must be >= 1"),
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
    if args.pairs and args.objective in ("hscr", "fire"):
        ap.error(f"--pairs holds released MMedPO pairs; --objective {args.objective} builds its own records")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    for flag, path, is_folder in [("--out", args.out, True), ("--export-pairs", args.export_pairs, False)]:
        problem = path and data.unwritable(path, is_folder)
        if problem:
            ap.error(f"{flag} {path}: {problem}")
    # resolved values
    args.run_name = args.run_name or args.objective
    if args.no_crs:
        args.weighting = "none"
    if args.objective == "dpo":  # the paper's DPO baseline: text pairs, no weights
        args.strategies, args.weighting = "text", "none"
    sample_cap, eval_cap = data.MAX_NEW_TOKENS[args.data]
    args.sample_max_new_tokens = args.sample_max_new_tokens or sample_cap
    args.max_new_tokens = args.max_new_tokens or eval_cap


# -----------------------------------------------------------------------------
# the objectives: which records are built, how many responses each holds, which loss runs on them.
# A loss adapter gets the (DDP-wrapped) model, one batch of k*B rows (response-major), the cached
# reference log-probs (B, k), the weights (B,) and the flags. It runs the forward passes it needs (an
# objective that needs the reference's full distributions runs it here, under lora.disable_lora) and
# returns per-record losses (B,) and the (B,) statistics it logs; the loop reduces and averages them.

def policy_logps(model, batch, k):
    """Summed log-probs of every response of every record in one forward: (B, k)."""
    return forward_logps(model, batch).float().view(k, -1).T


def preference_loss(model, batch, ref, weights, args):
    """MMedPO's weighted DPO (dpo and mmedpo: k = 2, chosen then rejected), plus --nll-weight times the
    chosen answer's mean token NLL when asked (an anchor against likelihood displacement; not the paper's)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    tokens, response = token_logps(logits, batch["labels"])                # (2B, T-1)
    policy = tokens.sum(-1).view(2, -1).T                                  # (B, 2)
    losses, chosen_r, rejected_r = mmedpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], weights, args.beta)
    stats = {"reward_acc": (chosen_r > rejected_r).float(), "margin": chosen_r - rejected_r}
    if args.nll_weight:
        B = ref.shape[0]
        nll = -policy[:, 0] / response[:B].sum(-1).clamp(min=1)
        losses, stats["nll"] = losses + args.nll_weight * nll, nll.detach()
    return losses, stats


def hscr_objective_loss(model, batch, ref, weights, args):
    """HSCR's multi-level loss (k = 3: y_w, y_l1, y_l2)."""
    policy = policy_logps(model, batch, 3)
    losses, m = hscr_loss(policy[:, 0], policy[:, 1], policy[:, 2], ref[:, 0], ref[:, 1], ref[:, 2], args.beta,
                          args.hscr_lambda, weights)
    return losses, {"reward_acc": (m["margin_w_l1"] > 0).float(), "margin": m["margin_w_l1"],
                    "margin_w_l2": m["margin_w_l2"], "margin_l1_l2": m["margin_l1_l2"]}


def fire_objective_loss(model, batch, ref, weights, args):
    """FiRe-MPO (k = 3: y_w on x, y_l on x, y_w on the corrupted x*): L_tok + gamma L_vis + eta L_KL.
    The token-level terms need the reference's per-token log-probs and full distributions, so the
    reference runs here, on the clean-image rows, with the adapter disabled and no grad; the cached
    sums serve L_vis exactly."""
    B = ref.shape[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits                          # (3B, T, V)
    policy, response = token_logps(logits, batch["labels"])                            # (3B, T-1)
    with torch.no_grad(), lora.disable_lora(model):
        ref_logits = model(input_ids=batch["input_ids"][:2 * B], attention_mask=batch["attention_mask"][:2 * B],
                           pixel_values=batch["pixel_values"][:2 * B]).logits            # (2B, T, V)
    ref_tok, _ = token_logps(ref_logits, batch["labels"][:2 * B])
    edit = batch["edit_mask"][:, 1:].float()                                            # aligned with the labels' shift
    l_tok, m_tok = fire_token_loss(policy[:B], ref_tok[:B], edit[:B], policy[B:2 * B], ref_tok[B:], edit[B:2 * B], args.beta)
    sums = policy.sum(-1)
    l_vis, m_vis = fire_visual_loss(sums[:B], ref[:, 0], sums[2 * B:], ref[:, 2], args.beta)
    l_kl = bidirectional_kl(logits[:B, :-1], ref_logits[:B, :-1], response[:B], args.fire_lambda)
    losses = weights * (l_tok + args.fire_gamma * l_vis + args.fire_eta * l_kl)
    return losses, {"reward_acc": (m_tok > 0).float(), "margin": m_tok, "margin_vis": m_vis,
                    "l_tok": l_tok.detach(), "l_vis": l_vis.detach(), "l_kl": l_kl.detach()}


def sft_control_loss(model, batch, ref, weights, args):
    """The control of the benchmark: supervised fine-tuning on the preference data's chosen answers only
    (mean token NLL; the rejected answers and the weights are not used). A preference objective counts as
    working only where it beats this."""
    B = ref.shape[0]
    logits = model(input_ids=batch["input_ids"][:B], attention_mask=batch["attention_mask"][:B],
                   pixel_values=batch["pixel_values"][:B]).logits
    logps, response = token_logps(logits, batch["labels"][:B])
    nll = -logps.sum(-1) / response.sum(-1).clamp(min=1)
    return nll, {"reward_acc": torch.zeros_like(nll), "margin": torch.zeros_like(nll)}


OBJECTIVES = {  # name: (record builder in data.py, loss adapter above, responses per record)
    "sft": (data.build_mmedpo_pairs, sft_control_loss, 2),
    "dpo": (data.build_mmedpo_pairs, preference_loss, 2),
    "mmedpo": (data.build_mmedpo_pairs, preference_loss, 2),
    "hscr": (data.build_hscr_pairs, hscr_objective_loss, 3),
    "fire": (data.build_fire_pairs, fire_objective_loss, 3),
}
# the flags that change what an objective's record builder makes (the pairs stage's cache key)
PAIR_FLAGS = ["objective", "model", "data", "strategies", "n_text", "n_visual", "samples", "temperature", "judge", "n_pref",
              "selector", "rounds", "weighting", "noise", "noise_step", "heatmap", "seed", "n_train", "image_size",
              "prompt_format", "pad_to_square", "sample_max_new_tokens", "hscr_p", "hscr_n", "pairs", "images", "editor"]


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


def seed_everything(seed):
    """Each stage that draws random numbers starts from the run's seed, so that whether an earlier stage
    was computed or reused from disk changes nothing after it."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def weights_stamp(path):
    """Names, sizes and modification times of a checkpoint's weight files: a change means new weights."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    return [(f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))) for f in files]


def fingerprint(obj):
    """A short hash of any JSON-able value: the key under which a stage's output is stored."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def read_json(path, log=print):
    """The JSON in `path`, or None if it is absent or unreadable (a torn write): the stage is then redone."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError) as e:
        log(f"      {path} is unreadable ({e}); recomputing it")
        return None


def write_json(path, obj, indent=None):
    """Atomically: a temporary file, then a rename, so a kill never leaves a torn file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def reuse_or_compute(key_path, key, compute, save, load, log, what):
    """The stage helper: `load()` when `key_path` holds `key` (written after the output, so a kill in
    between means 'not done'), else `value, complete = compute()`, `save(value)`, and the key is written
    only if complete. returns the value."""
    stored = read_json(key_path, log)
    if stored is not None and stored.get("key") == key:
        value = load()
        if value is not None:
            log(f"{what}: reused ({key_path})")
            return value
    if os.path.exists(key_path):
        os.remove(key_path)  # the output is about to change: an old key must never vouch for it
    value, complete = compute()
    save(value)
    if complete:
        write_json(key_path, {"key": key})
    else:
        log(f"      {what} is incomplete: it will be computed again on the next run")
    return value


def to_device(batch, device, dtype):
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def forward_logps(model, batch):
    """Summed response log-probs of every row of an encoded batch: (N,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    return sequence_logps(logits, batch["labels"])


def record_loader(dataset, batches, pad_id, workers):
    """A DataLoader over given lists of record indices (one list per micro-batch, in order). It gets a
    generator of its own: a DataLoader draws its workers' base seed from the global RNG otherwise, and
    that would shift the LoRA dropout masks whenever a loader is made (resume, a computed stage)."""
    from functools import partial
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       collate_fn=partial(data.collate_records, pad_id=pad_id),
                                       generator=torch.Generator().manual_seed(0))


# -----------------------------------------------------------------------------
# the tiny base model: tokenizer, processor and LLaVA built from config, then an SFT warm-up

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
# the stages of a run, in order (Algorithm 1); `main` below calls them one after the other

def stage_data(args, pairs_dir, log):
    """(SFT items, preference items, test items, image store, tokenizer corpus). Synthetic: three splits
    (the SFT split's presence prior is skewed; the preference and test splits break it). A real dataset:
    its train split serves both SFT-style priors and preference data."""
    if args.data == "synthetic":
        train_images, train_qa = data.make_synthetic(args.n_train, args.seed, args.image_size, "train")
        pref_images, pref_qa = data.make_synthetic(args.n_pref, args.seed, args.image_size, "pref")
        test_images, test_qa = data.make_synthetic(args.n_test, args.seed, args.image_size, args.eval_split)
        store = data.SyntheticStore(train_images + pref_images + test_images, os.path.join(pairs_dir, "images"))
        corpus = [data.PROMPT_FORMATS["plain"].format(question=q["question"]).replace("<image>", "") + " " + q["answer"]
                  for q in train_qa] + [im["report"] for im in train_images]
    else:
        train_qa, store = data.LOADERS[args.data](args.data_dir, "train", log)
        test_qa, test_store = data.LOADERS[args.data](args.data_dir, "test", log)
        store.masks.update(test_store.masks)
        pref_qa, corpus = train_qa, None
    return train_qa, pref_qa, test_qa[:args.max_test] if args.max_test else test_qa, store, corpus


def stage_base(args, corpus, store, train_qa, master, world, log):
    """[1] The base model's folder: --model, or the tiny LLaVA (built and SFT-warmed once, then reused)."""
    base_path = args.model or args.base
    if not args.model and (args.rebuild_base or not os.path.exists(os.path.join(base_path, "config.json"))):
        if master:
            log(f"[1/6] building the tiny base model (SFT warm-up, {args.sft_steps} steps) -> {base_path}")
            seed_everything(args.seed)
            model, processor = build_tiny(corpus, args.image_size)
            sft(model, processor, train_qa, store.pil, args.sft_steps, args.sft_lr, args.seed, log=log)
            model.save_pretrained(base_path)
            processor.save_pretrained(base_path)
        barrier(world)
    else:
        log(f"[1/6] base model: {base_path} (reused)")
    return base_path


def load_model(base_path, args, device, dtype):
    """(model in eval mode on `device`, processor, max_length) of a saved checkpoint folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    if not any(os.path.exists(os.path.join(base_path, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        sys.exit(f"{base_path}: no processor files (preprocessor_config.json); save the processor with the model")
    processor = AutoProcessor.from_pretrained(base_path, trust_remote_code=args.trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype, trust_remote_code=args.trust_remote_code)
    try:
        data.check_prompt_format(args.prompt_format, processor)
    except ValueError as e:
        sys.exit(f"{base_path}: {e}")
    max_length = args.max_length or getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return model.to(device).eval(), processor, max_length


def stage_records(args, model, processor, base_path, pref_qa, store, pairs_dir, run_dir, device, master, world, log):
    """[2] The objective's preference records with their weights (pairs, or HSCR triplets), built by the
    target model, or read from a released MMedPO file (--pairs). returns (records, n_skipped)."""
    if args.pairs:
        path = os.path.join(run_dir, "pairs.jsonl")
        if master:
            log(f"[2/6] released preference pairs: {args.pairs}")
            try:
                released, _ = data.read_released_pairs(args.pairs, args.images, log)
            except ValueError as e:
                sys.exit(f"--pairs {e}")
            data.write_jsonl(path, data.assign_weights(released, args.weighting, log))
    else:
        path = os.path.join(pairs_dir, f"{args.objective}.jsonl")
        key = fingerprint({**{k: getattr(args, k) for k in PAIR_FLAGS}, "weights": weights_stamp(base_path)})
        build = OBJECTIVES[args.objective][0]

        def compute():
            log(f"[2/6] building {args.objective} preference data -> {path}")
            seed_everything(args.seed)
            import score
            try:
                records, complete = build(model, processor, args, pref_qa, store, pairs_dir, device, log)
            except score.JudgeAuthError as e:
                sys.exit(f"judge: {e}")
            return records, complete and bool(records)
        if master:
            reuse_or_compute(path + ".key.json", key, compute, lambda recs: data.write_jsonl(path, recs),
                             lambda: path if os.path.exists(path) else None, log, f"[2/6] {args.objective} preference data")
    barrier(world)
    try:
        records, skipped = data.read_pairs(path, log)
    except ValueError as e:
        sys.exit(str(e))
    if not records:
        sys.exit(f"{path}: no usable preference records")
    if master and args.export_pairs:
        data.export_pairs(records, args.export_pairs)
        log(f"      exported {len(records)} records to {args.export_pairs}")
    for source in sorted({r["source"] for r in records}):
        ws = [r["weight"] for r in records if r["source"] == source]
        log(f"      {source}: {len(ws)} records, weights mean {np.mean(ws):.3f} min {min(ws):.3f} max {max(ws):.3f}")
    return records, skipped


def stage_next_round(args, model, processor, pref_qa, store, pairs_dir, run_dir, device, r, master, world, log):
    """FiRe-MPO round r > 0: the records built from the answers of the adapter being trained, written to
    RUN_NAME/fire_round{r}.jsonl (with their token masks) for a reader to see. returns (records, n_skipped)."""
    path = os.path.join(run_dir, f"fire_round{r}.jsonl")
    if master:
        log(f"[2/6] round {r + 1}/{args.policy_rounds}: new answers from the adapter -> {path}")
        records, _ = data.build_fire_pairs(model, processor, args, pref_qa, store, pairs_dir, device, log, round_index=r)
        data.write_jsonl(path, records)
    barrier(world)
    records, skipped = data.read_pairs(path, log)
    if not records:
        sys.exit(f"{path}: the adapter answered every question right; nothing left to edit")
    return records, skipped


def stage_eval_before(args, model, processor, base_path, test_qa, image_of, prior, run_dir, master, world, log):
    """[3] The base model (no adapter) on the test split; reused while the model and settings stay."""
    from eval import evaluate
    path = os.path.join(run_dir, "eval_before.json")
    key = fingerprint({"model": os.path.abspath(base_path), "weights": weights_stamp(base_path), "data": args.data,
                       "test": [it["id"] for it in test_qa], "prompt_format": args.prompt_format,
                       "pad": args.pad_to_square, "max_new_tokens": args.max_new_tokens, "scoring": args.vqa_scoring,
                       "stores": "metrics and predictions"})

    def compute():
        log(f"[3/6] evaluating the base model on {len(test_qa)} test questions")
        result, predictions = evaluate(model, processor, test_qa, image_of, prior, args.prompt_format, log=log,
                                       max_new_tokens=args.max_new_tokens, scoring=args.vqa_scoring)
        return {"metrics": result, "predictions": predictions}, True
    if master:
        reuse_or_compute(path + ".key.json", key, compute, lambda m: write_json(path, m),
                         lambda: read_json(path, log), log, "[3/6] evaluation of the base model")
    barrier(world)
    stored = read_json(path, log)
    return stored["metrics"], stored["predictions"]


def add_adapter(args, model, device, log):
    """[4] LoRA on the language model (seeded: its initialisation, then the dropout masks, draw from the
    run's seed and nothing draws before training), gradient checkpointing on CUDA. returns the
    training image loader (PIL, as the model sees it; a bounded cache)."""
    seed_everything(args.seed)
    names = lora.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    if args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and device.type == "cuda"):
        # recompute activations in the backward pass; only in train mode, so the no-grad reference pass is unaffected
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log(f"[4/6] LoRA r={args.lora_r} alpha={args.lora_alpha} on {len(names)} layers "
        f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters)")
    cache = {}

    def load_image(path):  # 8-bit grayscale survives the float round trip exactly
        if path not in cache:
            if len(cache) > 4096:  # bounded: a real dataset's images do not all fit in memory
                cache.clear()
            cache[path] = data.image_for_model(data.to_pil(data.load_image(path)), args.pad_to_square)
        return cache[path]
    return load_image


def stage_reference(args, model, processor, base_path, records, dataset, run_dir, device, dtype, rank, world, log,
                    tag=""):
    """[4] log pi_ref of every response of every record, (N, k), with the adapter disabled and no grad,
    once. Stored as a plain tensor file (loaded with weights_only=True, so it can never run code)."""
    path = os.path.join(run_dir, f"ref_logps{tag}.pt")
    k = OBJECTIVES[args.objective][2]
    key = fingerprint({"model": os.path.abspath(base_path), "weights": weights_stamp(base_path), "k": k,
                       "records": [data.record_rows(r) + [r["prompt"]] for r in records], "dtype": str(dtype),
                       "prompt_format": args.prompt_format, "pad": args.pad_to_square, "max_length": dataset.max_length})
    stored = load_tensors(path, log)
    if stored is not None and stored.get("key") == key:
        return stored["logps"]
    log(f"      reference log-probs for {len(records)} records x {k} responses (adapter disabled, no grad)")
    mine = list(range(rank, len(records), world))
    batches = [mine[i:i + 2 * args.batch_size] for i in range(0, len(mine), 2 * args.batch_size)]
    out = []
    with torch.no_grad(), lora.disable_lora(model):
        for batch in record_loader(dataset, batches, processor.tokenizer.pad_token_id, args.loader_workers):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(policy_logps(model, to_device(batch, device, dtype), k).cpu())
    logps = torch.cat(out)
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, logps)
        logps = torch.zeros(len(records), k)
        for r, part in enumerate(parts):
            logps[r::world] = part
    if rank == 0:
        save_tensors({"key": key, "logps": logps}, path)
    return logps


def save_tensors(obj, path):
    """torch.save of tensors and plain values only, atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_tensors(path, log=print):
    """A file written by save_tensors, read with weights_only=True: a pickle that would run code, or a
    torn file, is refused with a message and treated as absent."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for planted code, RuntimeError/EOFError for a torn file
        log(f"      {path} is not a plain tensor file and was not loaded ({type(e).__name__}: {str(e)[:160]})")
        return None


RESUME_FLAGS = ["objective", "lr", "beta", "epochs", "batch_size", "grad_accum", "warmup", "clip", "lora_r",
                "lora_alpha", "lora_dropout", "lora_targets", "seed", "hscr_lambda", "policy_rounds", "fire_gamma",
                "fire_eta", "fire_lambda", "nll_weight"] + PAIR_FLAGS


def load_checkpoint(path, args, model, opt, records, rank, world, log):
    """(step, history) from a checkpoint after checking that it was made with the same settings and the
    same records; restores the adapter, the optimizer and this process's RNG."""
    ck = load_tensors(path, log)
    if ck is None:
        sys.exit(f"--resume: {path} cannot be read as a checkpoint of this project; start a new --run-name")
    changed = [f"--{k.replace('_', '-')} {ck['config'].get(k)} -> {getattr(args, k)}" for k in RESUME_FLAGS
               if ck["config"].get(k) != getattr(args, k)]
    if ck["config"].get("world", world) != world:
        changed.append(f"processes {ck['config'].get('world')} -> {world}")
    if ck.get("records") != fingerprint([data.record_rows(r) for r in records]):
        changed.append("the preference records differ")
    if changed:
        sys.exit(f"--resume: {path} was written with other settings: {'; '.join(changed)}. "
                 f"Resume with the same flags, or start a new --run-name.")
    with torch.no_grad():
        for name, m in lora.lora_layers(model):
            m.lora_A.weight.copy_(ck["lora"][f"{name}.lora_A.weight"])
            m.lora_B.weight.copy_(ck["lora"][f"{name}.lora_B.weight"])
    opt.load_state_dict(ck["optimizer"])
    rng = ck["rng"][rank]
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["step"], ck["history"]


def save_checkpoint(path, args, model, opt, records, step, history, world, master):
    """Adapter, optimizer, step, history, every process's RNG and the config: tensors and plain values."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    states = [rng]
    if world > 1:  # each process's own generator (dropout masks differ between ranks)
        states = [None] * world
        torch.distributed.all_gather_object(states, rng)
    if master:
        save_tensors({"lora": {k: v.cpu() for k, v in lora.lora_state_dict(model).items()}, "optimizer": opt.state_dict(),
                      "step": step, "history": history, "rng": states, "config": {**vars(args), "world": world},
                      "records": fingerprint([data.record_rows(r) for r in records])}, path)
    barrier(world)


def micro_batches(n_records, step, global_batch, batch_size, grad_accum, rank, world, seed):
    """This process's micro-batches (lists of record indices) of optimizer step `step`: a fresh seeded
    permutation each epoch, the step's slice of it, this process's share, cut into `grad_accum` parts."""
    steps_per_epoch = n_records // global_batch
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    idx = perm[i * global_batch:(i + 1) * global_batch]
    mine = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world].tolist()
    return [mine[m * batch_size:(m + 1) * batch_size] for m in range(grad_accum)]


def stage_train(args, model, processor, records, dataset, ref, run_dir, device, dtype, rank, world, log, tag=""):
    """[5] The objective on LoRA: AdamW, warmup + cosine, clipping, one forward per micro-batch for all
    k responses of its records, checkpoints every --ckpt-every steps. returns (history, finished)."""
    master, loss_fn = rank == 0, OBJECTIVES[args.objective][1]
    global_batch = args.batch_size * args.grad_accum * world
    if len(records) < global_batch:
        sys.exit(f"{len(records)} records are fewer than one global batch ({global_batch}); lower --batch-size")
    total = len(records) // global_batch * args.epochs
    warmup = max(1, int(args.warmup * total))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    weights = torch.tensor([r["weight"] for r in records], dtype=torch.float32)
    ckpt_path, log_path, start, history = (os.path.join(run_dir, f"checkpoint{tag}.pt"),
                                           os.path.join(run_dir, f"log{tag}.jsonl"), 0, [])
    if args.resume and os.path.exists(ckpt_path):
        start, history = load_checkpoint(ckpt_path, args, model, opt, records, rank, world, log)
        log(f"      resumed from {ckpt_path} at step {start}/{total}")
    elif args.resume:
        log(f"      --resume: no {ckpt_path}, starting fresh")
    if master:  # the log holds exactly the steps of `history` (a resumed run drops the lost steps' lines)
        data.write_jsonl(log_path, history)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log(f"[5/6] {args.objective}: {len(records)} records, {args.epochs} epochs x {total // args.epochs} steps, "
        f"global batch {global_batch}, lr {args.lr}, beta {args.beta}")
    plan = [mb for step in range(start, total) for mb in micro_batches(len(records), step, global_batch, args.batch_size,
                                                                        args.grad_accum, rank, world, args.seed)]
    batches = iter(record_loader(dataset, plan, processor.tokenizer.pad_token_id, args.loader_workers))
    model.train()
    t0 = time.time()
    for step in range(start, total):
        lr = get_lr(step, args.lr, warmup, total)
        for group in opt.param_groups:
            group["lr"] = lr
        t_step, sums = time.time(), {}
        mbs = micro_batches(len(records), step, global_batch, args.batch_size, args.grad_accum, rank, world, args.seed)
        for micro, mb in enumerate(mbs):
            batch = to_device(next(batches), device, dtype)
            sync = world == 1 or micro == args.grad_accum - 1  # DDP all-reduces gradients on the last micro-batch only
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), \
                    (contextlib.nullcontext() if sync else ddp.no_sync()):
                losses, stats = loss_fn(ddp, batch, ref[mb].to(device), weights[mb].to(device), args)
                (losses.mean() / args.grad_accum).backward()
            for name, v in [("loss", losses.detach())] + list(stats.items()):
                sums[name] = sums.get(name, 0.0) + v.sum().item()
            sums["n"] = sums.get("n", 0) + len(mb)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        if not all(math.isfinite(v) for v in sums.values()) or not torch.isfinite(grad_norm):
            bad = [records[j]["id"] for mb in mbs for j in mb]
            sys.exit(f"step {step + 1}: non-finite loss or gradient (records {bad[:8]}); nothing of this step is "
                     f"saved. Lower --lr or --beta, or check these records' weights.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = log_step(sums, step, total, lr, grad_norm, time.time() - t_step, t0, start, global_batch, world, log)
        history.append(rec)
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == total or step + 1 == args.halt_at_step:
            save_checkpoint(ckpt_path, args, model, opt, records, step + 1, history, world, master)
        if args.halt_at_step is not None and step + 1 == args.halt_at_step and step + 1 < total:
            log(f"halting after step {step + 1} as asked (--halt-at-step); continue with --resume")
            return history, False
    model.eval()
    return history, True


def log_step(sums, step, total, lr, grad_norm, dt, t0, start, global_batch, world, log):
    """One line per step (averages over the global batch), and the record that goes to log.jsonl."""
    if world > 1:
        names = sorted(sums)
        t = torch.tensor([sums[n] for n in names], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        sums = dict(zip(names, t.tolist()))
    n = sums.pop("n")
    rec = {"step": step + 1, **{name: v / n for name, v in sums.items()}, "lr": lr, "grad_norm": float(grad_norm),
           "ms": dt * 1000}
    eta = (time.time() - t0) / (step + 1 - start) * (total - step - 1)
    extra = "".join(f" | {name.removeprefix('margin_')} {rec[name]:+.3f}" for name in sums
                    if name not in ("loss", "reward_acc", "margin"))
    log(f"step {step + 1:4d}/{total} | loss {rec['loss']:.4f} | acc {rec['reward_acc']:.2f} | margin "
        f"{rec['margin']:+.3f}{extra} | lr {lr:.2e} | {rec['ms']:.0f} ms | {global_batch / dt:.0f} records/s | ETA {eta:.0f}s")
    return rec


def stage_report(args, model, processor, records, skipped, history, before, test_qa, image_of, prior, store,
                 run_dir, base_path, device, t_start, log):
    """[6] Adapter (PEFT format), evaluation after, metrics.json, predictions, pictures, the table."""
    from eval import evaluate, format_table, save_attention_figure, save_curves, save_examples, save_noise_grid
    before, before_preds = before
    lora.save_adapter(model, os.path.join(run_dir, "adapter"), base_model_name_or_path=os.path.abspath(base_path))
    log(f"[6/6] evaluating with the adapter; adapter saved to {os.path.join(run_dir, 'adapter')}")
    after, preds = evaluate(model, processor, test_qa, image_of, prior, args.prompt_format, log=log,
                            max_new_tokens=args.max_new_tokens, scoring=args.vqa_scoring)
    metrics = {"objective": args.objective, "before": before, "after": after, "prior": after["prior"], "seed": args.seed,
               "records": {s: sum(r["source"] == s for r in records) for s in sorted({r["source"] for r in records})},
               "skipped_records": skipped, "steps": len(history), "final_train": history[-1] if history else None,
               "seconds": time.time() - t_start, "config": vars(args)}
    write_json(os.path.join(run_dir, "metrics.json"), metrics, indent=1)
    data.write_jsonl(os.path.join(run_dir, "predictions.jsonl"), [{**it, "prediction_before": b, "prediction": p}
                                                                  for it, b, p in zip(test_qa, before_preds, preds)])
    lesion_items = ([it for it in test_qa if it["qtype"] == "where"] or test_qa)[:4]
    pictures = [("noise_grid.png", lambda p: save_noise_grid(records, p)), ("curves.png", lambda p: save_curves(history, p)),
                ("attention.png", lambda p: save_attention_figure(model, processor, lesion_items, store.pixels,
                                                                  args.prompt_format, device, p)),
                ("examples.png", lambda p: save_examples(test_qa, before_preds, preds, prior, store.pixels, p))]
    for name, draw in pictures:  # a picture that cannot be drawn never costs the finished run
        try:
            draw(os.path.join(run_dir, name))
        except Exception as e:
            log(f"      {name} not drawn ({type(e).__name__}: {e})")
    log("\n" + format_table({"answer prior": after["prior"], "before": before, "after": after}))
    log(f"\ndone in {time.time() - t_start:.0f}s; metrics in {os.path.join(run_dir, 'metrics.json')}")


def main(argv=None):
    ap = get_parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    rank, world, device = setup_distributed(args.device)
    master, t_start = rank == 0, time.time()
    log = print if master else (lambda *a, **k: None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    args.loader_workers = args.loader_workers if args.loader_workers is not None else 4 * (device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    run_dir, pairs_dir = os.path.join(args.out, args.run_name), os.path.join(args.out, "pairs")
    for folder in (run_dir, pairs_dir):
        os.makedirs(folder, exist_ok=True)
    from eval import answer_prior

    train_qa, pref_qa, test_qa, store, corpus = stage_data(args, pairs_dir, log)
    base_path = stage_base(args, corpus, store, train_qa, master, world, log)
    if args.base_only:
        return
    model, processor, max_length = load_model(base_path, args, device, dtype)
    records, skipped = stage_records(args, model, processor, base_path, pref_qa, store, pairs_dir, run_dir, device,
                                     master, world, log)
    image_of = lambda it: data.image_for_model(store.pil(it["image_id"]), args.pad_to_square)
    prior = answer_prior(train_qa)
    before, before_preds = stage_eval_before(args, model, processor, base_path, test_qa, image_of, prior, run_dir,
                                             master, world, log)

    load_image = add_adapter(args, model, device, log)
    rounds = args.policy_rounds if args.objective == "fire" else 1
    history, trunc = [], {}
    for r in range(rounds):  # FiRe-MPO: each round answers with the adapter as it is, then trains on the edits
        tag = f"_round{r}" if rounds > 1 else ""
        if r > 0:
            records, skipped = stage_next_round(args, model, processor, pref_qa, store, pairs_dir, run_dir, device,
                                                r, master, world, log)
        dataset = data.RecordDataset(records, processor, load_image, args.prompt_format, max_length, trunc,
                                     cache_pixels=args.data == "synthetic")
        ref = stage_reference(args, model, processor, base_path, records, dataset, run_dir, device, dtype, rank, world,
                              log, tag)
        round_history, finished = stage_train(args, model, processor, records, dataset, ref, run_dir, device, dtype,
                                              rank, world, log, tag)
        history += round_history
        if not finished:
            break
    if trunc.get("truncated"):
        log(f"      {trunc['truncated']} rows had their prompt truncated to fit {max_length} tokens, "
            f"{trunc.get('response_truncated', 0)} of them their response too")
    if finished and master:
        stage_report(args, model, processor, records, skipped, history, (before, before_preds), test_qa, image_of, prior, store,
                     run_dir, base_path, device, t_start, log)
    barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
