"""Each objective's loss adapter (train.py, hscr.py, fire.py) on a scripted batch, against losses computed
independently: token log-probs by an explicit loop, the formulas written out per record. A swapped row, a
mask shifted by one token or a flipped sign fails here.  python -m pytest -q tests/test_objectives.py"""
import contextlib
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import reading
import train
from lab.fire import fire_objective_loss
from lab.hscr import hscr_objective_loss

V, T, B = 7, 9, 2


class Scripted(nn.Module):
    """A bigram 'model' whose logits depend on the token and on the image (its mean pixel)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(V, V)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(V, V, generator=g))
            self.proj.bias.copy_(torch.randn(V, generator=g))

    def forward(self, input_ids, attention_mask, pixel_values):
        x = F.one_hot(input_ids, V).float() + 3 * pixel_values.float().mean((1, 2, 3))[:, None, None]
        return types.SimpleNamespace(logits=self.proj(x))


@pytest.fixture(scope="module")
def model():
    m = Scripted()
    lora.add_lora(m, r=2, alpha=2, dropout=0.0, targets="proj")
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            layer.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
    return m


def scripted_batch(k, seed=0):
    """k*B rows, response-major; every row has its own tokens, image and response length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (k * B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100                                              # the prompt
    for i in range(k * B):
        labels[i, T - (i % 3):] = -100                                # padding of different lengths
    edit = (torch.rand(k * B, T, generator=g) > 0.5).float() * (labels != -100)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.rand(k * B, 3, 2, 2, generator=g), "edit_mask": edit}


def row_token_logps(model, batch, row, disabled=False):
    """{position t of the label: log p(label_t | tokens < t)} of one row, one position at a time."""
    with torch.no_grad(), (lora.disable_lora(model) if disabled else contextlib.nullcontext()):
        logits = model(batch["input_ids"][row:row + 1], None, batch["pixel_values"][row:row + 1]).logits[0]
    out = {}
    for t in range(1, T):
        label = int(batch["labels"][row, t])
        if label != -100:
            out[t] = float(logits[t - 1].double().log_softmax(-1)[label])
    return out


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_preference_loss_weighted_dpo_per_record(model):
    batch, ref = scripted_batch(2), torch.tensor([[-9.0, -11.0], [-12.5, -10.0]])
    weights, args = torch.tensor([1.5, 0.5]), types.SimpleNamespace(beta=0.1, nll_weight=0.0, anchor_weight=0.0)
    losses, stats = train.preference_loss(model, batch, ref, weights, args)
    for i in range(B):
        chosen = sum(row_token_logps(model, batch, i).values())
        rejected = sum(row_token_logps(model, batch, B + i).values())
        margin = 0.1 * ((chosen - ref[i, 0].item()) - (rejected - ref[i, 1].item()))
        assert losses[i].item() == pytest.approx(-weights[i].item() * logsig(margin), rel=1e-5)
        assert stats["margin"][i].item() == pytest.approx(margin, rel=1e-5)
    args.nll_weight = 2.0
    with_nll, _ = train.preference_loss(model, batch, ref, weights, args)
    chosen0 = row_token_logps(model, batch, 0)
    assert (with_nll - losses)[0].item() == pytest.approx(2.0 * -sum(chosen0.values()) / len(chosen0), rel=1e-5)


def test_sft_control_is_the_chosen_rows_mean_nll(model):
    batch = scripted_batch(2, seed=1)
    losses, _ = train.sft_control_loss(model, batch, torch.zeros(B, 2), torch.ones(B), types.SimpleNamespace())
    for i in range(B):
        lp = row_token_logps(model, batch, i)
        assert losses[i].item() == pytest.approx(-sum(lp.values()) / len(lp), rel=1e-5)


def test_hscr_adapter_prefers_w_over_l1_over_l2(model):
    batch, ref = scripted_batch(3, seed=2), torch.tensor([[-9.0, -11.0, -13.0], [-12.5, -10.0, -8.0]])
    args = types.SimpleNamespace(beta=0.2, hscr_lambda=0.5)
    losses, stats = hscr_objective_loss(model, batch, ref, torch.ones(B), args)
    for i in range(B):
        d = [sum(row_token_logps(model, batch, j * B + i).values()) - ref[i, j].item() for j in range(3)]
        expected = -logsig(0.2 * (d[0] - d[1])) - logsig(0.2 * (d[0] - d[2])) - 0.5 * logsig(0.2 * (d[1] - d[2]))
        assert losses[i].item() == pytest.approx(expected, rel=1e-5)
        assert stats["margin"][i].item() == pytest.approx(0.2 * (d[0] - d[1]), rel=1e-5)


@pytest.mark.parametrize("variant, good, bad", [("corrupted", 3, 2), ("v1", 0, 2), ("v2", 0, 3)])
def test_fire_adapter_is_the_authors_loss(model, variant, good, bad):
    """Rows (v, y_w), (v, y_l), (v*, y_w), (v*, y_l): every reward sums over the edited tokens only; the visual
    pair prefers (v*, y_l) to (v*, y_w) (the authors' default) or, in their ablations, (v, y_w) to (v*, y_w)
    (v1) or to (v*, y_l) (v2); the KL is summed over y_w's edited positions."""
    batch, ref = scripted_batch(4, seed=3), torch.zeros(B, 4)
    args = types.SimpleNamespace(beta=0.1, fire_visual=variant, fire_gamma=0.3, fire_alpha=0.2, fire_lambda=0.25)
    losses, stats = fire_objective_loss(model, batch, ref, torch.tensor([1.0, 2.0]), args)
    edited = lambda row, t: batch["edit_mask"][row, t].item()   # the mask sits on the label positions
    for i in range(B):
        rows = [j * B + i for j in range(4)]
        reward = []
        for row in rows:
            pol, base = row_token_logps(model, batch, row), row_token_logps(model, batch, row, disabled=True)
            reward.append(sum(edited(row, t) * (pol[t] - base[t]) for t in pol))
        tok, vis = 0.1 * (reward[0] - reward[1]), 0.1 * (reward[good] - reward[bad])
        w = rows[0]
        with torch.no_grad():
            p = model(batch["input_ids"][w:w + 1], None, batch["pixel_values"][w:w + 1]).logits[0].double().log_softmax(-1)
            with lora.disable_lora(model):
                q = model(batch["input_ids"][w:w + 1], None, batch["pixel_values"][w:w + 1]).logits[0].double().log_softmax(-1)
        kl = sum(edited(w, t) * (0.25 * float((q[t - 1].exp() * (q[t - 1] - p[t - 1])).sum()) +
                                 0.75 * float((p[t - 1].exp() * (p[t - 1] - q[t - 1])).sum()))
                 for t in row_token_logps(model, batch, w))          # summed over y_w's edited positions
        expected = (1.0, 2.0)[i] * (-logsig(tok) + 0.3 * -logsig(vis) + 0.2 * kl)
        assert losses[i].item() == pytest.approx(expected, rel=1e-4)
        assert stats["l_kl"][i].item() == pytest.approx(kl, rel=1e-3) and kl > 1e-4
        assert stats["margin"][i].item() == pytest.approx(tok, rel=1e-4, abs=1e-7)
        assert stats["margin_vis"][i].item() == pytest.approx(vis, rel=1e-4, abs=1e-7) and abs(vis) > 1e-4


def test_anchored_preference_losses(model):
    """RPO's NLL and mDPO's anchor, -log s(beta (log pi(y_w) - log ref(y_w))), each added to the weighted DPO."""
    batch, ref = scripted_batch(2), torch.tensor([[-9.0, -11.0], [-12.5, -10.0]])
    weights = torch.tensor([1.5, 0.5])
    plain, _ = train.preference_loss(model, batch, ref, weights, types.SimpleNamespace(beta=0.1, nll_weight=0.0,
                                                                                      anchor_weight=0.0))
    anchored, stats = train.preference_loss(model, batch, ref, weights, types.SimpleNamespace(beta=0.1, nll_weight=0.0,
                                                                                             anchor_weight=3.0))
    for i in range(B):
        chosen = sum(row_token_logps(model, batch, i).values())
        anchor = -logsig(0.1 * (chosen - ref[i, 0].item()))
        assert (anchored - plain)[i].item() == pytest.approx(3.0 * anchor, rel=1e-5)
        assert stats["anchor"][i].item() == pytest.approx(anchor, rel=1e-5)


@pytest.mark.parametrize("adapter, k, home", [(train.preference_loss, 2, "train.py"),
                                              (hscr_objective_loss, 3, "lab/hscr.py"), (fire_objective_loss, 4, "lab/fire.py")])
def test_a_loss_adapter_reads_downward_into_data_and_mmedpo(model, adapter, k, home):
    """From the objective's adapter a reader goes into data.py (the forward, per response), mmedpo.py (the
    math) and the LoRA layers only, and never climbs back up inside a file."""
    args = types.SimpleNamespace(beta=0.1, nll_weight=0.0, anchor_weight=1.0, hscr_lambda=0.5, fire_visual="corrupted",
                                 fire_gamma=0.3, fire_alpha=0.2, fire_lambda=0.25)
    _, calls = reading.project_calls(adapter, model, scripted_batch(k), torch.zeros(B, k), torch.ones(B), args)
    reached = reading.functions(calls)
    assert {f for f, _, _ in reached} <= {home, "data.py", "mmedpo.py", "lora.py"}
    assert ("data.py", "response_logps") in {(f, q) for f, q, _ in reached}
    assert reading.upward_calls(calls) == []
