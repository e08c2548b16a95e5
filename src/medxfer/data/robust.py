"""The appearance-robust augmentation policy (``augment.policy: robust``).

A model trained on one hospital's images learns its scanner's look: contrast, intensity curve,
sharpness, noise, resolution and framing. BigAug (Zhang et al., "Generalizing deep learning for
medical image segmentation to unseen domains via deep stacked transformation", IEEE TMI 2020)
and RandConv (Xu et al., ICLR 2021) train through random changes of exactly those, so that the
features cannot lean on them. This module applies such changes to a whole batch of float images
in [0, 1] after the standard policy's affine and brightness/contrast step, each one to a random
subset of the images with its own random strength:

===============  =====  ==========================================================================
op               p      what it does to an image
===============  =====  ==========================================================================
fov              0.30   field of view: zoom out (0.65-1: smaller, zero-padded) or in (1-1.35: a
                        crop), off-centre by up to 10% of the size
resolution       0.25   down-sampled by 1.5, 2, 3 or 4 (area), bilinearly back up
blur_sharpen     0.30   Gaussian blur (sigma 0.5-2 px at 224 px, scaled with the size, at least
                        0.6-1.2 px) or unsharp masking (that blur, amount 0.5-2), equal odds
gamma            0.30   x ** gamma, gamma in [0.5, 0.8] or [1.25, 2] (log-uniform, equal odds)
contrast         0.30   contrast x0.56-0.8 or x1.25-1.8 around the image mean, brightness +-0.1
curve            0.25   a random piecewise-linear intensity curve through 6 knots: monotone or
                        not with equal odds, background (0) kept dark with odds 0.5
invert           0.15   1 - x (a sequence change in MRI, a negative in radiography)
noise            0.25   additive Gaussian noise, sigma 0.01-0.08
===============  =====  ==========================================================================

Every random number comes from the generator the loader passes (seeded by seed, epoch and
rank), drawn on the CPU in a fixed order, so an epoch replays bit for bit after a resume and
on any device. The ops are batched tensor operations on the subset they change (the resolution
loss loops over its four factors), about as costly as the standard policy's own resampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# probability that each op is applied to an image (the table above)
P = {"fov": 0.30, "resolution": 0.25, "blur_sharpen": 0.30, "gamma": 0.30, "contrast": 0.30,
     "curve": 0.25, "invert": 0.15, "noise": 0.25}  # fmt: skip
FACTORS = (1.5, 2.0, 3.0, 4.0)  # down-sampling factors of the resolution loss
KNOTS = 6  # control points of the random intensity curve, evenly spaced on [0, 1]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _chosen(x: torch.Tensor, op: str, g: torch.Generator) -> torch.Tensor:
    """Indices (on x's device) of the images that ``op`` is applied to."""
    return torch.nonzero(torch.rand(x.shape[0], generator=g) < P[op]).flatten()


def fov(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    zoom_out = torch.rand(n, generator=g) < 0.5
    scale = torch.where(zoom_out, _uniform(n, 1.0, 1 / 0.65, g), _uniform(n, 1 / 1.35, 1.0, g))
    shift = _uniform(2 * n, -0.2, 0.2, g).view(n, 2)  # 0.2 of the [-1, 1] grid = 10% of the size
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([scale, zero, shift[:, 0]], 1),
                         torch.stack([zero, scale, shift[:, 1]], 1)], 1)  # fmt: skip
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resolution(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    which = torch.randint(len(FACTORS), (x.shape[0],), generator=g)
    out = x.clone()
    size = list(x.shape[-2:])
    for i, f in enumerate(FACTORS):
        rows = torch.nonzero(which == i).flatten().to(x.device)
        if len(rows):
            low = [max(round(s / f), 4) for s in size]
            small = F.interpolate(x[rows], size=low, mode="area")
            out[rows] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return out


def blur_sharpen(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    # sigma 0.5-2 px at 224 px, scaled with the size, but never below 0.6-1.2 px (a smaller
    # blur does next to nothing)
    lo, hi = max(0.5 * min(h, w) / 224, 0.6), max(2.0 * min(h, w) / 224, 1.2)
    sigma = _uniform(n, lo, hi, g)
    sharpen = torch.rand(n, generator=g) < 0.5
    amount = torch.where(sharpen, -_uniform(n, 0.5, 2.0, g), torch.ones(n))
    radius = math.ceil(3 * hi)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.device, x.dtype)
    flat = x.reshape(1, n * c, h, w)  # one depthwise (separable) convolution for the batch
    flat = F.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, k.view(n * c, 1, 1, -1), groups=n * c)
    blurred = F.conv2d(flat, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
    amount = amount.to(x.device, x.dtype).view(n, 1, 1, 1)
    return x + amount * (blurred - x)  # amount 1: the blur; < 0: unsharp masking


def _away_from_one(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """Factors in [1/hi, 1/lo] or [lo, hi] (lo > 1) with equal odds: never (nearly) 1."""
    f = torch.exp(_uniform(n, math.log(lo), math.log(hi), g))
    return torch.where(torch.rand(n, generator=g) < 0.5, f, 1 / f)


def gamma(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    gam = _away_from_one(x.shape[0], 1.25, 2.0, g)
    return x.clamp(0.0, 1.0).pow(gam.to(x.device, x.dtype).view(-1, 1, 1, 1))


def contrast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    factor = _away_from_one(n, 1.25, 1.8, g).to(x.device, x.dtype).view(n, 1, 1, 1)
    shift = _uniform(n, -0.1, 0.1, g).to(x.device, x.dtype).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean + shift


def curve(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image through its own piecewise-linear curve, evaluated by one gather."""
    n = x.shape[0]
    values = torch.rand(n, KNOTS, generator=g)
    monotone = torch.rand(n, generator=g) < 0.5
    values = torch.where(monotone[:, None], values.sort(1).values, values)
    dark = torch.rand(n, generator=g) < 0.5
    values[:, 0] = torch.where(dark, 0.0, values[:, 0])
    values = values.to(x.device, x.dtype)
    pos = x.clamp(0.0, 1.0).reshape(n, -1) * (KNOTS - 1)
    lo = pos.floor().clamp_(max=KNOTS - 2)
    frac = pos - lo
    lo_i = lo.long()
    left, right = values.gather(1, lo_i), values.gather(1, lo_i + 1)
    return (left + frac * (right - left)).view_as(x)


def invert(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma = _uniform(x.shape[0], 0.01, 0.08, g).view(-1, 1, 1, 1)
    return x + (torch.randn(x.shape, generator=g) * sigma).to(x.device, x.dtype)


OPS = {"fov": fov, "resolution": resolution, "blur_sharpen": blur_sharpen, "gamma": gamma,
       "contrast": contrast, "curve": curve, "invert": invert, "noise": noise}  # fmt: skip


def robust_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x`` (B, C, H, W) float in [0, 1] through the ops above, each on its random subset of
    the images, in the order of ``OPS``; returned in [0, 1]."""
    x = x.clone()
    for name, op in OPS.items():
        rows = _chosen(x, name, g).to(x.device)
        if len(rows):
            x[rows] = op(x[rows], g).clamp_(0.0, 1.0)
    return x
