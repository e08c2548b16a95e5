"""A critic on frozen pretrained features (Sauer et al. 2021, "Projected GANs Converge Faster").

The critic does not learn to see from the few real images: it looks at them through the
offline ImageNet EfficientNet-Lite0 (the backbone Projected GAN itself uses), frozen and in eval
mode. Four of its stages (strides 4, 8, 16, 32) are projected by fixed random 1x1 convolutions
(cross-channel mixing) to ``PROJ_CHANNELS`` channels each, and a small discriminator per scale
(spectral-normalised stride-2 convolutions down to 4x4, then a minibatch-standard-deviation
channel) scores them; the scores are summed. The minibatch spread is not in Projected GAN: a
CPU run with its batch-normalised heads made one image per class (the same X-ray for every z),
and a critic that sees the spread of a batch can penalise that. In the CPU hour measured (the
imbalance study) the generator collapsed with the spread channel too, and the gate kept its
images out.
With classes, each head adds a projection term <embed(y), pooled features> (Miyato & Koyama).

The images (gray or RGB, in [-1, 1], the backbone's own input range) are resized to
``feature_size(image_size)`` px before the backbone. The critic is trained with the hinge loss
and no gradient penalty, as in the paper (a penalty would differentiate twice through the
backbone); ``medxfer.gan.loop`` picks the loss from ``gan.critic``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

STAGES = (1, 2, 4, 6)  # timm EfficientNet blocks whose outputs are used: strides 4, 8, 16, 32
PROJ_CHANNELS = 64  # channels of each scale after the random 1x1 projection
HEAD_CHANNELS = 64  # channels of the per-scale discriminator blocks
MBSTD_GROUP = 4  # samples per minibatch-standard-deviation group


def feature_size(image_size: int) -> int:
    """Pixels the backbone sees: twice the GAN's side, at most the 224 px it was trained on."""
    return min(224, 2 * image_size)


def feature_variant(critic: str) -> int:
    """Which EfficientNet-Lite judges a GAN's images: Lite0, unless the critic was trained on
    Lite0's own features (``gan.critic=projected``). Such a generator learns to match exactly
    those features, and could pass a gate that measures them without looking right; Lite2 has
    other weights and widths, so its images are judged through Lite2 instead."""
    return 2 if critic == "projected" else 0


def _lite0_trunk() -> nn.Module:
    from medxfer.models.backbones import imagenet_lite

    return imagenet_lite(0)


def minibatch_std(h: torch.Tensor, group: int = MBSTD_GROUP) -> torch.Tensor:
    """(B, C, H, W) -> (B, C + 1, H, W): one more channel holding, for each group of
    ``group`` samples, the standard deviation of the features across the group (averaged over
    channels and positions; Karras et al. 2018). A generator that makes the same image for
    every z gives a batch with no spread, which the critic can then see."""
    b, c, hh, ww = h.shape
    g = min(group, b)
    while b % g:
        g -= 1
    y = h.view(g, -1, c, hh, ww)
    y = (y - y.mean(0)).pow(2).mean(0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / g,)
    y = y.view(1, -1, 1, 1, 1).expand(g, -1, 1, hh, ww).reshape(b, 1, hh, ww)
    return torch.cat([h, y], dim=1)


class _Head(nn.Module):
    """Stride-2 blocks from ``size`` down to 4x4, then the minibatch spread, a 1-channel score
    map, and (with classes) a projection term. No batch normalisation: it would normalise the
    spread of each batch away, and with it the critic's view of a collapsed generator."""

    def __init__(self, size: int, n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = PROJ_CHANNELS
        while size > 4:
            layers += [
                spectral_norm(nn.Conv2d(c, HEAD_CHANNELS, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c, size = HEAD_CHANNELS, size // 2
        self.blocks = nn.Sequential(*layers)
        self.out = spectral_norm(nn.Conv2d(c + 1, 1, 3, padding=1))
        self.embed = nn.Embedding(n_classes, c) if n_classes > 1 else None
        self.scale = 1.0 / math.sqrt(c)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.blocks(h)
        out = self.out(minibatch_std(h)).mean(dim=(1, 2, 3))
        if self.embed is not None:
            if y is None:
                raise ValueError("a class-conditional critic needs labels")
            out = out + self.scale * (self.embed(y) * h.mean(dim=(2, 3))).sum(dim=1)
        return out


class ProjectedCritic(nn.Module):
    """(B, C, S, S) in [-1, 1], (B,) -> (B,) scores; only the heads are trained."""

    def __init__(
        self, *, image_size: int, channels: int, n_classes: int, trunk: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.channels, self.size = channels, feature_size(image_size)
        net: Any = trunk if trunk is not None else _lite0_trunk()
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = nn.ModuleList(net.blocks[: STAGES[-1] + 1])
        for p in [*self.stem.parameters(), *self.blocks.parameters()]:
            p.requires_grad_(False)
        self.stem.eval()
        self.blocks.eval()
        widths = self._widths()
        gen = torch.Generator().manual_seed(0)  # the projections are fixed, never trained
        self.proj = nn.ModuleList()
        for w in widths:
            conv = nn.Conv2d(w, PROJ_CHANNELS, 1, bias=False)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / math.sqrt(w))
            conv.weight.requires_grad_(False)
            self.proj.append(conv)
        sizes = [self.size // s for s in (4, 8, 16, 32)]
        self.heads = nn.ModuleList(_Head(max(s, 1), n_classes) for s in sizes)

    @torch.no_grad()
    def _widths(self) -> list[int]:
        x = torch.zeros(1, 3, 32, 32)
        return [f.shape[1] for f in self._features(x)]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in STAGES:
                feats.append(x)
        return feats

    def train(self, mode: bool = True) -> ProjectedCritic:
        super().train(mode)
        self.stem.eval()  # the backbone's BatchNorm keeps its ImageNet statistics
        self.blocks.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        feats = self._features(x)
        return sum(
            (head(proj(f), y) for f, proj, head in zip(feats, self.proj, self.heads, strict=True)),
            torch.zeros(len(x), device=x.device, dtype=x.dtype),
        )


def hinge_critic_loss(
    real_scores: torch.Tensor, fake_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, E[D(real)] - E[D(fake)]) for the hinge objective."""
    loss = F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()
    return loss, (real_scores.mean() - fake_scores.mean()).detach()
