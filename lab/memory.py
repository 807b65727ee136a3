"""The memory of one training step, from a model's config.json: weights, the LoRA adapter with its
gradients and AdamW state, the activations autograd keeps for the backward pass (with and without
gradient checkpointing) and the logits, at every position or at the response positions only.

    python -m lab.memory                         # LLaVA-Med v1.5 (Mistral-7B), the paper's LoRA, bf16
    python -m lab.memory --config PATH --rows 8 --prompt 656 --answers 5,60,256

The activation counts are those of transformers' Llama/Mistral decoder layer (SDPA attention, a padded
batch, so a float mask of T x T per row) with this project's LoRA on all seven linear layers of every
layer (lora.DEFAULT_TARGETS), counted with torch.autograd.graph.saved_tensors_hooks; `python -m
lab.bench shapes` measures the step at reduced widths and depths and prints this model's figure beside
each measured peak.

Tests:  python -m pytest -q tests/lab/test_memory.py
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: assets/
LLAVA_MED_CONFIG = os.path.join(ROOT, "assets", "llava-med-v1.5-mistral-7b-config.json")  # written from its published shapes
GIB = 2 ** 30

# elements autograd keeps per token and per decoder layer, in units of the intermediate size I and the hidden
# size H (q, k after repeat_kv, v and the attention output are H wide each), without and with LoRA dropout
# (dropout keeps its mask and its output for each of the seven adapted layers); the attention mask adds T
# elements and each adapted layer its r-wide A x
SAVED_PER_LAYER = {False: (4, 8), True: (5, 15)}   # dropout > 0: (times I, times H)
HEAD_COPIES = 3   # the scored positions' logits in float32 at the peak of the head's backward: the
                  # log-softmax kept for backward, the gradient it receives and the gradient it passes on
LAYER_BACKWARD = 0.5   # or the step peaks while a layer runs backward: the gradients alive then are about
                       # half of what that layer kept (with checkpointing, on top of its recomputed copy)
# HEAD_COPIES and LAYER_BACKWARD are read off the measured peaks of `python -m lab.bench shapes` at hidden
# 512 x 2 layers; the other widths, depths and checkpointing check them (docs/real.md)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lab.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=LLAVA_MED_CONFIG, help="a LLaVA config.json (transformers' layout)")
    ap.add_argument("--rows", type=int, default=8, help="sequences a step: chosen and rejected of --batch-size 4")
    ap.add_argument("--prompt", type=int, default=656, help="prompt positions: BOS, 576 image tokens and the question")
    ap.add_argument("--answers", default="5,60,256", help="answer lengths in tokens (comma-separated)")
    ap.add_argument("--lora-r", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        answers = [int(a) for a in args.answers.split(",")]
        assert min(answers) >= 1 and min(args.rows, args.prompt, args.lora_r) >= 1
    except (ValueError, AssertionError):
        ap.error("--answers: comma-separated whole numbers >= 1; --rows, --prompt and --lora-r >= 1")
    config = read_config(args.config)
    n = params(config)
    print(f"{args.config}: text {n['text'] / 1e9:.2f} B, vision {n['vision'] / 1e6:.0f} M, projector "
          f"{n['projector'] / 1e6:.1f} M parameters; LoRA r {args.lora_r} on all seven linear layers: "
          f"{n['lora_per_r'] * args.lora_r / 1e6:.0f} M. bf16 weights and activations, {args.rows} rows, "
          f"prompt {args.prompt} positions; GiB:")
    print(f"{'answer':>6s} {'ckpt':>4s} {'logits':>8s} | {'weights':>7s} {'LoRA+Adam':>9s} {'activ.':>7s} {'logits':>7s} "
          f"{'layer bw':>8s} | {'total':>6s}   (total: the larger of logits and layer bw counts)")
    for answer in answers:
        length = args.prompt + answer + 1
        for ckpt in (True, False):
            for where, scored in (("full", length), ("response", answer + 1)):
                p = step_memory(config, args.rows, length, scored, args.lora_r, grad_ckpt=ckpt)
                print(f"{answer:6d} {'on' if ckpt else 'off':>4s} {where:>8s} | {p['weights'] / GIB:7.1f} {p['lora'] / GIB:9.1f} "
                      f"{p['activations'] / GIB:7.1f} {p['logits'] / GIB:7.1f} {p['layer_backward'] / GIB:8.1f} | {p['total'] / GIB:6.1f}")


def step_memory(config, rows, length, scored, lora_r=128, weight_bytes=2, act_bytes=2, grad_ckpt=True, dropout=True):
    """Bytes of one training step's peak, by part, for `rows` sequences padded to `length` positions of which
    `scored` get logits (length for the full path, the response window for data.response_logps).
    weights: every parameter at weight_bytes; lora: adapter weights, gradients and AdamW's two moments, all
    float32 (16 bytes a parameter); activations: what autograd keeps at act_bytes (with gradient
    checkpointing each layer's input, plus one layer recomputed during backward); logits: HEAD_COPIES float32
    copies of rows x scored x vocabulary; layer_backward: LAYER_BACKWARD of one layer's kept tensors, as
    gradients (and the layer recomputed, with checkpointing).
    `total` = weights + lora + activations + the larger of logits and layer_backward (the step peaks at the
    head or in a layer); `step` is total less the weights."""
    t = config["text_config"]
    H, I, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    n = params(config)
    c_i, c_h = SAVED_PER_LAYER[bool(dropout)]
    per_token_layer = c_i * I + c_h * H + length + 7 * lora_r + t["num_attention_heads"]
    tokens = rows * length
    layer = tokens * per_token_layer * act_bytes
    parts = {"weights": (n["text"] + n["vision"] + n["projector"]) * weight_bytes,
             "lora": n["lora_per_r"] * lora_r * 16,
             "activations": L * tokens * H * act_bytes if grad_ckpt else L * layer,
             "logits": HEAD_COPIES * rows * scored * V * 4,
             "layer_backward": layer * ((1 if grad_ckpt else 0) + LAYER_BACKWARD)}
    parts["total"] = parts["weights"] + parts["lora"] + parts["activations"] + max(parts["logits"], parts["layer_backward"])
    parts["step"] = parts["total"] - parts["weights"]
    return parts


def params(config):
    """Parameter counts of a LLaVA config (dict, transformers' layout): {text, vision, projector, lora_per_r}.
    lora_per_r: the LoRA parameters per unit of rank on all seven linear layers of every text layer."""
    t, v = config["text_config"], config["vision_config"]
    H, I, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    hd = t.get("head_dim") or H // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * hd, t.get("num_key_value_heads", t["num_attention_heads"]) * hd
    layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H
    text = V * H + L * layer + H + (0 if t.get("tie_word_embeddings") else V * H)
    Hv, Iv, Lv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    vision = (3 * v["patch_size"] ** 2 * Hv + Hv + (patches + 1) * Hv + 4 * Hv
              + Lv * (4 * Hv * Hv + 4 * Hv + 2 * Hv * Iv + Iv + Hv + 4 * Hv))
    projector = Hv * H + H + H * H + H
    lora_per_r = L * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))
    return {"text": text, "vision": vision, "projector": projector, "lora_per_r": lora_per_r}


def read_config(path):
    try:
        with open(path) as f:
            config = json.load(f)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            config["text_config"][key]
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size"):
            config["vision_config"][key]
    except (OSError, ValueError) as e:
        raise SystemExit(f"--config {path}: {e}")
    except (KeyError, TypeError) as e:
        raise SystemExit(f"--config {path}: not a LLaVA config with text_config and vision_config ({e!r} missing)")
    return config


if __name__ == "__main__":
    main()
