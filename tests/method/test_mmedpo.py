"""MMedPO's math against hand-worked values: the loss, Z(.), the log-probs, the schedule.

    python -m pytest -q tests/method
"""
import math

import pytest
import torch

import mmedpo
from mmedpo import IGNORE_INDEX, mmedpo_loss, normalize_scores, sequence_logps, token_logps

# the worked example of docs/method.md (policy chosen/rejected, reference chosen/rejected; beta 0.1)
PC, PR = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
RC, RR = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -16.0])


def per_pair_losses(pc, pr, rc, rr, beta=0.1):
    # one pair at a time, so the batch mean is never involved
    return [mmedpo_loss(pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], [1.0], beta)[0].item()
            for i in range(len(pc))]


def mean_loss(*a, **k):
    losses, chosen, rejected = mmedpo_loss(*a, **k)
    return losses.mean(), chosen, rejected


def test_worked_values():
    assert per_pair_losses(PC, PR, RC, RR) == pytest.approx([0.5981389, 0.7981389], abs=1e-6)
    loss, chosen, rejected = mean_loss(PC, PR, RC, RR, torch.ones(2))
    assert loss.item() == pytest.approx((0.5981389 + 0.7981389) / 2, abs=1e-6)
    loss, _, _ = mean_loss(PC, PR, RC, RR, torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx(0.7976736, abs=1e-6)  # mean, not divided by sum(w)
    assert chosen.tolist() == pytest.approx([0.1, -0.1])
    assert rejected.tolist() == pytest.approx([-0.1, 0.1])


def test_policy_equals_reference_costs_ln2_times_weight():
    x = torch.tensor([-3.0, -7.0, -1.5])
    w = torch.tensor([1.0, 0.8, 1.2])
    loss, _, _ = mean_loss(x, x - 2, x, x - 2, w)
    assert loss.item() == pytest.approx(math.log(2) * w.mean().item(), abs=1e-6)


def test_gradient_is_analytic_and_weights_get_none():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    w = torch.tensor([2.0, 0.5], requires_grad=True)
    beta = 0.1
    loss, _, _ = mean_loss(pc, pr, RC, RR, w, beta)
    loss.backward()
    delta = (PC - RC) - (PR - RR)
    expected = -w.detach() * beta * torch.sigmoid(-beta * delta) / len(delta)  # / B for the mean
    assert torch.allclose(pc.grad, expected, atol=1e-7)
    assert torch.allclose(pr.grad, -expected, atol=1e-7)
    assert w.grad is None


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="5 non-empty"):
        mmedpo_loss(PC, PR, RC, RR, torch.ones(3))
    with pytest.raises(ValueError):
        mmedpo_loss(PC[:0], PR[:0], RC[:0], RR[:0], torch.ones(0))


def test_normalize_reaches_mean_1_var_01_before_clipping():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1000, generator=g) * 3 + 7
    wide = normalize_scores(s, lo=-100, hi=100)  # no clipping
    assert wide.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert wide.var(unbiased=False).item() == pytest.approx(0.1, abs=1e-5)
    w = normalize_scores(s)
    assert w.min().item() == pytest.approx(0.75) and w.max().item() == pytest.approx(1.25)
    # clipping is the only difference
    assert torch.equal(w, wide.clamp(0.75, 1.25))


def test_normalize_hand_values_and_constant():
    # s = [0, 1, 2]: mean 1, std sqrt(2/3); z = [-1.2247, 0, 1.2247]; 1 + sqrt(.1) z = [0.6127, 1, 1.3873]
    assert normalize_scores([0, 1, 2]).tolist() == pytest.approx([0.75, 1.0, 1.25])
    assert normalize_scores([0, 1, 2], lo=0, hi=2).tolist() == pytest.approx([0.612702, 1.0, 1.387298], abs=1e-6)
    assert normalize_scores([4.0, 4.0, 4.0]).tolist() == [1.0, 1.0, 1.0]
    assert normalize_scores([4.0]).tolist() == [1.0]


def test_normalize_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="positions \\[1\\]"):
        normalize_scores([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="finite"):
        normalize_scores([1.0, float("inf")])
    with pytest.raises(ValueError, match="non-empty"):
        normalize_scores([])


def slow_sequence_logps(logits, labels):
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                total += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].item()
        out.append(total)
    return torch.tensor(out)


def test_sequence_logps_matches_slow_loop_with_padding_on_both_sides():
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX          # prompt, response, right padding
    labels[0, 7:] = IGNORE_INDEX
    labels[1, :6] = IGNORE_INDEX          # left padding + prompt
    labels[2, :2] = IGNORE_INDEX          # response up to the end
    fast = sequence_logps(logits, labels)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, slow_sequence_logps(logits, labels).float(), atol=1e-4)
    # bf16 logits are upcast: the same result as upcasting by hand first
    bf = logits.bfloat16()
    assert torch.allclose(sequence_logps(bf, labels), sequence_logps(bf.float(), labels))


def test_sequence_logps_one_token_shift_hand_value():
    # vocabulary of 2, uniform logits except position 0 which is sure of token 1
    logits = torch.zeros(1, 3, 2)
    logits[0, 0] = torch.tensor([0.0, 100.0])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    # token 1 at t=1 is predicted by position 0 (log p ~ 0), token 0 at t=2 by position 1 (log 1/2)
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_sequence_logps_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.long"):
        sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 3))


def test_token_logps_sum_is_sequence_logps_and_mask_marks_the_response():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]])
    logps, mask = token_logps(logits, labels)
    assert logps.shape == mask.shape == (2, 4)
    assert mask.tolist() == [[False, True, True, False], [True, True, True, True]]
    assert (logps[~mask] == 0).all()
    assert logps[0, 1].item() == pytest.approx(logits[0, 1].log_softmax(-1)[3].item(), abs=1e-6)
    assert torch.allclose(logps.sum(-1), sequence_logps(logits, labels))


def test_lr_schedule():
    assert mmedpo.get_lr(0, 1.0, 4, 100) == pytest.approx(0.25)
    assert mmedpo.get_lr(3, 1.0, 4, 100) == pytest.approx(1.0)
    assert mmedpo.get_lr(52, 1.0, 4, 100) == pytest.approx(0.5)
    assert mmedpo.get_lr(100, 1.0, 4, 100) == pytest.approx(0.0)
