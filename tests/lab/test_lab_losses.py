"""HSCR's and FiRe-MPO's losses against hand-worked values and slow loops (our readings; FiRe-MPO's as
its authors' code defines it).  python -m pytest -q tests/lab/test_lab_losses.py"""
import math

import pytest
import torch

from lab.fire import bidirectional_kl, fire_token_loss
from lab.hscr import hscr_loss, hscr_step_scores


def test_hscr_loss_hand_values():
    # policy w/l1/l2 = -10/-12/-15, reference -11/-11/-14: D = 1, -1, -1
    pol = [torch.tensor([v]) for v in (-10.0, -12.0, -15.0)]
    ref = [torch.tensor([v]) for v in (-11.0, -11.0, -14.0)]
    explicit = -math.log(1 / (1 + math.exp(-0.2)))                   # margin 0.1 * 2 = 0.2
    assert explicit == pytest.approx(0.598139, abs=1e-6)
    losses, margins = hscr_loss(*pol, *ref, beta=0.1, lam=1.0)
    assert losses.item() == pytest.approx(2 * 0.598139 + math.log(2), abs=1e-6)   # 1.889425
    assert losses.item() == pytest.approx(1.889425, abs=1e-6)
    assert margins["margin_w_l1"].item() == pytest.approx(0.2) and margins["margin_l1_l2"].item() == 0.0
    no_implicit, _ = hscr_loss(*pol, *ref, beta=0.1, lam=0.0)
    assert no_implicit.item() == pytest.approx(2 * 0.598139, abs=1e-6)
    weighted, _ = hscr_loss(*pol, *ref, beta=0.1, lam=1.0, weights=torch.tensor([0.5]))
    assert weighted.item() == pytest.approx(0.5 * 1.889425, abs=1e-6)


def test_hscr_loss_gradient_pushes_the_levels_apart():
    w, l1, l2 = (torch.tensor([v], requires_grad=True) for v in (-10.0, -12.0, -15.0))
    ref = [torch.tensor([v]) for v in (-11.0, -11.0, -14.0)]
    losses, _ = hscr_loss(w, l1, l2, *ref)
    losses.sum().backward()
    assert w.grad.item() < 0 and l2.grad.item() > 0          # raise y_w, lower y_l2
    # y_l1 is pushed down by the explicit term and up by the implicit one
    s = lambda m: 1 / (1 + math.exp(m))
    assert l1.grad.item() == pytest.approx(0.1 * s(0.2) - 0.1 * s(0.0), abs=1e-6)


def test_hscr_step_scores_hand_values():
    full, dropped = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    shift, reward = hscr_step_scores(full, dropped, torch.tensor([0]))
    assert reward.item() == pytest.approx(2.0, abs=1e-6)
    p0, p1 = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    assert shift.item() == pytest.approx(2 * (p0 - p1), abs=1e-6) and shift.item() == pytest.approx(1.360958, abs=1e-6)
    same_shift, same_reward = hscr_step_scores(full, full, torch.tensor([0]))   # p = 0: nothing hidden
    assert same_shift.item() == pytest.approx(0.0, abs=1e-7) and same_reward.item() == 0.0


def test_fire_token_loss_hand_values_and_slow_loop():
    rho_w, rho_l = torch.tensor([[0.0, 0.5, 0.1]]), torch.tensor([[0.0, -0.2, -0.2]])
    zero, mask = torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 0.0]])
    losses, margin = fire_token_loss(rho_w, zero, mask, rho_l, zero, mask, beta=0.1)
    assert margin.item() == pytest.approx(0.07) and losses.item() == pytest.approx(0.658760, abs=1e-6)
    ones = torch.ones(1, 3)
    losses, margin = fire_token_loss(rho_w, zero, ones, rho_l, zero, ones, beta=0.1)
    assert margin.item() == pytest.approx(0.1) and losses.item() == pytest.approx(0.644397, abs=1e-6)
    # against a slow per-token loop on random values
    g = torch.Generator().manual_seed(0)
    pw, rw, pl, rl = (torch.randn(3, 5, generator=g) for _ in range(4))
    mw, ml = (torch.randint(0, 2, (3, 5), generator=g).float() for _ in range(2))
    fast, _ = fire_token_loss(pw, rw, mw, pl, rl, ml, beta=0.3)
    for i in range(3):
        s = sum((pw[i, t] - rw[i, t]) * mw[i, t] for t in range(5)) - sum((pl[i, t] - rl[i, t]) * ml[i, t] for t in range(5))
        assert fast[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.3 * s.item()))), abs=1e-5)


def test_bidirectional_kl_hand_values_and_gradient_through_the_policy_only():
    ref = torch.log(torch.tensor([[[0.5, 0.5]]]))
    pol = torch.log(torch.tensor([[[0.9, 0.1]]])).requires_grad_()
    mask = torch.ones(1, 1)
    assert bidirectional_kl(pol, ref, mask, lam=1.0).item() == pytest.approx(0.510826, abs=1e-6)   # KL(ref || pi)
    assert bidirectional_kl(pol, ref, mask, lam=0.0).item() == pytest.approx(0.368064, abs=1e-6)   # KL(pi || ref)
    both = bidirectional_kl(pol, ref, mask, lam=0.5)
    assert both.item() == pytest.approx(0.439445, abs=1e-6)
    assert bidirectional_kl(ref, ref, mask).item() == pytest.approx(0.0, abs=1e-7)
    ref_leaf = ref.clone().requires_grad_()
    bidirectional_kl(pol, ref_leaf, mask).sum().backward()
    assert pol.grad is not None and pol.grad.abs().sum() > 0 and ref_leaf.grad is None
    # masked positions do not count; the KL is summed over the masked ones (the authors' code), not averaged
    two = torch.cat([pol.detach(), ref], 1)                                # position 2 equals the reference
    assert bidirectional_kl(two, torch.cat([ref, ref], 1), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.439445, abs=1e-6)
    assert bidirectional_kl(two, torch.cat([ref, ref], 1), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-7)
    twice = torch.cat([pol.detach(), pol.detach()], 1)
    assert bidirectional_kl(twice, torch.cat([ref, ref], 1), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(2 * 0.439445, abs=1e-6)
