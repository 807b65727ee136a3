"""Localized lesion noise and heatmaps.  python -m pytest -q tests/test_noise.py"""
import math

import pytest
import torch

from noise import (attention_heatmap, detect_lesions, diffusion_schedule, gaussian_blur, heatmap_from_boxes,
                   heatmap_from_mask, localized_noise, smooth_heatmap)


def images(B=2, C=3, H=16, W=16, seed=0):
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def test_schedule_values():
    betas, abar = diffusion_schedule()
    assert betas.shape == abar.shape == (1000,)
    # beta_0 = sigmoid(-6) * (5e-3 - 1e-5) + 1e-5
    assert betas[0].item() == pytest.approx(1 / (1 + math.exp(6)) * (5e-3 - 1e-5) + 1e-5, rel=1e-9)
    assert abar[0].item() == pytest.approx(1 - betas[0].item(), rel=1e-12)
    assert abar[2].item() == pytest.approx(((1 - betas[0]) * (1 - betas[1]) * (1 - betas[2])).item(), rel=1e-12)
    assert abar[500].item() == pytest.approx(0.7448, abs=1e-4)
    assert (abar[1:] < abar[:-1]).all()


def test_zero_heatmap_returns_image_bit_for_bit():
    x = images()
    out = localized_noise(x, torch.zeros(2, 16, 16), k=999, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_outside_heatmap_untouched_inside_changed():
    x = images()
    h = torch.zeros(2, 16, 16)
    h[:, 4:8, 4:8] = 1.0
    out = localized_noise(x, h, generator=torch.Generator().manual_seed(0))
    outside = (h == 0).unsqueeze(1).expand_as(x)
    assert torch.equal(out[outside], x[outside])
    assert (out[~outside] != x[~outside]).all()


def test_statistics_inside_heatmap_match_the_formula():
    k = 500
    _, abar = diffusion_schedule()
    a = abar[k].item()
    x = torch.full((4, 1, 256, 256), 0.6)  # 262k pixels: standard error of the mean ~0.001
    out = localized_noise(x, torch.ones(4, 256, 256), k=k, generator=torch.Generator().manual_seed(3))
    assert out.mean().item() == pytest.approx(math.sqrt(a) * 0.6, abs=5e-3)
    assert out.std().item() == pytest.approx(math.sqrt(1 - a), abs=5e-3)
    # a soft heatmap value h mixes: mean sqrt(a) x h + x (1 - h), std sqrt(1 - a) h
    out = localized_noise(x, torch.full((4, 256, 256), 0.5), k=k, generator=torch.Generator().manual_seed(4))
    assert out.mean().item() == pytest.approx(0.5 * math.sqrt(a) * 0.6 + 0.3, abs=5e-3)
    assert out.std().item() == pytest.approx(0.5 * math.sqrt(1 - a), abs=5e-3)


def test_same_seed_same_image_other_seed_other_image():
    x, h = images(), torch.ones(2, 16, 16)
    a = localized_noise(x, h, generator=torch.Generator().manual_seed(7))
    b = localized_noise(x, h, generator=torch.Generator().manual_seed(7))
    c = localized_noise(x, h, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad_images, bad_heatmap, k, message", [
    (torch.rand(3, 16, 16), torch.zeros(3, 16, 16), 500, "images must be"),                  # no channel dim
    (torch.randint(0, 255, (1, 1, 16, 16)), torch.zeros(1, 16, 16), 500, "images must be"),  # integer pixels
    (torch.rand(0, 1, 16, 16), torch.zeros(0, 16, 16), 500, "empty batch"),
    (torch.rand(2, 1, 16, 16), torch.zeros(2, 8, 8), 500, "heatmap must be"),                # wrong size
    (torch.rand(2, 1, 16, 16), torch.zeros(16, 16), 500, "heatmap must be"),                  # no silent broadcast
    (torch.rand(1, 1, 16, 16), torch.full((1, 16, 16), 1.5), 500, "\\[0, 1\\]"),
    (torch.rand(1, 1, 16, 16), torch.zeros(1, 16, 16), 1000, "k must be"),
    (torch.rand(1, 1, 16, 16), torch.zeros(1, 16, 16), -1, "k must be"),
])
def test_bad_input_is_named(bad_images, bad_heatmap, k, message):
    with pytest.raises(ValueError, match=message):
        localized_noise(bad_images, bad_heatmap, k=k)


def test_mask_and_boxes():
    mask = torch.zeros(5, 6, dtype=torch.uint8)
    mask[1, 2] = 255
    h = heatmap_from_mask(mask)
    assert h.dtype == torch.float32 and h.sum() == 1 and h[1, 2] == 1
    h = heatmap_from_boxes([(1, 2, 4, 3), (4, 4, 99, 99)], 5, 6)  # second box is clipped
    assert h[2, 1:4].tolist() == [1, 1, 1] and h[2, 0] == 0 and h[1].sum() == 0
    assert h[4, 4:].tolist() == [1, 1] and h.sum() == 5
    with pytest.raises(ValueError, match="box 0"):
        heatmap_from_boxes([(3, 3, 1, 1)], 5, 6)


def test_blur_keeps_mass_and_smooth_heatmap_peaks_at_one():
    x = torch.zeros(21, 21)
    x[10, 10] = 1.0
    b = gaussian_blur(x, 2.0)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert b[10, 10] == b.max() and b[10, 12].item() == pytest.approx(b[10, 10].item() * math.exp(-0.5), rel=1e-4)
    s = smooth_heatmap(heatmap_from_boxes([(8, 8, 13, 13)], 21, 21), 1.5)
    assert s.max().item() == pytest.approx(1.0) and s[10, 10] == 1.0 and 0 < s[10, 14] < 1


def test_detector_finds_a_planted_disc_and_is_unsure_on_blank():
    g = torch.Generator().manual_seed(0)
    H = W = 64
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    disc = ((yy - 40) ** 2 + (xx - 20) ** 2) <= 16
    blank = 0.4 + 0.05 * torch.randn(H, W, generator=g)
    image = blank + 0.4 * disc
    heatmap, confidence = detect_lesions(image)
    assert heatmap.shape == (H, W) and heatmap.min() >= 0 and heatmap.max() == 1
    peak = divmod(int(heatmap.argmax()), W)
    assert disc[peak], f"peak at {peak} is outside the disc"
    _, blank_confidence = detect_lesions(blank)
    assert 0 <= blank_confidence < confidence <= 1
    assert confidence > 0.8 and blank_confidence < 0.5
    assert detect_lesions(torch.full((H, W), 0.5))[1] == 0.0
    ridge = blank + 0.4 * ((xx - 32).abs() <= 1)       # a spine-like bright line is not a lesion
    assert detect_lesions(ridge)[1] < 0.2
    both_heatmap, _ = detect_lesions(ridge + 0.4 * disc)
    assert disc[divmod(int(both_heatmap.argmax()), W)]


def test_attention_heatmap_peaks_on_the_attended_patch():
    T, n = 24, 16                                      # 4 text tokens, 16 image tokens (4 x 4), 4 answer tokens
    image = torch.zeros(T, dtype=torch.bool)
    image[4:20] = True
    answer = torch.zeros(T, dtype=torch.bool)
    answer[20:] = True
    attn = torch.full((2, 3, T, T), 1.0 / T)           # uniform elsewhere
    k = 6                                              # image token 6 = row 1, column 2 of the grid
    attn[:, :, 20:, :] = 0.0
    attn[:, :, 20:, 4 + k] = 1.0                       # every answer token looks only at it
    h, confidence = attention_heatmap(attn, image, answer, (32, 32))
    assert h.shape == (32, 32) and h.min() == 0.0 and h.max() == 1.0
    y, x = divmod(int(h.argmax()), 32)
    assert (y // 8, x // 8) == (1, 2)
    assert confidence == pytest.approx(1.0)
    _, flat = attention_heatmap(torch.full((1, 1, T, T), 1.0 / T), image, answer, (32, 32))
    assert flat == pytest.approx(1 / n)
    with pytest.raises(ValueError, match="square"):
        attention_heatmap(attn, torch.arange(T) < 15, answer, (32, 32))


def test_lesion_coverage_is_the_share_of_the_lesion_under_the_noise():
    from noise import lesion_coverage
    mask = torch.zeros(8, 8)
    mask[2:4, 2:6] = 1                                                  # 8 lesion pixels
    h = torch.zeros(8, 8)
    h[2:4, 2:4] = 1.0                                                   # covers 4 of them fully
    h[0, 0] = 1.0                                                       # and a pixel outside the lesion
    assert lesion_coverage(h, mask) == 0.5
    assert lesion_coverage(torch.ones(8, 8), mask) == 1.0 and lesion_coverage(h * 0.5, mask) == 0.25
    assert lesion_coverage(h, torch.zeros(8, 8)) == 0.0                 # no lesion: nothing hidden


class RegionScorer(torch.nn.Module):
    """A stand-in classifier: finding k's logit is 20 x (the mean of region k) - 5."""
    def __init__(self, regions):
        super().__init__()
        self.regions = regions

    def forward(self, x):
        return torch.stack([20 * x[:, 0, r0:r1, c0:c1].mean((1, 2)) - 5 for r0, r1, c0, c1 in self.regions], 1)


def test_occlusion_heatmap_against_a_slow_loop():
    from noise import occlusion_heatmap
    clf = RegionScorer([(2, 6, 2, 6), (10, 14, 8, 12)])
    x = torch.full((16, 16), 0.2)
    x[2:6, 2:6] = 0.9                                                   # a bright lesion where finding 0 looks
    heat, confidence = occlusion_heatmap(clf, x, patch=4, stride=2)
    # slow: every patch position, the fall of the summed probability; each pixel the mean over its patches
    p = lambda img: clf(img[None, None]).sigmoid().sum()
    total, count = torch.zeros(16, 16), torch.zeros(16, 16)
    for i in range(0, 13, 2):
        for j in range(0, 13, 2):
            occluded = x.clone()
            occluded[i:i + 4, j:j + 4] = x.mean()
            total[i:i + 4, j:j + 4] += p(x) - p(occluded)
            count[i:i + 4, j:j + 4] += 1
    slow = (total / count).clamp(min=0)
    slow = slow / slow.max()
    slow = torch.where(slow >= 0.2, slow, torch.zeros_like(slow))
    assert torch.allclose(heat, slow, atol=1e-5)
    assert confidence == pytest.approx(float(clf(x[None, None]).sigmoid().max()))
    assert heat[2:6, 2:6].mean() > 0.5 and heat[10:, :].sum() == 0      # the map sits on the lesion


def test_occlusion_heatmap_of_one_finding_sits_on_that_finding():
    """With `findings`, the map follows that finding's probability alone: two bright lesions, each where one
    finding looks; finding 1's map lies on its own lesion and not on the other, the summed map on both."""
    from noise import occlusion_heatmap
    clf = RegionScorer([(2, 6, 2, 6), (10, 14, 8, 12)])
    x = torch.full((16, 16), 0.2)
    x[2:6, 2:6], x[10:14, 8:12] = 0.9, 0.6                          # finding 0's lesion is the brighter
    both, _ = occlusion_heatmap(clf, x, patch=4, stride=2)
    one, confidence = occlusion_heatmap(clf, x, patch=4, stride=2, findings=[1])
    assert both[2:6, 2:6].mean() > 0.5 and one[2:6, 2:6].sum() == 0 and one[10:14, 8:12].mean() > 0.5
    assert confidence == pytest.approx(float(clf(x[None, None]).sigmoid()[0, 1]))
    assert torch.equal(occlusion_heatmap(clf, x, patch=4, stride=2, findings=[0, 1])[0], both)   # all = the sum


def test_the_lesion_classifier_learns_where_a_finding_is():
    """Trained on 16x16 images with a bright square at a random place in half of them, it separates held-out
    images, and its occlusion map lies on the square."""
    from noise import occlusion_heatmap, train_lesion_classifier
    g = torch.Generator().manual_seed(0)
    def world(n):
        x = 0.3 + 0.05 * torch.randn(n, 16, 16, generator=g)
        y = (torch.arange(n) % 2).float()[:, None]
        for i in torch.nonzero(y[:, 0]).flatten().tolist():
            r, c = torch.randint(1, 11, (2,), generator=g).tolist()
            x[i, r:r + 4, c:c + 4] += 0.5
        return x.clamp(0, 1), y
    x, y = world(256)
    clf = train_lesion_classifier(x, y, steps=150, seed=0)
    test_x, test_y = world(64)
    with torch.no_grad():
        p = clf(test_x[:, None]).sigmoid()[:, 0]
    assert ((p > 0.5).float() == test_y[:, 0]).float().mean() > 0.9
    lesion = test_x[1]
    heat, confidence = occlusion_heatmap(clf, lesion)
    bright = lesion > 0.6
    assert confidence > 0.5 and heat[bright].mean() > 2 * heat[~bright].mean()


def test_training_the_classifier_leaves_the_global_generator_alone():
    """Library code draws from its own generator: a run's later draws (LoRA dropout) never depend on
    whether the visual tool was trained in this process, and the tool depends only on its seed."""
    from noise import train_lesion_classifier
    x, y = torch.rand(8, 16, 16, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 2)
    state = torch.get_rng_state()
    a = train_lesion_classifier(x, y, steps=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)                      # another global state: the same classifier
    b = train_lesion_classifier(x, y, steps=2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
