"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
Training"): brightness, contrast, translation and cutout as differentiable tensor operations.

The critic sees every real and every fake batch through the same kind of augmentation, so it
cannot memorise the few real images, and the generator's gradient flows back through the
augmentation (each operation is linear in the pixels once its random parameters are drawn).
All randomness comes from the ``generator`` passed in, so a resumed run replays it exactly and
two calls with equally seeded generators augment identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSLATION = 0.125  # shift by up to 1/8 of the side, zero (mid-grey) padding
CUTOUT = 0.5  # one square hole of half the side


def _draw(n: int, generator: torch.Generator, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    h, w = size
    sh, sw = int(h * TRANSLATION + 0.5), int(w * TRANSLATION + 0.5)
    ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
    return {
        "brightness": torch.rand(n, generator=generator) - 0.5,
        "contrast": torch.rand(n, generator=generator) + 0.5,
        "shift_y": torch.randint(-sh, sh + 1, (n,), generator=generator),
        "shift_x": torch.randint(-sw, sw + 1, (n,), generator=generator),
        "cut_y": torch.randint(0, h + (1 - ch % 2), (n,), generator=generator),
        "cut_x": torch.randint(0, w + (1 - cw % 2), (n,), generator=generator),
    }


def diff_augment(
    x: torch.Tensor, generator: torch.Generator, *, pairs: bool = False
) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> the same shape, augmented; differentiable in ``x``.

    ``pairs``: ``x`` is ``cat([a, b])`` of two equal halves, and sample ``i`` of ``b`` gets
    exactly the parameters of sample ``i`` of ``a`` (e.g. a real and a fake batch).
    """
    b, _, h, w = x.shape
    n = b // 2 if pairs else b
    p = _draw(n, generator, (h, w))
    if pairs:
        p = {k: torch.cat([v, v]) for k, v in p.items()}
    p = {k: v.to(x.device) for k, v in p.items()}
    # colour: brightness, then contrast around each image's mean
    x = x + p["brightness"].to(x.dtype).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * p["contrast"].to(x.dtype).view(-1, 1, 1, 1) + mean
    # translation: gather from a zero-padded copy
    rows = torch.arange(h, device=x.device).view(1, h, 1) + p["shift_y"].view(-1, 1, 1) + 1
    cols = torch.arange(w, device=x.device).view(1, 1, w) + p["shift_x"].view(-1, 1, 1) + 1
    rows, cols = rows.clamp(0, h + 1).expand(-1, h, w), cols.clamp(0, w + 1).expand(-1, h, w)
    batch = torch.arange(len(x), device=x.device).view(-1, 1, 1).expand(-1, h, w)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    x = padded[batch, rows, cols].permute(0, 3, 1, 2)
    # cutout: one square hole per image
    ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
    ys = torch.arange(h, device=x.device).view(1, h, 1) - p["cut_y"].view(-1, 1, 1) + ch // 2
    xs = torch.arange(w, device=x.device).view(1, 1, w) - p["cut_x"].view(-1, 1, 1) + cw // 2
    hole = (ys >= 0) & (ys < ch) & (xs >= 0) & (xs < cw)
    return x * (~hole).unsqueeze(1).to(x.dtype)
