"""Shifted copies of validation images: the stand-ins for unfamiliar images that the default
detector is chosen on (no test image and no outside data is involved)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_nchw(arrays: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(arrays)).float()
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _back(x: torch.Tensor, like: np.ndarray) -> np.ndarray:
    x = x.clamp(0, 255).round().to(torch.uint8)
    return (x[:, 0] if like.ndim == 3 else x.permute(0, 2, 3, 1)).contiguous().numpy()


def proxy_shifts(arrays: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images -> {name: shifted uint8 images of the same shape}: uniform noise, inverted
    intensities, a strong Gaussian blur (sigma = size / 32) and a 4x down-and-up sampling."""
    from torchvision.transforms.functional import gaussian_blur

    rng = np.random.default_rng(seed + 11)
    x = _as_nchw(arrays)
    size = x.shape[-1]
    sigma = max(size / 32, 1.0)
    kernel = int(2 * round(3 * sigma) + 1)
    small = F.interpolate(x, scale_factor=0.25, mode="bilinear", antialias=True)
    return {
        "noise": rng.integers(0, 256, size=arrays.shape, dtype=np.uint8),
        "inverted": (255 - arrays).astype(np.uint8),
        "blur": _back(gaussian_blur(x, [kernel, kernel], [sigma, sigma]), arrays),
        "lowres": _back(F.interpolate(small, size=x.shape[-2:], mode="bilinear"), arrays),
    }
