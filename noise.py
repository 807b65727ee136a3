"""Diffusion-style localized lesion noise and the heatmaps that say where the lesion is.

MMedPO's visual dispreference (paper Sec. 3.1): noise the image only where a visual tool
sees the lesion, so that the "same answer to a damaged image" is a hard negative.

    x* = sqrt(abar_k) * (x . h) + sqrt(1 - abar_k) * (eps . h) + x . (1 - h),   eps ~ N(0, I)

x: images in [0, 1] pixel space (before the processor's mean/std normalization), h in [0, 1]
the lesion heatmap, abar_k the cumulative product of (1 - beta_t) of a diffusion schedule.
h = 1 everywhere is the global noise of the ablation; h = 0 returns x unchanged.

Heatmaps: from a binary mask, from boxes, Gaussian smoothing, a trained lesion classifier (a small
CNN, the default visual tool, as MedKLIP is the paper's) whose occlusion map says where and whose
probability is the confidence, a weight-free blob detector (multi-scale difference of Gaussians), and
the target model's own attention from the answer tokens to the image tokens.

torch + numpy only; copy this file into another project and it works.
Tests:  python -m pytest -q tests/test_noise.py
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# the noise

def localized_noise(images, heatmap, k=500, generator=None, alphas_cumprod=None):
    """Noise `images` where `heatmap` is high, leave them alone where it is 0.

    images:  (B, C, H, W) float, pixel values in [0, 1].
    heatmap: (B, H, W) float in [0, 1], one per image, shared by its channels.
    k:       diffusion step, 0 <= k < T (index into alphas_cumprod, as POVID does).
    generator: torch.Generator for eps, for reproducible pairs.
    returns (B, C, H, W) x*, same dtype. Not clipped: the formula's values leave [0, 1]
    inside the lesion; clip when writing an image file.
    """
    if alphas_cumprod is None:
        _, alphas_cumprod = diffusion_schedule()
    if not (torch.is_tensor(images) and images.is_floating_point() and images.dim() == 4):
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got "
                         f"{getattr(images, 'dtype', type(images))} of shape {tuple(getattr(images, 'shape', ()))}")
    B, C, H, W = images.shape
    if B == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if not (torch.is_tensor(heatmap) and heatmap.is_floating_point()) or tuple(heatmap.shape) != (B, H, W):
        raise ValueError(f"heatmap must be a float tensor of shape (B, H, W) = {(B, H, W)} to match the "
                         f"images, got {getattr(heatmap, 'dtype', type(heatmap))} {tuple(getattr(heatmap, 'shape', ()))}")
    if heatmap.min() < 0 or heatmap.max() > 1:
        raise ValueError(f"heatmap values must lie in [0, 1], got [{heatmap.min():.3g}, {heatmap.max():.3g}]")
    T = len(alphas_cumprod)
    if not (isinstance(k, int) and 0 <= k < T):
        raise ValueError(f"diffusion step k must be an int in [0, {T}), got {k!r}")
    abar = float(alphas_cumprod[k])
    h = heatmap.to(images.dtype).unsqueeze(1)  # (B, 1, H, W), broadcast over channels on purpose
    eps = torch.randn(images.shape, generator=generator, dtype=torch.float32,
                      device=images.device if generator is None else generator.device)
    eps = eps.to(device=images.device, dtype=images.dtype)
    return math.sqrt(abar) * (images * h) + math.sqrt(1.0 - abar) * (eps * h) + images * (1.0 - h)


def diffusion_schedule(T=1000, beta_start=1e-5, beta_end=5e-3):
    """Sigmoid beta schedule of POVID / the official MMedPO noiser.

    beta_t = sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
    returns (betas, alphas_cumprod), both (T,) float64; alphas_cumprod[k] = prod_{t<=k} (1 - beta_t).
    With the defaults alphas_cumprod[500] = 0.7448: inside the lesion the image keeps 86 % of
    its amplitude and gets Gaussian noise of std 0.505 (pixel scale [0, 1]).
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    return betas, torch.cumprod(1.0 - betas, dim=0)


# -----------------------------------------------------------------------------
# heatmaps

def heatmap_from_mask(mask):
    """A binary lesion mask (H, W) of bool/int/float (numpy or torch) -> float32 heatmap in {0, 1}."""
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
    if m.dim() != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    return (m > 0).float()


def heatmap_from_boxes(boxes, height, width):
    """Boxes [(x0, y0, x1, y1), ...] in pixels (x right, y down, x1/y1 exclusive) -> (H, W) float32
    heatmap that is 1 inside any box. Boxes are clipped to the image."""
    h = torch.zeros(height, width)
    for i, box in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"box {i} must be (x0, y0, x1, y1), got {box!r}")
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {i} is empty or inverted: {box!r}")
        h[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)] = 1.0
    return h


def smooth_heatmap(heatmap, sigma):
    """Blur a heatmap so the noise fades in at the lesion's edge, then rescale its peak to 1."""
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {tuple(heatmap.shape)}")
    s = gaussian_blur(heatmap.float(), sigma)
    peak = s.max()
    return s / peak if peak > 0 else s


def mask_confidence(image, mask, ring_sigma=None):
    """How visible a masked lesion is, as the visual tool's confidence for ground-truth masks:
    c = |mean(x inside) - mean(x in a ring just outside)|, confidence = c / (c + std(ring)), in [0, 1).
    0 for a lesion that looks like its surroundings, towards 1 for one that stands out clearly.
    image, mask: (H, W); returns a float (0 for an empty mask or one with no ring around it)."""
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    m = torch.as_tensor(np.asarray(mask)) > 0
    if not m.any():
        return 0.0
    sigma = ring_sigma or max(1.0, 0.04 * max(x.shape))
    ring = (gaussian_blur(m.float(), sigma) > 0.05) & ~m
    if ring.sum() < 2:
        return 0.0
    contrast = (x[m].mean() - x[ring].mean()).abs()
    return float(contrast / (contrast + x[ring].std() + 1e-6))


def lesion_coverage(heatmap, mask):
    """How much of the true lesion the noise covers: sum(h * m) / sum(m), in [0, 1]; 0 for an empty mask
    (noise there hides no lesion, so the pair is no hard negative). heatmap, mask: (H, W)."""
    m = torch.as_tensor(np.asarray(mask)).float()
    total = m.sum()
    return float((torch.as_tensor(heatmap).float() * m).sum() / total) if total > 0 else 0.0


def detect_lesions(image, sigmas=None, ratio=1.6, threshold=0.2):
    """A lesion detector with no weights: bright blobs by multi-scale difference of Gaussians.

    Lesions on a radiograph (nodule, mass, consolidation) are local opacities: brighter than
    their surroundings at some scale. For each scale s the response is G_s * x - G_{ratio s} * x
    (a band-pass that peaks on blobs of radius ~ s), times the blob's isotropy (see
    `blob_isotropy`), so that bright ridges such as the spine or a rib edge do not count as
    lesions; the heatmap is the positive part of the strongest response, divided by its peak,
    with values below `threshold` set to 0 so the noise stays local.

    Confidence in [0, 1]: how far the peak stands above the response's own spread,
    snr = (peak - median) / (1.4826 * median |DoG - median|), a robust z-score against the
    band-pass's own spread;
    conf = 1 - exp(-max(snr - 6, 0) / 8). Pure noise and bright ridges score about 0, a faint
    disc about 0.2-0.8, a clear blob near 1.

    image:  (H, W) or (1, H, W) grayscale float in [0, 1] (torch or numpy).
    sigmas: blob scales in pixels; default 2 %, 4 % and 8 % of the shorter side.
    returns (heatmap (H, W) float32 in [0, 1], confidence float).
    """
    x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).float()
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"detect_lesions wants one grayscale image (H, W), got shape {tuple(x.shape)}")
    H, W = x.shape
    if sigmas is None:
        sigmas = [max(0.5, f * min(H, W)) for f in (0.02, 0.04, 0.08)]
    bands = [(gaussian_blur(x, s), gaussian_blur(x, ratio * s)) for s in sigmas]
    dog = torch.stack([a - b for a, b in bands])                                   # (S, H, W)
    response = (dog * torch.stack([blob_isotropy(a) for a, _ in bands])).amax(0)   # (H, W)
    peak = float(response.max())
    med = dog.amax(0).median()  # the noise level of the band-pass itself, before the roundness weighting
    spread = 1.4826 * float((dog.amax(0) - med).abs().median())
    if peak <= 1e-6:
        return torch.zeros(H, W), 0.0
    snr = (peak - float(med)) / max(spread, 1e-6)
    confidence = 1.0 - math.exp(-max(snr - 6.0, 0.0) / 8.0)
    heatmap = (response.clamp(min=0) / peak)
    heatmap = torch.where(heatmap >= threshold, heatmap, torch.zeros_like(heatmap))
    return heatmap, confidence


def blob_isotropy(g):
    """Per pixel, how round a bright structure of the smoothed image g (H, W) is, in [0, 1]: with
    l1 <= l2 the eigenvalues of the Hessian, l2 / l1 where both are negative (a bright blob curves
    down in every direction: ~1), 0 on a ridge (l2 ~ 0), a saddle or a dark spot."""
    gy, gx = torch.gradient(g)
    gyy, gyx = torch.gradient(gy)
    gxy, gxx = torch.gradient(gx)
    half_trace = (gxx + gyy) / 2
    root = torch.sqrt(((gxx - gyy) / 2) ** 2 + ((gxy + gyx) / 2) ** 2)
    l1, l2 = half_trace - root, half_trace + root
    return torch.where(l1 < 0, (l2 / l1.clamp(max=-1e-12)).clamp(0, 1), torch.zeros_like(g))


def train_lesion_classifier(images, labels, steps=600, batch_size=64, lr=2e-3, seed=0, log=None):
    """Fit a LesionClassifier on images (N, H, W) in [0, 1] and multi-hot labels (N, K): AdamW, cosine
    decay, binary cross-entropy, flips of the image left-right (a finding may sit on either side), all
    drawn from `seed`, never from (nor reseeding) the global generator. returns the classifier in eval mode."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(np.asarray(images), dtype=torch.float32)[:, None], torch.as_tensor(np.asarray(labels)).float()
    with torch.random.fork_rng(devices=[]):  # the initialisation draws from `seed`; the caller's generator is left as it was
        torch.manual_seed(seed)
        model = LesionClassifier(y.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = torch.where(torch.rand(batch_size, 1, 1, 1, generator=g) < 0.5, x[idx].flip(-1), x[idx])
        loss = F.binary_cross_entropy_with_logits(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step + 1) % 200 == 0:
            log(f"  visual tool {step + 1}/{steps} | loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def occlusion_heatmap(classifier, image, patch=None, stride=None, threshold=0.2, findings=None):
    """Where the classifier sees a finding, by occlusion: grey out a patch (the image's mean) at every
    position and record how much the probability of `findings` (indices into its outputs; all of them,
    summed, when None) falls; each pixel gets the mean fall over the patches that cover it. The positive
    part, divided by its peak, with values below `threshold` set to 0 so the noise stays local (all 0
    when no occlusion lowers it). Confidence: the largest probability among `findings` on the whole image.

    image: (H, W) grayscale float in [0, 1]; patch, stride: default 1/4 and 1/16 of the shorter side.
    returns (heatmap (H, W) float32 in [0, 1], confidence float)."""
    x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).float()
    H, W = x.shape
    patch = patch or max(2, min(H, W) // 4)
    stride = stride or max(1, min(H, W) // 16)
    probs = classifier(x[None, None]).sigmoid()[0]                                       # (K,)
    which = list(range(len(probs))) if findings is None else list(findings)
    tops = [(i, j) for i in range(0, H - patch + 1, stride) for j in range(0, W - patch + 1, stride)]
    occluded = x.repeat(len(tops), 1, 1)                                                # (P, H, W)
    for n, (i, j) in enumerate(tops):
        occluded[n, i:i + patch, j:j + patch] = x.mean()
    falls = torch.cat([(probs[which].sum() - classifier(chunk[:, None]).sigmoid()[:, which].sum(1))
                       for chunk in occluded.split(256)])
    total, count = torch.zeros(H, W), torch.zeros(H, W)
    for fall, (i, j) in zip(falls.tolist(), tops):
        total[i:i + patch, j:j + patch] += fall
        count[i:i + patch, j:j + patch] += 1
    heat = (total / count.clamp(min=1)).clamp(min=0)
    if float(heat.max()) <= 1e-6:
        return torch.zeros(H, W), float(probs[which].max())
    heat = heat / heat.max()
    return torch.where(heat >= threshold, heat, torch.zeros_like(heat)), float(probs[which].max())


class LesionClassifier(torch.nn.Module):
    """A trained visual tool, as MedKLIP is the paper's: a small CNN that says which of K findings an
    image (N, 1, H, W) in [0, 1] holds. returns logits (N, K). `occlusion_heatmap` says where."""

    def __init__(self, n_findings, width=16):
        super().__init__()
        c, relu = torch.nn.Conv2d, torch.nn.ReLU
        self.features = torch.nn.Sequential(
            c(1, width, 3, padding=1), relu(), torch.nn.MaxPool2d(2),
            c(width, 2 * width, 3, padding=1), relu(), c(2 * width, 2 * width, 3, padding=1), relu(), torch.nn.MaxPool2d(2),
            c(2 * width, 4 * width, 3, padding=1), relu(), c(4 * width, 4 * width, 3, padding=1), relu())
        self.head = torch.nn.Linear(4 * width, n_findings)

    def forward(self, x):
        f = self.features(x)                                    # (N, C, H/4, W/4)
        return self.head(f.amax((2, 3)))                        # max-pooled: a finding anywhere counts


def attention_heatmap(attentions, image_positions, answer_positions, image_size, sigma=None):
    """Where the model looked: attention from the answer tokens to the image tokens, on the image.

    attentions:       (L, heads, T, T) attention probabilities of the layers to use (e.g. the last
                      few of the language model), or (heads, T, T), for one sequence.
    image_positions:  (T,) bool, the image tokens, in row-major patch order.
    answer_positions: (T,) bool, the query positions to read (the answer tokens).
    image_size:       (H, W) of the heatmap to return.
    Averaged over layers, heads and answer tokens, the mass on each image token is renormalized
    into a share (sums to 1), laid out on the sqrt(N) x sqrt(N) patch grid, upsampled to the image
    (each patch a block), smoothed (sigma default: half a patch) and min-max scaled to [0, 1].
    returns (heatmap (H, W) float32 in [0, 1], confidence = the largest share, in [1/N, 1]).
    """
    a = attentions.float()
    if a.dim() == 3:
        a = a[None]
    if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attentions must be (L, heads, T, T), got shape {tuple(attentions.shape)}")
    T = a.shape[-1]
    if image_positions.shape != (T,) or answer_positions.shape != (T,):
        raise ValueError(f"position masks must be ({T},), got {tuple(image_positions.shape)} and "
                         f"{tuple(answer_positions.shape)}")
    n = int(image_positions.sum())
    side = int(round(math.sqrt(n)))
    if n == 0 or side * side != n:
        raise ValueError(f"need a square number of image tokens, got {n}")
    if not answer_positions.any():
        raise ValueError("answer_positions selects no token")
    rows = a.mean(dim=(0, 1))[answer_positions]            # (Q, T)
    mass = rows[:, image_positions].mean(0)                # (N,)
    share = mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, 1.0 / n)
    H, W = image_size
    grid = share.view(1, 1, side, side)
    up = F.interpolate(grid, size=(H, W), mode="nearest")[0, 0]
    up = gaussian_blur(up, sigma if sigma is not None else 0.5 * H / side)
    lo, hi = up.min(), up.max()
    heatmap = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    return heatmap.float(), float(share.max())


def gaussian_blur(image, sigma):
    """Separable Gaussian blur of an (H, W) float tensor, reflect padding, radius ceil(3 sigma)."""
    if sigma <= 0:
        return image.clone()
    H, W = image.shape
    radius = max(1, min(int(math.ceil(3 * sigma)), H - 1, W - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    x = image[None, None]                                   # (1, 1, H, W)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))               # along W
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))               # along H
    return x[0, 0]
