"""The mechanism readings (world/mechanism.py) on a toy model whose gradients are known by hand.
python -m pytest -q tests/world/test_mechanism.py"""
import pytest
import torch

from world import mechanism


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


def toy_loss(model, batch, ref, weights, args):
    """Records of group a pull w[0] (loss = -x w[0]), of group b push w[1]; group c's loss is constant."""
    x, g = batch["x"], batch["g"]
    per = torch.where(g == 0, -x * model.w[0], torch.where(g == 1, x * model.w[1], 0 * model.w.sum() + 1.0))
    return per * weights, {}


def test_gradient_shares_split_the_first_step_by_group_and_sum_to_one():
    """Group a: 3 records of x=1 (gradient -1 on w0 each), b: 1 record of x=2 (+2 on w1), c: constant. The
    uniform-batch gradient is (3 (-1) e0 + 1 (2) e1 + 0) / 6 = (-0.5, 0.333); a's share is 0.25 / 0.3611."""
    records = [{"source": "text", "qtype": q} for q in ("a", "a", "a", "b", "c", "c")]
    xs, gs = torch.tensor([1.0, 1, 1, 2, 5, 5]), torch.tensor([0, 0, 0, 1, 2, 2])
    load = lambda idx: ({"x": xs[idx], "g": gs[idx]}, torch.zeros(len(idx), 2), torch.ones(len(idx)))
    model = Toy()
    state = torch.get_rng_state()
    shares = mechanism.gradient_shares(model, toy_loss, load, records, None, per_group=16, batch_size=2, log=lambda *a: None)
    total = 0.25 + 1 / 9
    assert shares["text/a"]["share"] == pytest.approx(0.25 / total) and shares["text/b"]["share"] == pytest.approx((1 / 9) / total)
    assert shares["text/c"]["share"] == pytest.approx(0.0) and sum(v["share"] for v in shares.values()) == pytest.approx(1.0)
    assert shares["text/a"]["n"] == 3 and model.w.grad is None and torch.equal(torch.get_rng_state(), state)


def test_chosen_moves_by_group(monkeypatch):
    """The trained policy's log P(chosen) against the reference's, per group: mean change and share that fell."""
    records = [{"source": "text", "qtype": "a"}, {"source": "text", "qtype": "a"}, {"source": "visual", "qtype": "a"}]
    policy = torch.tensor([-1.0, -3.0, -2.0])
    ref = torch.tensor([[-2.0, 0.0], [-2.0, 0.0], [-1.0, 0.0]])
    monkeypatch.setattr(mechanism.data, "response_logps",
                        lambda model, batch, k, first=None: (None, policy[batch][:, None, None], None))
    moves = mechanism.chosen_moves(Toy(), lambda idx: (torch.tensor(idx), None, None), records, ref, 2, batch_size=2,
                                   log=lambda *a: None)
    assert moves["text/a"] == {"mean": pytest.approx(0.0), "fell": pytest.approx(0.5), "n": 2}
    assert moves["visual/a"] == {"mean": pytest.approx(-1.0), "fell": pytest.approx(1.0), "n": 1}
