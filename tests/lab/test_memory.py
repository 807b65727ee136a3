"""lab/memory.py: a training step's memory from a config, against hand-worked values and published counts."""
import pytest

from lab import memory

SMALL = {"text_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "vocab_size": 10},
         "vision_config": {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "image_size": 4, "patch_size": 2}}


def test_parameter_counts_by_hand():
    # text: embed 80 + 2 layers x (q 64 + k, v 2 x 32 + o 64 + MLP 3 x 128 + norms 16 = 592) + final norm 8 + head 80
    # vision: patch 3*2*2*4 = 48, class 4, positions 5*4 = 20, pre/post norms 16; layer 4*16+16 + 2*32+8+4 + 16 = 172
    # projector 4*8 + 8 + 64 + 8; LoRA per rank: 2 x (16 + 2*12 + 16 + 2*24 + 24)
    assert memory.params(SMALL) == {"text": 1352, "vision": 260, "projector": 112, "lora_per_r": 256}


def test_step_memory_by_hand():
    # per token and layer (no dropout): 4*16 + 8*8 + T 5 + 7*r 1 + heads 2 = 142 elements; 10 tokens, 2 bytes
    p = memory.step_memory(SMALL, rows=2, length=5, scored=3, lora_r=1, weight_bytes=2, act_bytes=2, grad_ckpt=False,
                           dropout=False)
    assert p["weights"] == (1352 + 260 + 112) * 2 and p["lora"] == 256 * 16
    assert p["activations"] == 2 * 10 * 142 * 2 and p["layer_backward"] == 2840 / 2    # half a layer's 2840
    assert p["logits"] == 3 * 2 * 3 * 10 * 4          # 720 bytes: below half a layer, so the layer's 1420 counts
    assert p["total"] == 3448 + 4096 + 5680 + 1420 and p["step"] == p["total"] - 3448
    # checkpointing keeps each layer's input (10 tokens x H 8 x 2 bytes); in backward one layer is recomputed
    # (2840) and half of it is alive again as gradients
    c = memory.step_memory(SMALL, 2, 5, 3, lora_r=1, grad_ckpt=True, dropout=False)
    assert c["activations"] == 2 * 10 * 8 * 2 and c["layer_backward"] == 1.5 * 2840
    assert c["total"] == 3448 + 4096 + 320 + 4260
    # dropout keeps 5 I + 15 H a token and layer; logits at every position of the full path
    d = memory.step_memory(SMALL, 2, 5, 5, lora_r=1, grad_ckpt=False, dropout=True)
    assert d["activations"] == 2 * 10 * (80 + 120 + 5 + 7 + 2) * 2 and d["logits"] == 3 * 2 * 5 * 10 * 4
    # the peak is at the head when the logits outweigh half a layer: V 1000, every position scored
    big = {**SMALL, "text_config": {**SMALL["text_config"], "vocab_size": 1000}}
    h = memory.step_memory(big, 2, 5, 5, lora_r=1, grad_ckpt=False, dropout=False)
    assert h["logits"] == 3 * 2 * 5 * 1000 * 4 and h["total"] == h["weights"] + h["lora"] + h["activations"] + h["logits"]


def test_llava_med_counts_match_the_published_sizes():
    config = memory.read_config(memory.LLAVA_MED_CONFIG)
    n = memory.params(config)
    assert n["text"] == 7_241_732_096                 # Mistral-7B's published parameter count
    assert 303e6 < n["vision"] < 304e6                # CLIP ViT-L/14 at 336 px, vision tower
    assert n["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    # the window path scores ~61 of ~717 positions: the logits part shrinks by that ratio, the rest stays
    full, window = (memory.step_memory(config, 8, 717, s) for s in (717, 61))
    assert full["logits"] / window["logits"] == pytest.approx(717 / 61)
    assert full["weights"] == window["weights"] and full["activations"] == window["activations"]


def test_bad_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"text_config": {"hidden_size": 8}}')
    with pytest.raises(SystemExit, match="config.json.*vision_config|config.json.*missing"):
        memory.read_config(str(path))
