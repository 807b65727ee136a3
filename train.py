"""Preference training of a medical VLM end to end, in the order of MMedPO's Algorithm 1: the base model ->
preference records (Strategy 1's text pairs, Strategy 2's visual pairs) -> clinical-relevance weights ->
reference log-probs -> LoRA training with the weighted DPO loss -> evaluation before and after, grounding
first. The same seam runs the other objectives (`OBJECTIVES`, at the end: the SFT control, plain DPO,
the instrument's oracle and lean, and lab/'s HSCR and FiRe-MPO).

The file reads downward: the flags a learner turns, `main` (Algorithm 1 alone), the stages in the order
`main` calls them, each followed by its helpers (a training step is `stage_train`'s loop), then the
objectives and the run context (`Run.stage` owns where a stage's output and its key file live).

    python train.py                                   # MMedPO on the embedded default, about 70 s on a 2-core CPU
    python train.py --objective sft                   # the control: SFT on the same chosen answers
    python train.py --objective dpo                   # the paper's DPO baseline: text pairs, every weight 1
    python train.py --objective hscr                  # HSCR: self-contrastive triplets, multi-level loss
    python train.py --objective fire                  # FiRe-MPO: edited on-policy answers, 2 rounds
    python train.py --objective oracle                # the instrument's check: supervision on the true labels
    python train.py --weighting none --noise global   # ablations: no clinical-relevance weights; global noise
    torchrun --nproc_per_node=2 train.py              # data parallel (gloo on CPU, nccl on CUDA)
    python train.py --model PATH --device cuda        # a transformers LLaVA checkpoint on a GPU

Every stage writes under --out and is reused on the next run when the content it depends on is
unchanged: base (assets/tiny-base unless --base), pairs/OBJECTIVE.jsonl (+ PNGs, judge cache), and
RUN_NAME/ (eval_before.json, ref_logps.pt, checkpoint.pt, adapter/, metrics.json, log.jsonl, pictures).

Tests:  python -m pytest -q tests/test_train.py
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import data
import lora
import score
from guard import checkpoint
from guard.checkpoint import file_digest, fingerprint, read_json, seed_everything, weights_stamp, write_json
from lab import fire, hscr
from mmedpo import get_lr, mmedpo_loss
from world import flags, mechanism, oracle, real_data, synthetic
from world.eval import EvalSettings, TestSet, answer_prior, evaluate, format_table, save_pictures
from world.flags import NONNEG_INT, POS, POS_INT


# the flags a learner turns: (names, argparse keywords). `python train.py --help` shows them first, after
# --objective (OBJECTIVES, at the end); every other flag is in world/flags.py
LEARNER_FLAGS = [
    (["--out"], dict(default="out", help="folder for every stage's output (reused when its inputs are unchanged)")),
    (["--run-name"], dict(default=None, help="subfolder of --out for this training run (default: the objective)")),
    (["--resume"], dict(action="store_true", help="continue from RUN_NAME/checkpoint.pt (same flags and inputs only)")),
    (["--seed"], dict(type=NONNEG_INT, default=0)),
    (["--model"], dict(default=None, help="a transformers LLaVA checkpoint folder; default: the tiny built-in model")),
    (["--prompt-format"], dict(default="plain", help="plain, vicuna (LLaVA's v1 conversation, as the MMedPO authors "
     "trained LLaVA-Med v1.5), mistral, chat (the processor's chat template), or a string with <image> and {question}")),
    (["--device"], dict(default="auto", help="auto, cpu, cuda, cuda:1 ...")),
    (["--data"], dict(default="synthetic", choices=["synthetic", *real_data.LOADERS], help="dataset")),
    (["--data-dir"], dict(default=None, help="folder of a downloaded dataset")),
    (["--strategies"], dict(default="text,visual", help="mmedpo: text (D_t), visual (D_v), or text,visual")),
    (["--judge", "--judges"], dict(action="append", default=[], metavar="NAME=URL,model=M[,key_env=VAR]",
     help="OpenAI-compatible scoring judge (repeat, in order), or rule, rule:lenient, rule:strict; default: rule")),
    (["--weighting"], dict(default="z", choices=list(data.WEIGHTINGS), help="z: the paper's Z(.) per source; raw: "
     "the score as it is (the authors' trainer on their released weighted_score); none: every weight 1")),
    (["--heatmap"], dict(default=None, choices=["classifier", "detector", "mask", "attention"], help="where the "
     "lesion is: the trained lesion classifier (default on synthetic data; it needs labelled training images), the "
     "weight-free blob detector (default on real data), ground-truth masks, or the model's own attention")),
    (["--lr"], dict(type=POS, default=None, help="peak learning rate of the LoRA weights; default: the objective's, "
     "chosen on the val split (mmedpo, dpo, hscr 3e-4; oracle, lean 1e-3; sft, fire 3e-3)")),
    (["--beta"], dict(type=POS, default=0.1, help="DPO temperature (the paper's alpha)")),
    (["--steps"], dict(type=POS_INT, default=None, help="optimizer steps, overriding --epochs (equal budgets)")),
    (["--epochs"], dict(type=POS_INT, default=3)),
    (["--batch-size"], dict(type=POS_INT, default=16, help="records per micro-batch per process")),
    (["--lora-r"], dict(type=POS_INT, default=8)),
]


def main(argv=None):
    """Algorithm 1, one stage after the other; each stage is defined below, in this order."""
    args = parse_args(argv)
    with start_run(args) as run:                                                     # device, processes, the run's lock
        train_qa, pref_qa, test_qa, probes, store = stage_data(run)                  # the data
        base_path = stage_base(run)                                                  # [1] the base model
        if args.base_only:
            return
        model, processor, max_length = load_base(run, base_path)
        records, skipped = stage_records(run, model, processor, base_path, pref_qa, store)   # [2] curation and scores
        records = weigh(run, records)                                                # [2b] clinical-relevance weights
        test = TestSet(test_qa, probes, store, answer_prior(train_qa))
        before = stage_eval_before(run, model, processor, base_path, test)           # [3] the base, evaluated
        add_adapter(run, model)                                                      # [4] LoRA
        train = partial(train_round, run, model, processor, base_path, max_length)   # [4] reference, [5] training
        rounds = OBJECTIVES[args.objective].rounds
        if rounds:  # FiRe-MPO: each round answers anew with the adapter as it is (lab/fire.py)
            records, history, finished = rounds(run, model, processor, pref_qa, store, records, train)
        else:
            history, finished = train(records)
        if finished and run.master:                                                  # [6] adapter, evaluation, report
            stage_report(run, model, processor, records, skipped, history, before, test, base_path)


def parse_args(argv=None):
    """The learner's flags (above) and the rest (world/flags.py), checked against the objectives (OBJECTIVES)."""
    return flags.parse_args(argv, OBJECTIVES, LEARNER_FLAGS)


@contextlib.contextmanager
def start_run(args):
    """The run context (device, dtype, processes) with its folder locked against a second run; on the way
    out every process meets, the lock is released and torchrun's process group is closed."""
    rank, world, device = checkpoint.setup_distributed(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    args.loader_workers = args.loader_workers if args.loader_workers is not None else 4 * (device.type == "cuda")
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
    run = Run(args, rank, world, device, dtype, os.path.join(args.out, args.run_name), os.path.join(args.out, "pairs"))
    lock = None
    if run.master:
        try:
            lock = checkpoint.RunLock(run.run_dir)
        except RuntimeError as e:
            sys.exit(str(e))
        os.makedirs(run.pairs_dir, exist_ok=True)
    try:
        yield run
        run.barrier()
    finally:
        lock and lock.release()
    if world > 1:
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# the stages of a run, in the order `main` calls them (Algorithm 1); each stage's helpers follow it


def stage_data(run):
    """(SFT items, preference items, test items, grounding probes, image store).
    Synthetic: the SFT split's presence prior is skewed; the preference and test splits break it; the
    probes are counterfactual pairs of test images. A real dataset: its train split serves both the prior
    and the preference data; its closed yes/no test questions are the probes."""
    args = run.args
    if args.data == "synthetic":
        train_images, train_qa = synthetic.make_synthetic(args.n_train, args.seed, args.image_size, "train")
        pref_images, pref_qa = synthetic.make_synthetic(args.n_pref, args.seed, args.image_size, "pref")
        test_images, test_qa = synthetic.make_synthetic(args.n_test, args.seed, args.image_size, args.eval_split)
        store = synthetic.SyntheticStore(train_images + pref_images + test_images,
                                         os.path.join(run.pairs_dir, "images"), args.pad_to_square, sft_images=train_images)
        test_qa = test_qa[:args.max_test] if args.max_test else test_qa
        probes = synthetic.counterfactual_probes(test_images, args.image_size, store, args.max_test)
    else:
        train_qa, store = real_data.LOADERS[args.data](args.data_dir, "train", run.log)
        test_qa, test_store = real_data.LOADERS[args.data](args.data_dir, "test", run.log)
        store.masks.update(test_store.masks)
        store.pad, store.has_masks = args.pad_to_square, bool(store.masks)
        test_qa = test_qa[:args.max_test] if args.max_test else test_qa
        probes = [it for it in test_qa if it["type"] == "closed" and it["answer"].strip().lower() in ("yes", "no")]
        pref_qa = train_qa
    return train_qa, pref_qa, test_qa, probes, store


def stage_base(run):
    """[1] The base model's folder: --model, or the tiny LLaVA (built once by synthetic.build_base, then reused)."""
    args = run.args
    base_path = args.model or args.base
    if not args.model and (args.rebuild_base or not os.path.exists(os.path.join(base_path, "config.json"))):
        if run.master:
            run.log(f"[1/6] building the tiny base model (vision pretraining, then SFT warm-up, {args.sft_steps} steps) "
                    f"-> {base_path}")
            try:
                synthetic.build_base(base_path, args.n_train, args.seed, args.image_size, args.sft_steps, args.sft_lr,
                                     run.log)
            except ValueError as e:
                sys.exit(f"--base {e}")
        run.barrier()
    else:
        run.log(f"[1/6] base model: {base_path} (reused)")
    return base_path


def load_base(run, base_path):
    """The base model and its processor on the run's device, and the context length rows are cut to."""
    args = run.args
    try:
        model, processor = checkpoint.load_model(base_path, run.dtype, run.device, args.trust_remote_code)
        data.check_prompt_format(args.prompt_format, processor)
    except ValueError as e:
        sys.exit(f"{base_path}: {e}")
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if args.max_length and positions and args.max_length > positions:
        sys.exit(f"--max-length {args.max_length}: the model has {positions} positions ({base_path}); use at most that")
    return model, processor, args.max_length or positions


def stage_records(run, model, processor, base_path, pref_qa, store):
    """[2] The objective's preference records with their scores, built by the target model, or read
    from a released MMedPO file (--pairs). returns (records, n_skipped)."""
    args = run.args
    if args.pairs:
        path = run.path("pairs.jsonl")
        if run.master:
            run.log(f"[2/6] released preference pairs: {args.pairs}")
            try:
                released, _ = real_data.read_released_pairs(args.pairs, args.images, run.log)
            except ValueError as e:
                sys.exit(f"--pairs {e}")
            checkpoint.write_jsonl(path, released)
    else:
        path = os.path.join(run.pairs_dir, f"{args.objective}.jsonl")
        key = fingerprint({**{k: getattr(args, k) for k in flags.PAIR_FLAGS}, "weights": weights_stamp(base_path),
                           "items": fingerprint(items_key(pref_qa, store)),
                           "records": "v3: FiRe-MPO's four rows; a pair's question type, finding and tool fall",
                           "where": run.pairs_dir})   # records hold absolute image paths: a moved --out builds anew

        def compute():
            run.log(f"[2/6] building {args.objective} preference data -> {path}")
            seed_everything(args.seed)
            records, complete = OBJECTIVES[args.objective].build(model, processor, args, pref_qa, store, run.pairs_dir,
                                                                 run.device, run.log)
            mechanism.answer_change(model, processor, [r for r in records if r["source"] == "visual"], args.prompt_format,
                                    store.pad, args.sample_max_new_tokens, run.log)
            return records, complete and bool(records)
        try:
            run.stage(f"[2/6] {args.objective} preference data", path, key, compute, "jsonl")
        except score.JudgeError as e:
            sys.exit(f"judge: {e}")
    run.barrier()
    try:
        records, skipped = data.read_pairs(path, run.log)
    except ValueError as e:
        sys.exit(str(e))
    if not records:
        sys.exit(f"{path}: no usable preference records")
    return records, skipped


def weigh(run, records):
    """[2b] Clinical-relevance weights, a visible step: Z(.) of the scores per source (the paper),
    the raw scores (the authors' trainer on their released files), or none."""
    weighting = OBJECTIVES[run.args.objective].weighting or run.args.weighting
    run.log(f"[2b] clinical-relevance weights: {weighting}")
    data.assign_weights(records, weighting, run.log)
    for source in sorted({r["source"] for r in records}):
        ws = [r["weight"] for r in records if r["source"] == source]
        run.log(f"      {source}: {len(ws)} records, weighting {weighting}, weights mean {np.mean(ws):.3f} "
                f"min {min(ws):.3f} max {max(ws):.3f}")
    if run.master:  # what this run trains on, weights included, for a reader to see
        checkpoint.write_jsonl(run.path("records.jsonl"), records)
    if run.master and run.args.export_pairs:
        real_data.export_pairs(records, run.args.export_pairs)
        run.log(f"      exported {len(records)} records to {run.args.export_pairs}")
    return records


def stage_eval_before(run, model, processor, base_path, test):
    """[3] The base model (no adapter) on the test split and the grounding probes (a TestSet); reused
    while the model, the items (by content) and the settings stay."""
    args, path = run.args, run.path("eval_before.json")
    key = fingerprint({"weights": weights_stamp(base_path), "items": items_key(test.items, test.store),
                       "probes": items_key(test.probes, test.store), "prompt_format": args.prompt_format, "pad": args.pad_to_square,
                       "max_new_tokens": args.max_new_tokens, "scoring": args.vqa_scoring, "dtype": str(run.dtype),
                       "stores": "metrics, predictions, probe predictions, grounding v3: failure kinds, tie band"})

    def compute():
        run.log(f"[3/6] evaluating the base model on {len(test.items)} test questions and {len(test.probes)} "
                f"grounding probes")
        result, predictions, probe_predictions = evaluate(model, processor, test.items, test.store, test.prior,
                                                          test.probes, eval_settings(args), log=run.log)
        return {"metrics": result, "predictions": predictions, "probe_predictions": probe_predictions}, True
    run.stage("[3/6] evaluation of the base model", path, key, compute, "json")
    stored = read_json(path, run.log)
    return stored["metrics"], stored["predictions"], stored["probe_predictions"]


def items_key(items, store):
    """The content of question items: text, answer and the bytes of each image."""
    return [(it["question"], it["answer"], store.digest(it["image_id"])) for it in items]


def add_adapter(run, model):
    """[4] LoRA on the language model (seeded: its initialisation, then the dropout masks, draw from the
    run's seed and nothing draws before training), gradient checkpointing on CUDA."""
    args = run.args
    seed_everything(args.seed)
    names = lora.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    if args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and run.device.type == "cuda"):
        # recompute activations in the backward pass; only in train mode, so the no-grad reference pass is unaffected
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run.log(f"[4/6] LoRA r={args.lora_r} alpha={args.lora_alpha} on {len(names)} layers "
            f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters)")


def train_round(run, model, processor, base_path, max_length, records, tag=""):
    """[4] the reference log-probs and [5] the training of one set of records. returns (history, finished)."""
    args = run.args
    global_batch = args.batch_size * args.grad_accum * run.world
    if len(records) < global_batch:
        sys.exit(f"{len(records)} records are fewer than one global batch ({global_batch}); lower --batch-size")
    dataset = data.RecordDataset(records, processor, data.model_image_reader(args.pad_to_square), args.prompt_format,
                                 max_length, cache_pixels=args.data == "synthetic")
    ref = stage_reference(run, model, processor, base_path, records, dataset, tag)   # [4] reference log-probs
    inputs = inputs_of(run, base_path, records, max_length)
    return stage_train(run, model, processor, records, dataset, ref, inputs, tag)    # [5] the objective on LoRA


def stage_reference(run, model, processor, base_path, records, dataset, tag=""):
    """[4] log pi_ref of every response of every record, (N, k), with the adapter disabled and no grad,
    once. Stored as a plain tensor file (loaded with weights_only=True, so it can never run code), with
    the count of rows truncated to fit the context (counted here, in the main process)."""
    args, path, k = run.args, run.path(f"ref_logps{tag}.pt"), OBJECTIVES[run.args.objective].responses

    def compute():
        run.log(f"      reference log-probs for {len(records)} records x {k} responses (adapter disabled, no grad)")
        mine = list(range(run.rank, len(records), run.world))
        batches = [mine[i:i + 2 * args.batch_size] for i in range(0, len(mine), 2 * args.batch_size)]
        out, cut = [], [0, 0]
        with torch.no_grad(), lora.disable_lora(model):
            for batch in record_loader(dataset, batches, processor.tokenizer.pad_token_id, args.loader_workers):
                cut = [cut[0] + int((batch["truncated"] > 0).sum()), cut[1] + int((batch["truncated"] == 2).sum())]
                with run.autocast():
                    out.append(data.response_logps(model, to_device(batch, run.device, run.dtype), k)[1].sum(-1).cpu())
        logps = torch.cat(out) if out else torch.zeros(0, k)
        if run.world > 1:
            parts = [None] * run.world
            torch.distributed.all_gather_object(parts, logps)
            logps = torch.zeros(len(records), k)
            for r, part in enumerate(parts):
                logps[r::run.world] = part
        return {"logps": logps, "truncated": all_sum(run, cut)}, True
    stored = run.stage("      reference log-probs", path, reference_key(run, base_path, records, k, dataset.max_length),
                       compute, "tensors", everyone=True)
    n_cut, n_response = stored["truncated"]
    if n_cut:
        run.log(f"      {int(n_cut)} rows had their prompt truncated to fit {dataset.max_length} tokens, "
                f"{int(n_response)} of them their response too")
    if run.master and tag in ("", "_round0"):   # what the visual pairs do to the base (world/mechanism.py)
        run.mechanism["visual"] = mechanism.visual_effect(records, stored["logps"], run.log)
    return stored["logps"]


def reference_key(run, base_path, records, k, max_length):
    """What the reference log-probs depend on: the model, and each record's rows by the *content* of
    their images (a noised PNG rewritten at the same path must not reuse old numbers)."""
    rows = [[(file_digest(path), text) for path, text in data.record_rows(r)] + [r["prompt"]] for r in records]
    return fingerprint({"weights": weights_stamp(base_path), "k": k, "rows": rows, "dtype": str(run.dtype),
                        "prompt_format": run.args.prompt_format, "pad": run.args.pad_to_square, "max_length": max_length})


def inputs_of(run, base_path, records, max_length):
    """A resume continues only the same computation: the records with their weights, the model and the
    encoding, by content."""
    return {"records": fingerprint([data.record_rows(r) + [r["prompt"], r["weight"]] for r in records]),
            "model": fingerprint(weights_stamp(base_path)), "encoding": fingerprint([str(run.dtype), max_length])}


def stage_train(run, model, processor, records, dataset, ref, inputs, tag=""):
    """[5] The objective on LoRA: AdamW, warmup + cosine, clipping, one forward per micro-batch for all
    k responses of its records, checkpoints every --ckpt-every steps. returns (history, finished)."""
    args, loss_fn = run.args, OBJECTIVES[run.args.objective].loss
    global_batch = args.batch_size * args.grad_accum * run.world
    total = total_steps(args, len(records), run.world)
    warmup = max(1, int(args.warmup * total))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    weights = torch.tensor([r["weight"] for r in records], dtype=torch.float32)
    ckpt_path, log_path, start, history = run.path(f"checkpoint{tag}.pt"), run.path(f"log{tag}.jsonl"), 0, []
    config = {**vars(args), "world": run.world}
    load = lambda idx: (to_device(data.collate_records([dataset[i] for i in idx], processor.tokenizer.pad_token_id),
                                  run.device, run.dtype), ref[idx].to(run.device), weights[idx].to(run.device))
    if run.master and tag in ("", "_round0"):   # where the first step goes, at the adapter's initial state
        with run.autocast():
            run.mechanism["gradient"] = mechanism.gradient_shares(model, loss_fn, load, records, args, seed=args.seed,
                                                                  log=run.log)
    if args.resume:
        start, history = resume(run, ckpt_path, model, opt, config, inputs, total)
    if run.master and tag in ("", "_round0"):  # the run is certain to train now: the old results go
        checkpoint.clear_results(run.run_dir)
    if run.master:  # the log holds exactly the steps of `history` (a resumed run drops the lost steps' lines)
        checkpoint.write_jsonl(log_path, history)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    run.log(f"[5/6] {args.objective}: {len(records)} records, {total} steps (global batch {global_batch}, "
            f"{total * global_batch / len(records):.1f} epochs), lr {args.lr}, beta {args.beta}")
    plan = [mb for step in range(start, total) for mb in micro_batches(len(records), step, global_batch, args.batch_size,
                                                                        args.grad_accum, run.rank, run.world, args.seed)]
    batches = iter(record_loader(dataset, plan, processor.tokenizer.pad_token_id, args.loader_workers))
    model.train()
    t0 = time.time()
    for step in range(start, total):
        lr = get_lr(step, args.lr, warmup, total)
        for group in opt.param_groups:
            group["lr"] = lr
        t_step, sums = time.time(), {}
        mbs = micro_batches(len(records), step, global_batch, args.batch_size, args.grad_accum, run.rank, run.world, args.seed)
        for micro, mb in enumerate(mbs):
            batch = to_device(next(batches), run.device, run.dtype)
            sync = run.world == 1 or micro == args.grad_accum - 1  # DDP all-reduces gradients on the last micro-batch only
            with run.autocast(), (contextlib.nullcontext() if sync else ddp.no_sync()):
                losses, stats = loss_fn(ddp, batch, ref[mb].to(run.device), weights[mb].to(run.device), args)
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
        eta = (time.time() - t0) / (step + 1 - start) * (total - step - 1)
        rec = log_step(run, sums, step, total, lr, grad_norm, time.time() - t_step, eta, global_batch)
        history.append(rec)
        if run.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == total or step + 1 == args.halt_at_step:
            save(run, ckpt_path, model, opt, step + 1, history, config, inputs)
        if args.halt_at_step is not None and step + 1 == args.halt_at_step and step + 1 < total:
            run.log(f"halting after step {step + 1} as asked (--halt-at-step); continue with --resume")
            return history, False
    model.eval()
    if run.master:   # did the chosen answers gain or lose probability (likelihood displacement)?
        with run.autocast():
            run.mechanism["chosen"] = mechanism.chosen_moves(model, load, records, ref, OBJECTIVES[args.objective].responses,
                                                             log=run.log)
    return history, True


def total_steps(args, n_records, world):
    """Optimizer steps of one training stage: --steps when given, shared among FiRe-MPO's rounds (every
    objective then trains the same number of steps in all: the study's equal budget), else --epochs
    over the records."""
    if args.steps:
        return max(1, args.steps // (args.policy_rounds if OBJECTIVES[args.objective].rounds else 1))
    return n_records // (args.batch_size * args.grad_accum * world) * args.epochs


def resume(run, ckpt_path, model, opt, config, inputs, total):
    """(step, history) of the checkpoint after checking that it continues the same computation (flags
    and inputs); restores the adapter, the optimizer and this process's RNG. (0, []) without one."""
    try:
        ck = checkpoint.checked_checkpoint(ckpt_path, config, inputs, flags.RESUME_FLAGS, run.log)
    except ValueError as e:
        sys.exit(f"--resume: {e}")
    if ck is None:
        run.log(f"      --resume: no {ckpt_path}, starting fresh")
        return 0, []
    lora.load_lora_state_dict(model, ck["lora"], ckpt_path)
    opt.load_state_dict(ck["optimizer"])
    checkpoint.set_rng_state(ck["rng"][run.rank])
    run.log(f"      resumed from {ckpt_path} at step {ck['step']}/{total}")
    return ck["step"], ck["history"]


def micro_batches(n_records, step, global_batch, batch_size, grad_accum, rank, world, seed):
    """This process's micro-batches (lists of record indices) of optimizer step `step`: a fresh seeded
    permutation each epoch, the step's slice of it, this process's share, cut into `grad_accum` parts."""
    steps_per_epoch = n_records // global_batch
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_records, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    idx = perm[i * global_batch:(i + 1) * global_batch]
    mine = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world].tolist()
    return [mine[m * batch_size:(m + 1) * batch_size] for m in range(grad_accum)]


def record_loader(dataset, batches, pad_id, workers):
    """A DataLoader over given lists of record indices (one list per micro-batch, in order). It gets a
    generator of its own: a DataLoader draws its workers' base seed from the global RNG otherwise, and
    that would shift the LoRA dropout masks whenever a loader is made (resume, a computed stage)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       collate_fn=partial(data.collate_records, pad_id=pad_id),
                                       generator=torch.Generator().manual_seed(0))


def to_device(batch, device, dtype):
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}


def log_step(run, sums, step, total, lr, grad_norm, dt, eta, global_batch):
    """One line per step (averages over the global batch), and the record that goes to log.jsonl."""
    names = sorted(sums)
    sums = dict(zip(names, all_sum(run, [sums[n] for n in names])))
    n = sums.pop("n")
    rec = {"step": step + 1, **{name: v / n for name, v in sums.items()}, "lr": lr, "grad_norm": float(grad_norm),
           "ms": dt * 1000}
    extra = "".join(f" | {name.removeprefix('margin_')} {rec[name]:+.3f}" for name in sorted(sums)
                    if name not in ("loss", "reward_acc", "margin"))
    run.log(f"step {step + 1:4d}/{total} | loss {rec['loss']:.4f} | acc {rec['reward_acc']:.2f} | margin "
            f"{rec['margin']:+.3f}{extra} | lr {lr:.2e} | {rec['ms']:.0f} ms | {global_batch / dt:.0f} records/s | "
            f"ETA {eta:.0f}s")
    return rec


def save(run, ckpt_path, model, opt, step, history, config, inputs):
    """A checkpoint with every process's RNG (the dropout masks differ between ranks)."""
    states = [checkpoint.rng_state()]
    if run.world > 1:
        states = [None] * run.world
        torch.distributed.all_gather_object(states, checkpoint.rng_state())
    if run.master:
        checkpoint.save_checkpoint(ckpt_path, lora.lora_state_dict(model), opt, step, history, states, config, inputs)
    run.barrier()


def stage_report(run, model, processor, records, skipped, history, before, test, base_path):
    """[6] Adapter (PEFT format), evaluation after, metrics.json, predictions, pictures, the table."""
    args, test_qa, probes = run.args, test.items, test.probes
    before, before_preds, before_probes = before
    lora.save_adapter(model, run.path("adapter"), base_model_name_or_path=os.path.abspath(base_path))
    checkpoint.write_adapter_base(run.path("adapter"), base_path)     # which weights it belongs to
    run.log(f"[6/6] evaluating with the adapter; adapter saved to {run.path('adapter')}")
    after, preds, after_probes = evaluate(model, processor, test.items, test.store, test.prior, test.probes,
                                          eval_settings(args), log=run.log)
    # every test answer, and every probe's answer and margin, before and after: the tables can be recomputed
    checkpoint.write_jsonl(run.path("predictions.jsonl"), [{**it, "prediction_before": b, "prediction": p}
                                                           for it, b, p in zip(test_qa, before_preds, preds)] +
                           [{**it, "prediction_before": b["prediction"], "margin_before": b["margin"], **a}
                            for it, b, a in zip(probes, before_probes, after_probes)])
    save_pictures(run.run_dir, model, processor, records, history, test, (before_preds, preds), args.prompt_format,
                  run.log)
    run.log("\n" + format_table({"answer prior": after["prior"], "before": before, "after": after}))
    # written last: a metrics.json stands only beside the adapter and predictions of the same run
    write_json(run.path("metrics.json"), {
        "objective": args.objective, "before": before, "after": after, "prior": after["prior"], "seed": args.seed,
        "records": {s: sum(r["source"] == s for r in records) for s in sorted({r["source"] for r in records})},
        "skipped_records": skipped, "steps": len(history), "final_train": history[-1] if history else None,
        "mechanism": run.mechanism,
        "seconds": time.time() - run.t_start, "config": vars(args)}, indent=1)
    run.log(f"\ndone in {time.time() - run.t_start:.0f}s; metrics in {run.path('metrics.json')}")


def eval_settings(args):
    """How the run's evaluations ask and score (the flags)."""
    return EvalSettings(args.prompt_format, args.max_new_tokens, args.vqa_scoring)


# -----------------------------------------------------------------------------
# the objectives: which records are built, which loss runs on them, how many responses a record holds.
# A loss adapter runs the forwards it needs on one k*B-row batch (response-major) and returns per-record
# losses (B,) and the (B,) statistics it logs (`Objective.loss`); the loop reduces and averages them.


def preference_loss(model, batch, ref, weights, args):
    """MMedPO's weighted DPO (dpo and mmedpo: k = 2, chosen then rejected). Two remedies for likelihood
    displacement (the chosen answer's probability falling while the margin grows), neither the paper's:
    --nll-weight times the chosen answer's mean token NLL (RPO), and --anchor-weight times
    -log s(beta (log pi(y_w) - log ref(y_w))) (mDPO's anchor: the chosen reward kept above 0)."""
    _, tokens, response = data.response_logps(model, batch, 2)           # (B, 2, T-1): chosen, rejected
    policy = tokens.sum(-1)                                                # (B, 2)
    losses, chosen_r, rejected_r = mmedpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], weights, args.beta)
    stats = {"reward_acc": (chosen_r > rejected_r).float(), "margin": chosen_r - rejected_r}
    if args.nll_weight:
        nll = -policy[:, 0] / response[:, 0].sum(-1).clamp(min=1)
        losses, stats["nll"] = losses + args.nll_weight * nll, nll.detach()
    if args.anchor_weight:
        anchor = -F.logsigmoid(args.beta * (policy[:, 0] - ref[:, 0]))
        losses, stats["anchor"] = losses + args.anchor_weight * anchor, anchor.detach()
    return losses, stats


def sft_control_loss(model, batch, ref, weights, args):
    """The control of the benchmark: supervised fine-tuning on the preference data's chosen answers only
    (mean token NLL; the rejected answers and the weights are not used). A preference objective counts as
    working only where it beats this."""
    _, logps, response = data.response_logps(model, batch, 2, first=1)    # (B, 1, T-1): the chosen rows only
    nll = -logps[:, 0].sum(-1) / response[:, 0].sum(-1).clamp(min=1)
    return nll, {"reward_acc": torch.zeros_like(nll), "margin": torch.zeros_like(nll)}


@dataclass(frozen=True)
class Objective:
    """What `--objective` picks: which records are built, which loss runs on them, and what follows."""
    build: Callable            # (model, processor, args, pool, store, pairs_dir, device, log) -> (records, complete)
    loss: Callable             # (model, batch of k*B rows, ref (B, k), weights (B,), args) -> (losses (B,), stats)
    responses: int             # k, the rows of one record: chosen, rejected, ...
    weighting: str = None      # the weighting it always uses; None: --weighting decides
    rounds: Callable = None    # trains in rounds, answering anew from the adapter each round (FiRe-MPO's `train_in_rounds`)
    released_pairs: bool = True  # can train on a released MMedPO file (--pairs)
    overrides: tuple = ()      # (flag, value) pairs it sets, whatever the command line says
    lr: float = 1e-3           # the default --lr: the val sweep's choice for its plain row (assets/study/sweep.md)


OBJECTIVES = {
    "sft": Objective(data.build_mmedpo_pairs, sft_control_loss, 2, lr=1e-3),   # the control: MMedPO's chosen answers
    "oracle": Objective(oracle.build_oracle_records, sft_control_loss, 2, "none", released_pairs=False, lr=3e-3),
    "lean": Objective(partial(oracle.build_oracle_records, answer="yes"), sft_control_loss, 2, "none",
                      released_pairs=False, lr=3e-4),
    "dpo": Objective(data.build_mmedpo_pairs, preference_loss, 2, "none",
                     overrides=(("strategies", "text"), ("weighting", "none")), lr=3e-4),
    "mmedpo": Objective(data.build_mmedpo_pairs, preference_loss, 2, lr=3e-4),
    "hscr": Objective(hscr.build_hscr_pairs, hscr.hscr_objective_loss, 3, "none", released_pairs=False, lr=3e-4),
    "fire": Objective(fire.build_fire_pairs, fire.fire_objective_loss, 4, "none", rounds=fire.train_in_rounds, released_pairs=False, lr=3e-4),
}


# -----------------------------------------------------------------------------
# the run context: what every stage needs besides its own inputs


@dataclass
class Run:
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    run_dir: str
    pairs_dir: str
    t_start: float = field(default_factory=time.time)
    mechanism: dict = field(default_factory=dict)   # what the method's mechanism did (world/mechanism.py)

    def log(self, *a, **k):
        if self.master:
            print(*a, **k, flush=True)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def stage(self, what, path, key, compute, kind="json", everyone=False):
        """A stage's output at `path`, reused when PATH.key.json holds `key` and the output's digest, else
        `compute() -> (value, complete)` and saved as `kind` (json, jsonl or tensors). Only the main
        process writes; with `everyone` every process computes (its share), else only the main one.
        returns the value (None on the other processes, unless `everyone`)."""
        write, read = STAGE_FILES[kind]
        value = None
        if everyone or self.master:
            value = checkpoint.cached(path + ".key.json", key, compute, lambda v: write(path, v),
                                      lambda: read(path, self.log), self.log, what, self.master, output=path)
        self.barrier()
        return value

    @property
    def master(self):
        return self.rank == 0


# how each kind of stage output is written and read back: (save(path, value), load(path, log) -> value or None)
STAGE_FILES = {"json": (write_json, read_json),
               "tensors": (lambda path, value: checkpoint.save_tensors(value, path), checkpoint.load_tensors),
               "jsonl": (checkpoint.write_jsonl, lambda path, log: path if os.path.exists(path) else None)}


def all_sum(run, values):
    """Sum a list of numbers over the processes."""
    if run.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


if __name__ == "__main__":
    main()
