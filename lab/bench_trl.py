"""This project's DPO step beside TRL's DPOTrainer with a PEFT LoRA, on the same pairs and adapter, at the
tiny base and at LLaVA-Med's shapes. TRL and PEFT are not dependencies of the project: install them in
the benchmark's own environment (pip install "trl==1.16.*" peft), then

    python -m lab.bench_trl                  # tiny base: 64 text pairs, batch 16, LoRA r 8 on all linears
    python -m lab.bench_trl shapes           # a LLaVA at vocabulary 32,000, 576 image tokens, hidden 512 x 2

Each variant runs in its own process, alternated `--repeats` times. Time: the median wall time between the
ends of consecutive steps after the warm-up (so batching, any reference pass and the optimizer are inside
for both); peak: the process's max RSS above its level once the model and the pairs are loaded (CUDA's max
allocated on a GPU; at the real shapes under bench.LIVE_RSS, so that it follows the live tensors). Ours
precomputes the reference log-probs once, outside the steps, as train.py does; TRL cannot for vision
datasets and runs the reference forward (adapter off) in every step.
"""
import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import data
import lora
from lab import bench

ROOT = bench.ROOT


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    world = "shapes" if argv[:1] == ["shapes"] else "tiny"
    argv = argv[1:] if world == "shapes" else argv
    ap = argparse.ArgumentParser(prog="python -m lab.bench_trl" + (" shapes" if world == "shapes" else ""),
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20 if world == "tiny" else 2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        return print(json.dumps((trl_variant if args.variant == "trl" else ours_variant)(world, args)))
    missing = [m for m in ("trl", "peft", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"lab.bench_trl: {', '.join(missing)} not installed here; install them in the benchmark's own "
                 f'environment: pip install "trl==1.16.*" peft')
    import trl
    print(f"DPO step, ours against TRL {trl.__version__} + PEFT, {world} "
          f"({'batch 16 pairs, 64 text pairs' if world == 'tiny' else '4 pairs, vocabulary 32,000, 576 image tokens, 80 prompt and 60 answer tokens, hidden 512 x 2'}), "
          f"LoRA r 8 on all seven linear layers, {args.device}, threads {torch.get_num_threads()}", flush=True)
    results = {}
    for _ in range(args.repeats):
        for variant in ("ours", "trl"):
            cmd = [sys.executable, "-m", "lab.bench_trl"] + (["shapes"] if world == "shapes" else []) + \
                  ["--variant", variant, "--steps", str(args.steps), "--device", args.device]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=bench.LIVE_RSS if world == "shapes" else None)
            if done.returncode != 0:
                sys.exit(f"lab.bench_trl: the {variant} variant failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results.setdefault(variant, []).append(r)
            print(f"  {variant:4s} {r['ms_per_step']:9.1f} ms/step  peak {r['step_peak_mb']:7.0f} MB above the loaded model",
                  flush=True)
    med = lambda v, k: statistics.median(r[k] for r in results[v])
    print(f"ours is {med('trl', 'ms_per_step') / med('ours', 'ms_per_step'):.2f}x as fast as TRL; peak "
          f"{med('ours', 'step_peak_mb'):.0f} MB against {med('trl', 'step_peak_mb'):.0f} MB (medians of {args.repeats})")


def ours_variant(world, args):
    """This project's step: the tiny world through lab.bench's own loop, the real shapes through lab.bench
    shapes' window path (both in this process)."""
    if world == "tiny":
        out = subprocess.run([sys.executable, "-m", "lab.bench", "--variant", "ours", "--text-pairs", "--steps",
                              str(args.steps), "--device", args.device], capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    shape_args = argparse.Namespace(device=args.device, hidden=512, layers=2, pairs=4, prompt_text=80, answer=60,
                                    steps=args.steps, variant="window", lora_dropout=0.05, grad_ckpt=False)
    r = bench.shapes_variant(shape_args)
    return {**r, "step_peak_mb": r["peak_mb"]}


def trl_variant(world, args):
    """TRL's DPOTrainer (sigmoid loss, beta 0.1, AdamW at 1e-3, constant rate) with a PEFT LoRA of the same
    rank, scale, dropout and targets, on the same pairs as ours."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    if world == "tiny":
        setup_args = argparse.Namespace(device=args.device, image_size=32)
        model, processor, pairs, load = bench.setup(setup_args, adapter=False, text_only=True)
        rows = [{"images": [load(p["image"])], "prompt": data.format_prompt(processor, "plain", p["prompt"]),
                 "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
        batch, warmup, dropout = 16, 3, 0.0
    else:
        model = bench.real_shapes_model(512, 2).to(args.device)
        processor = real_shapes_processor(model.config)
        g = torch.Generator().manual_seed(0)
        words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(3, 31998, (n,), generator=g))
        from PIL import Image
        rows = [{"images": [Image.fromarray((torch.rand(336, 336, 3, generator=g) * 255).byte().numpy())],
                 "prompt": "<image> " + words(80), "chosen": words(60), "rejected": words(59)} for _ in range(4)]
        batch, warmup, dropout = 4, 1, 0.05
    dataset = Dataset.from_list(rows)
    loaded = bench.peak_mb(args.device)
    ends = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=warmup + args.steps + 1,
                           learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
                           logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                           dataloader_num_workers=0, max_length=None, disable_dropout=False, bf16=False,
                           gradient_checkpointing=False, seed=0)
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=lora.DEFAULT_TARGETS, bias="none")
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                             peft_config=peft_config, callbacks=[Timer()])
        trainer.train()
    times = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    ms = statistics.median(times) * 1000
    peak = bench.peak_mb(args.device)
    return {"variant": "trl", "ms_per_step": ms, "pairs_per_s": batch / ms * 1000, "peak_mb": peak,
            "step_peak_mb": peak - loaded}


def real_shapes_processor(config):
    """A LLaVA processor for bench.real_shapes_model: a word-level tokenizer of the model's vocabulary
    (w3 ... w31998, the image token last) and a CLIP image processor at 336 px."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    V = config.text_config.vocab_size
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V - 1)}, "<image>": V - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    size = config.vision_config.image_size
    image_processor = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


if __name__ == "__main__":
    main()
