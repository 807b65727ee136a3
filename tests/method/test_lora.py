"""LoRA: identity at init, merge, disable, freezing, PEFT-format save/load.
python -m pytest -q tests/test_lora.py"""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import lora


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d))
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.mlp.down_proj = nn.Linear(2 * d, d)

    def forward(self, x):
        a = self.self_attn
        x = x + a.o_proj(torch.tanh(a.q_proj(x) + a.k_proj(x) * a.v_proj(x)))
        return x + self.mlp.down_proj(torch.relu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


class ToyLlava(nn.Module):
    """The module names of transformers' LlavaForConditionalGeneration, nothing else."""

    def __init__(self, d=8):
        super().__init__()
        self.model = nn.Module()
        self.model.vision_tower = nn.Module()
        self.model.vision_tower.layers = nn.ModuleList([Block(d)])       # CLIP also has q_proj...
        self.model.multi_modal_projector = nn.Module()
        self.model.multi_modal_projector.linear_1 = nn.Linear(d, d)
        self.model.language_model = nn.Module()
        self.model.language_model.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.model.multi_modal_projector.linear_1(self.model.vision_tower.layers[0](x))
        for layer in self.model.language_model.layers:
            x = layer(x)
        return self.lm_head(x)


def make(seed=0):
    torch.manual_seed(seed)
    return ToyLlava()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))


def test_add_lora_targets_language_model_only_and_starts_as_identity():
    model = make()
    base_out = model(X)
    names = lora.add_lora(model, r=4, alpha=8)
    assert len(names) == 2 * 7
    assert all(n.startswith("model.language_model.") for n in names)
    assert type(model.model.vision_tower.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model(X), base_out)
    # base state_dict names survive (save_pretrained of the base model keeps working)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_only_lora_parameters_train():
    model = make()
    lora.add_lora(model, r=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7


def test_forward_is_the_lora_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 3)
    layer = lora.LoRALinear(base, r=2, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 6)
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_merge_equals_unmerged_and_unmerge_restores():
    model = make()
    lora.add_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    w0 = model.model.language_model.layers[0].self_attn.q_proj.weight.clone()
    out = model(X)
    lora.merge_lora(model)
    assert not torch.equal(model.model.language_model.layers[0].self_attn.q_proj.weight, w0)
    assert torch.allclose(model(X), out, atol=1e-6)
    lora.unmerge_lora(model)
    assert torch.allclose(model.model.language_model.layers[0].self_attn.q_proj.weight, w0, atol=1e-6)
    assert torch.allclose(model(X), out, atol=1e-6)


def test_disable_gives_the_base_merged_or_not():
    model = make()
    base_out = model(X)
    lora.add_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    adapted = model(X)
    assert not torch.allclose(adapted, base_out)
    with lora.disable_lora(model):
        assert torch.allclose(model(X), base_out, atol=1e-6)
    assert torch.equal(model(X), adapted)  # switched back on
    lora.merge_lora(model)
    with lora.disable_lora(model):
        assert torch.allclose(model(X), base_out, atol=1e-5)


def test_save_load_round_trip_in_peft_format(tmp_path):
    model = make()
    lora.add_lora(model, r=4, alpha=8, dropout=0.05)
    randomize_adapters(model)
    model.eval()
    out = model(X)
    lora.save_adapter(model, tmp_path, base_model_name_or_path="toy")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["lora_dropout"] == 0.05 and cfg["bias"] == "none" and cfg["base_model_name_or_path"] == "toy"
    assert cfg["task_type"] and cfg["target_modules"]
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in keys)
    assert len(keys) == 2 * 2 * 7

    fresh = make()  # same base weights, no adapters yet: load_adapter adds them from the config
    lora.load_adapter(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(fresh(X), out)
    # the stored target_modules regex selects exactly the wrapped layers, as PEFT would read it
    import re
    wrapped = [n for n, _ in lora.lora_layers(fresh)]
    assert [n for n, _ in make().named_modules() if re.fullmatch(cfg["target_modules"], n)] == wrapped


def saved_adapter(tmp_path):
    """(path, tensors) of a freshly saved r=4 adapter of `make()`."""
    model = make()
    lora.add_lora(model, r=4, alpha=8)
    lora.save_adapter(model, tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    return path, load_file(path)


def test_load_rejects_an_unknown_key_naming_it(tmp_path):
    path, tensors = saved_adapter(tmp_path)
    bad = "base_model.model.model.language_model.layers.0.self_attn.qq_proj.lora_A.weight"
    tensors[bad] = tensors.pop("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight")
    save_file(tensors, path)
    with pytest.raises(KeyError, match="qq_proj"):
        lora.load_adapter(make(), tmp_path)


def test_load_rejects_missing_weights_and_wrong_shapes(tmp_path):
    path, tensors = saved_adapter(tmp_path)
    key = "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, path)
    with pytest.raises(KeyError, match="no weights for 1"):
        lora.load_adapter(make(), tmp_path)
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter(make(), tmp_path)


def test_add_lora_with_no_match_says_so():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lora.add_lora(make(), targets=r".*nothing_here")
