"""DCGAN-shaped generator and critic for 64x64 and 128x128 images, optionally class-conditional.

Generator: z (B, z_dim) [+ class embedding] -> (B, 8w, 4, 4) -> upsample x2 per block ->
(B, C, S, S) in [-1, 1] (tanh). Critic: stride-2 convolutions down to 4x4, no BatchNorm (the
gradient penalty is per sample, batch statistics would couple the samples; LayerNorm-like
GroupNorm(1) instead), a linear output, and for classes a projection term <embed(y), h>
(Miyato & Koyama 2018), so one critic scores "real image of class y".
"""

from __future__ import annotations

import torch
from torch import nn

from medxfer.errors import MedxferError

SIZES = (64, 128)


def check_image_size(size: int) -> int:
    """Number of x2 blocks between 4x4 and ``size``; only the sizes the networks are built for."""
    if size not in SIZES:
        raise MedxferError(
            f"gan.image_size={size} is not supported",
            f"use one of {list(SIZES)} (images are resized to it)",
        )
    return {64: 4, 128: 5}[size]


def _widths(size: int, width: int) -> list[int]:
    """Channels from the 4x4 end outwards: 8w, 4w, 2w, w (and w for 128 px)."""
    n = check_image_size(size)
    return [width * m for m in (8, 4, 2, 1, 1)[:n]]


class Generator(nn.Module):
    def __init__(
        self, *, image_size: int, channels: int, n_classes: int, z_dim: int = 128, width: int = 64
    ) -> None:
        super().__init__()
        widths = _widths(image_size, width)
        self.z_dim, self.n_classes, self.channels = z_dim, n_classes, channels
        self.embed = nn.Embedding(n_classes, z_dim) if n_classes > 1 else None
        in_dim = z_dim * (2 if self.embed is not None else 1)
        self.stem = nn.Sequential(
            nn.Linear(in_dim, widths[0] * 16),
            nn.Unflatten(1, (widths[0], 4, 4)),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(widths, [*widths[1:], widths[-1]], strict=True):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(nn.Conv2d(widths[-1], channels, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, z_dim), (B,) int -> (B, channels, S, S) in [-1, 1]."""
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional generator needs labels")
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.out(self.blocks(self.stem(z)))


class Critic(nn.Module):
    def __init__(self, *, image_size: int, channels: int, n_classes: int, width: int = 64) -> None:
        super().__init__()
        widths = list(reversed(_widths(image_size, width)))  # w ... 8w, from the image inwards
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for c_in, c_out in zip(widths, [*widths[1:], widths[-1]], strict=True):
            layers += [
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
                nn.GroupNorm(1, c_out),
            ]
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.features = nn.Sequential(*layers)
        feat = widths[-1] * 16
        self.linear = nn.Linear(feat, 1)
        self.embed = nn.Embedding(n_classes, feat) if n_classes > 1 else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, S, S), (B,) -> (B,) critic scores (unbounded; higher = more real)."""
        h = self.features(x).flatten(1)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional critic needs labels")
            out = out + (self.embed(y) * h).sum(dim=1)
        return out


def build_pair(
    *, image_size: int, channels: int, n_classes: int, z_dim: int, width: int
) -> tuple[Generator, Critic]:
    g = Generator(
        image_size=image_size, channels=channels, n_classes=n_classes, z_dim=z_dim, width=width
    )
    d = Critic(image_size=image_size, channels=channels, n_classes=n_classes, width=width)
    return g, d
