"""LoRA by hand: add low-rank adapters to a model's linear layers, merge them, switch them off,
and save/load them in PEFT's on-disk format.

    h = W x + (alpha / r) * B A dropout(x)         (Hu et al. 2021)

A starts Kaiming-uniform (a = sqrt(5)) and B starts at zero, so a fresh adapter changes nothing.
The wrapped layer keeps its own `weight`/`bias` parameters under their old names, so the base
model's state_dict and `save_pretrained` are untouched; only `lora_A`/`lora_B` are new.

torch + safetensors only; copy this file into another project and it works.
Tests:  python -m pytest -q tests/test_lora.py
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# The language model's attention and MLP projections (Llama, Mistral, Qwen2 naming). Matched with
# re.fullmatch against qualified module names, exactly as PEFT reads a string `target_modules`,
# so the same string in adapter_config.json selects the same layers there. "language_model" keeps
# CLIP's q/k/v_proj in the vision tower, the multimodal projector and lm_head out.
DEFAULT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter. Shares the parameters of the layer it replaces."""

    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        nn.Module.__init__(self)
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # same Parameter objects, frozen below
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        # adapters live in float32 even on a bf16 model: AdamW updates of size lr*1e-3 vanish in bf16
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, **kw)   # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False    # B A is folded into weight
        self.disabled = False  # forward as the base layer
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.merged and self.disabled:
            return out - self.delta(x)  # the base layer, with the merged update taken back out
        if not self.merged and not self.disabled:
            return out + self.delta(x)
        return out

    def delta(self, x):
        """(alpha/r) B A dropout(x), in x's dtype."""
        a = self.lora_A.weight
        return (self.lora_B(self.lora_A(self.lora_dropout(x).to(a.dtype))) * self.scaling).to(x.dtype)

    def merge(self):
        if not self.merged:
            with torch.no_grad():
                self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def delta_weight(self):
        """(alpha/r) B A as an (out, in) matrix."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.lora_alpha}"


def add_lora(model, r=8, alpha=16, dropout=0.0, targets=DEFAULT_TARGETS):
    """Wrap every nn.Linear whose qualified name fully matches `targets` (a regex) in a LoRALinear,
    freeze every other parameter, and return the wrapped names (sorted). Raises if none matched."""
    pattern = re.compile(targets)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and pattern.fullmatch(n)]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"LoRA targets {targets!r} matched no nn.Linear; some linear layers are: {linears}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    return sorted(names)


def merge_lora(model):
    for _, m in lora_layers(model):
        m.merge()


def unmerge_lora(model):
    for _, m in lora_layers(model):
        m.unmerge()


@contextlib.contextmanager
def disable_lora(model):
    """Run the model as its base: the reference policy of DPO without a second copy of the weights."""
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("disable_lora: the model has no LoRA layers")
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was


def save_adapter(model, path, base_model_name_or_path="", task_type="CAUSAL_LM"):
    """Write `adapter_model.safetensors` + `adapter_config.json` in PEFT's layout, which
    peft.PeftModel.from_pretrained and vLLM's LoRA loader read unchanged."""
    from safetensors.torch import save_file
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    if any(m.merged for _, m in layers):
        raise ValueError("save_adapter: unmerge the adapters first (merged weights hide B A in W)")
    first = layers[0][1]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    os.makedirs(path, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.lora_alpha, "lora_dropout": dropout, "bias": "none",
        # a regex string: PEFT fullmatches it against module names, which selects exactly the
        # wrapped layers (a list of suffixes would also catch the vision tower's q_proj)
        "target_modules": "|".join(re.escape(n) for n, _ in layers),
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "revision": None,
    }
    for name, data in [(WEIGHTS_NAME, None), (CONFIG_NAME, config)]:
        tmp = os.path.join(path, name + ".tmp")  # write then rename: a crash never leaves half a file
        if data is None:
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2)
        os.replace(tmp, os.path.join(path, name))


def load_adapter(model, path):
    """Load a PEFT-format LoRA adapter into `model`. If the model has no LoRA layers yet they are
    added from adapter_config.json. Every key must match an adapter of the right shape and every
    adapter must get its weights; anything else raises, naming the keys (a silently unmatched
    adapter would do nothing)."""
    from safetensors.torch import load_file
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_adapter: {p} not found")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    if not lora_layers(model):
        targets = config["target_modules"]
        if isinstance(targets, list):  # PEFT's other form: module-name suffixes
            targets = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"
        add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets)
    load_lora_state_dict(model, load_file(weights_path), weights_path)
    return config


def load_lora_state_dict(model, state, where="state dict"):
    """Copy adapter weights into the model's LoRA layers. Keys as `lora_state_dict` writes them, or with
    PEFT's prefix and `.default.` names. Every key must match an adapter of the right shape and every
    adapter must get its weights; anything else raises, naming the keys and `where` they came from (a
    silently unmatched adapter would do nothing)."""
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    loaded = {}
    for key, value in state.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        if name not in expected:
            raise KeyError(f"{where}: key {key!r} matches no LoRA layer of the model "
                           f"(expected keys like {PEFT_PREFIX}{next(iter(expected))!r})")
        if value.shape != expected[name]:
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}, "
                             f"the model's adapter has {tuple(expected[name])}")
        loaded[name] = value
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise KeyError(f"{where}: no weights for {len(missing)} LoRA tensors, e.g. {missing[:3]}")
    modules = dict(lora_layers(model))
    with torch.no_grad():
        for name, value in loaded.items():
            module_name, _, which = name.rpartition(".lora_")  # "...q_proj", "A.weight"
            target = modules[module_name].lora_A if which.startswith("A") else modules[module_name].lora_B
            target.weight.copy_(value)


def lora_state_dict(model):
    """{module path}.lora_A.weight / .lora_B.weight -> tensor, for every adapter (no other keys)."""
    sd = {}
    for name, m in lora_layers(model):
        sd[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def lora_layers(model):
    """(qualified name, LoRALinear) for every adapter in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
