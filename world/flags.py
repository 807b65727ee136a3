"""The command line of train.py: the flags beyond the ~20 a learner turns (those stand at train.py's top),
and the checks that stop a bad value at start-up, naming the flag, before anything is loaded.
`python train.py --help` prints every flag.

Numbers are checked by their argparse type (finite, in range); paths, judge specs and combinations by
`check_args`, which also resolves the derived values (the run name, DPO's settings, generation caps).

    python train.py --help

Tests:  python -m pytest -q tests/guard
"""
import argparse
import math
import os

import torch

from guard import checkpoint
import data
import lora
from world import real_data
import score


def number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite int or float within [lo, hi] (open ends where asked)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and (v >= hi if hi_open else v > hi)):
            rng = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {rng}")
        return v
    parse.__name__ = kind.__name__
    return parse


POS_INT, NONNEG_INT, POS, NONNEG = number(int, 1), number(int, 0), number(float, 0, lo_open=True), number(float, 0)
FRACTION, OPEN_FRACTION = number(float, 0, 1), number(float, 0, 1, hi_open=True)


OBJECTIVE_HELP = {
    "sft": "the control, SFT on the chosen answers of MMedPO's pairs",
    "oracle": "the instrument's check: SFT on the preference split's presence questions with their TRUE answers, balanced",
    "lean": "the instrument's other check: the oracle's questions, every answer 'yes' (must not raise pair order)",
    "dpo": "text pairs, weights 1 (the paper's baseline)", "mmedpo": "text + visual pairs with clinical-relevance weights",
    "hscr": "self-contrastive triplets", "fire": "FiRe-MPO, minimally edited on-policy answers"}


def parse_args(argv=None, objectives=None, learner_flags=None):
    """The flags, checked. `objectives` (train.OBJECTIVES) names the choices of --objective and what each
    implies; `learner_flags` (train.LEARNER_FLAGS: (names, keywords) pairs) are the flags a first run turns, shown first."""
    ap = get_parser(objectives or OBJECTIVE_HELP, learner_flags)
    args = ap.parse_args(argv)
    check_args(ap, args, objectives)
    return args


def get_parser(objectives=OBJECTIVE_HELP, learner_flags=None):
    ap = argparse.ArgumentParser(description="Clinical-aware multimodal preference optimization (MMedPO, HSCR, FiRe-MPO)",
                                 usage="python train.py [--objective NAME] [--out DIR] [FLAG ...]   (the flags most "
                                       "runs need come first below)")
    common = ap.add_argument_group("the flags most runs need (train.py's top)")
    common.add_argument("--objective", default="mmedpo", choices=list(objectives),
                        help="; ".join(f"{name}: {OBJECTIVE_HELP.get(name, '')}" for name in objectives))
    for names, keywords in learner_flags or ():
        common.add_argument(*names, **keywords)
    for title, add_flags in (("run, model and the tiny base", run_and_model_flags), ("data and evaluation", data_flags),
                             ("preference data, scores, HSCR and FiRe-MPO", preference_flags),
                             ("optimisation, LoRA and checkpoints", optimisation_flags)):
        add_flags(ap.add_argument_group(title).add_argument)
    return ap


def run_and_model_flags(a):
    """The run, the model, and the tiny base (`a` is an ArgumentParser's add_argument)."""
    # where things go
    # model
    a("--pad-to-square", action="store_true", help="pad images to a square (LLaVA's preprocessing) before the processor")
    a("--trust-remote-code", action="store_true", help="allow a checkpoint's own code (off unless asked)")
    a("--grad-ckpt", default="auto", choices=["auto", "on", "off"], help="gradient checkpointing; auto: on CUDA")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on CUDA, fp32 on CPU")
    a("--max-length", type=number(int, 8), default=None, help="prompt+response tokens (default: the model's context)")
    # the tiny base model (only without --model): built once (vision pretraining, then the SFT warm-up), then reused
    a("--base", default="assets/tiny-base", help="folder of the tiny base model (reused if present, else built)")
    a("--rebuild-base", action="store_true", help="build the tiny base again even if --base exists")
    a("--base-only", action="store_true", help="stop after building the base model")
    a("--image-size", type=number(int, 8), default=32, help="synthetic image size (32 px = 16 image tokens)")
    a("--n-train", type=POS_INT, default=2000, help="synthetic SFT images (and the answer prior)")
    a("--n-pref", type=POS_INT, default=1000, help="synthetic images whose questions feed the preference data")
    a("--n-test", type=POS_INT, default=200, help="synthetic test images")
    a("--eval-split", default="test", choices=["test", "val"], help="val to choose settings, test to report them")
    a("--sft-steps", type=POS_INT, default=3000, help="SFT warm-up steps of the tiny base (batch 32)")
    a("--sft-lr", type=POS, default=2e-3)


def data_flags(a):
    """The dataset and the evaluation."""
    a("--max-test", type=POS_INT, default=None, help="evaluate on at most this many test items (default: all)")
    a("--max-new-tokens", type=POS_INT, default=None,
      help="generation cap when evaluating; default per task: 48 synthetic, 64 Med-VQA, 256 reports")
    a("--sample-max-new-tokens", type=POS_INT, default=None,
      help="generation cap when sampling answers for pairs; default per task: 48 synthetic, 64 Med-VQA, 256 reports")
    a("--vqa-scoring", default="ours", choices=["ours", "llava-med"],
      help="ours (whole words) or llava-med (LLaVA-Med run_eval.py's substring rules, as in published tables)")


def preference_flags(a):
    """MMedPO's preference data and scores; HSCR's and FiRe-MPO's free values."""
    a("--pairs", default=None, help="train on a released MMedPO preference file (JSON) instead of building pairs")
    a("--images", default=None, help="image folder of --pairs")
    a("--export-pairs", default=None, help="also write the pairs as {prompt, chosen, rejected, images} JSONL here")
    a("--n-text", type=NONNEG_INT, default=512, help="questions turned into text pairs (HSCR, FiRe-MPO: their records)")
    a("--n-visual", type=NONNEG_INT, default=256, help="questions turned into visual pairs")
    a("--samples", type=POS_INT, default=3, help="answers sampled per question for Strategy 1")
    a("--temperature", type=POS, default=1.0, help="sampling temperature for Strategy 1")
    a("--selector", default=None, metavar="NAME=URL,model=M[,key_env=VAR]",
      help="the strong LLM that selects or writes the hallucination (the paper's GPT-4o); default: the first judge")
    a("--editor", default=None, metavar="NAME=URL,model=M[,key_env=VAR]",
      help="FiRe-MPO: the LLM that minimally corrects the policy's answers; default: the offline rule editor")
    a("--workers", type=POS_INT, default=4, help="pairs scored (or answers edited) concurrently")
    a("--rounds", type=POS_INT, default=5, help="consensus rounds")
    a("--no-crs", action="store_true", help="the same as --weighting none")
    a("--noise", default="local", choices=["local", "global"], help="lesion-localized or whole-image noise")
    a("--noise-step", type=number(int, 0, 1000, hi_open=True), default=500,
      help="diffusion step k of the noise, in [0, 1000); the README's sweep chose it on the val split")
    a("--visual-items", default="balanced", choices=["balanced", "random"],
      help="which questions get visual pairs: as evenly as possible over the finding each is about, or drawn at "
           "random (chosen on the val split: docs/study.md)")
    a("--visual-check", default="drop", choices=["drop", "keep"],
      help="a visual pair whose noise does not lower the visual tool's probability of its finding: left out, or "
           "kept (chosen on the val split: docs/study.md)")
    a("--visual-score", default="confidence", choices=["confidence", "coverage"],
      help="a visual pair's score: the visual tool's confidence (the paper), or coverage, an ORACLE: how much of "
           "the true lesion the noise covers")
    # FiRe-MPO (its authors' code's defaults) and HSCR (our reading; these values are ours)
    a("--policy-rounds", type=POS_INT, default=2, help="FiRe-MPO: rounds; the answers are sampled anew from the adapter "
      "at the start of each (a fresh optimizer each round; the reference stays the base; rounds are ours)")
    a("--fire-visual", default="corrupted", choices=["corrupted", "v1", "v2"],
      help="FiRe-MPO's visual pair: (v*, y_l) > (v*, y_w), the authors' default; or their ablations v1 "
           "(v, y_w) > (v*, y_w) and v2 (v, y_w) > (v*, y_l)")
    a("--fire-gamma", type=NONNEG, default=0.1, help="FiRe-MPO: gamma, the visual pair's weight")
    a("--fire-alpha", type=NONNEG, default=0.01, help="FiRe-MPO: alpha, the weight of the token-wise KL (summed over "
      "the chosen answer's edited tokens)")
    a("--fire-lambda", type=FRACTION, default=0.5, help="FiRe-MPO: L_KL = lambda KL(ref||pi) + (1 - lambda) KL(pi||ref)")
    a("--hscr-p", type=FRACTION, default=0.7, help="y_l1: fraction of image tokens hidden by visual-token dropout")
    a("--hscr-share", type=number(float, 0, 1, lo_open=True), default=0.34,
      help="y_l1: the share of the greedy answer's steps it may replace (the most image-coupled ones)")
    a("--hscr-p2", type=FRACTION, default=1.0, help="y_l2: the dropout of the image-blind answer (>= --hscr-p)")
    a("--hscr-lambda", type=NONNEG, default=1.0, help="weight of the implicit y_l1 > y_l2 term")


def optimisation_flags(a):
    """The optimisation, LoRA, checkpoints."""
    a("--nll-weight", type=NONNEG, default=0.0, help="dpo/mmedpo: add this times the chosen answer's mean token NLL "
      "(RPO's remedy for likelihood displacement; not part of MMedPO)")
    a("--anchor-weight", type=NONNEG, default=0.0, help="dpo/mmedpo: add this times -log s(beta (log pi(y_w) - log "
      "ref(y_w))), mDPO's anchor that keeps the chosen reward above 0 (not part of MMedPO)")
    a("--grad-accum", type=POS_INT, default=1, help="micro-batches per optimizer step")
    a("--warmup", type=OPEN_FRACTION, default=0.03, help="warmup, as a fraction of the steps")
    a("--clip", type=POS, default=1.0, help="gradient-norm clipping")
    a("--lora-alpha", type=POS, default=16)
    a("--lora-dropout", type=OPEN_FRACTION, default=0.05)
    a("--lora-targets", default=lora.DEFAULT_TARGETS, help="regex of module names to adapt")
    a("--loader-workers", type=NONNEG_INT, default=None, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    a("--ckpt-every", type=POS_INT, default=50, help="checkpoint every N optimizer steps")
    a("--halt-at-step", type=POS_INT, default=None,
      help="stop after the checkpoint of step N (to split a run across sessions); continue with --resume")


def check_args(ap, args, objectives=None):
    """What argparse's types cannot see: combinations, paths, specs. Resolves the derived values; an
    objective's `overrides` set their flags, and one without `released_pairs` refuses --pairs."""
    objective = (objectives or {}).get(args.objective)
    if set(args.strategies.split(",")) - {"text", "visual"} or not args.strategies:
        ap.error(f"--strategies {args.strategies}: must be text, visual or text,visual")
    for flag, specs in (("--judge", args.judge), ("--selector", [args.selector]), ("--editor", [args.editor])):
        for spec in filter(None, specs):
            try:
                score.parse_judge(spec, flag)
            except argparse.ArgumentTypeError as e:
                ap.error(str(e))
    if args.model and not os.path.isdir(args.model):
        ap.error(f"--model {args.model}: no such folder (download the checkpoint and pass its local path)")
    if args.data != "synthetic" and not args.data_dir:
        ap.error(f"--data {args.data} needs --data-dir: {real_data.DOWNLOAD_HINTS[args.data]}")
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
    args.heatmap = args.heatmap or ("classifier" if args.data == "synthetic" and not args.pairs else "detector")
    if args.heatmap == "classifier" and args.data != "synthetic":
        ap.error(f"--heatmap classifier: --data {args.data} has no labelled training images to train it on; "
                 f"use detector, mask or attention")
    if args.hscr_p2 < args.hscr_p:
        ap.error(f"--hscr-p2 {args.hscr_p2} must be >= --hscr-p {args.hscr_p}: y_l2 is the blinder level")
    if args.pairs and objective is not None and not objective.released_pairs:
        ap.error(f"--pairs holds released MMedPO pairs; --objective {args.objective} builds its own records")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    args.out = os.path.abspath(args.out)  # records name their images by path: one --out, however it is written
    args.run_name = args.run_name or args.objective
    if args.run_name in (".", "..", "pairs") or os.sep in args.run_name or not args.run_name.strip():
        ap.error(f"--run-name {args.run_name!r}: a plain folder name inside --out (not '.', '..', 'pairs', no '/')")
    for flag, path, is_folder in [("--out", args.out, True), ("--export-pairs", args.export_pairs, False)]:
        problem = path and checkpoint.unwritable(path, is_folder)
        if problem:
            ap.error(f"{flag} {path}: {problem}")
    if args.export_pairs:  # an output never replaces an input or a stage file
        inputs = [("--pairs", args.pairs, False), ("--images", args.images, True), ("--data-dir", args.data_dir, True),
                  ("--model", args.model, True), ("--base", args.base, True),
                  ("a stage folder", os.path.join(args.out, "pairs"), True),
                  ("the run folder", os.path.join(args.out, args.run_name), True)]
        for what, path, folder in inputs:
            if path and (inside(args.export_pairs, path) if folder else os.path.realpath(args.export_pairs) == os.path.realpath(path)):
                ap.error(f"--export-pairs {args.export_pairs}: lies in {what} {path}; an output must not replace an input")
        why = checkpoint.guarded_output(args.export_pairs)       # another run's folder, adapter or stage file
        if why:
            ap.error(f"--export-pairs {args.export_pairs}: {why}; an output must not replace another run's file")
    if args.no_crs:
        args.weighting = "none"
    for flag, value in getattr(objective, "overrides", ()):  # dpo, the paper's baseline: text pairs, no weights
        setattr(args, flag, value)
    args.lr = args.lr or getattr(objective, "lr", 1e-3)
    sample_cap, eval_cap = data.MAX_NEW_TOKENS[args.data]
    args.sample_max_new_tokens = args.sample_max_new_tokens or sample_cap
    args.max_new_tokens = args.max_new_tokens or eval_cap


def inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


PAIR_FLAGS = ["objective", "model", "data", "data_dir", "strategies", "n_text", "n_visual", "samples", "temperature",
              "judge", "n_pref", "selector", "rounds", "weighting", "noise", "noise_step", "heatmap", "visual_score", "visual_items", "visual_check", "seed",
              "n_train", "image_size", "prompt_format", "pad_to_square", "sample_max_new_tokens", "hscr_p", "hscr_p2", "hscr_share",
              "pairs", "images", "editor"]


RESUME_FLAGS = PAIR_FLAGS + ["lr", "beta", "epochs", "batch_size", "grad_accum", "warmup", "clip", "lora_r", "lora_alpha",
                             "lora_dropout", "lora_targets", "hscr_lambda", "policy_rounds", "fire_visual", "fire_gamma",
                             "fire_alpha", "fire_lambda", "nll_weight", "anchor_weight", "dtype", "max_length"]
