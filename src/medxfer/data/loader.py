"""Batches straight from the uint8 decode cache, augmented as whole batches in torch.

Why not a ``DataLoader`` with workers: at 224 px two CPU cores are compute-bound, so worker
processes that decode and augment image by image steal cycles from the model. Here decoding
happened once (``cache.py``; a batch gathers its rows from the memory-mapped cache, so the
page cache holds the pixels once for every process), and augmentation is a handful of batched
tensor ops (one ``affine_grid`` + ``grid_sample``), on the training device, costing a few ms
per batch.
Every random choice comes from a generator seeded by (seed, epoch, rank), so an epoch replays
exactly after a resume.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from medxfer.config import AugmentConfig
from medxfer.data.robust import robust_augment
from medxfer.data.store import ImageStore


class MeanStd(Protocol):
    """What normalization needs of a model's preprocessing (``medxfer.models.Preprocess``)."""

    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


@dataclass
class Normalizer:
    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor

    @classmethod
    def from_preprocess(cls, pre: MeanStd, device: torch.device) -> Normalizer:
        mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        return cls(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] with C in {1, 3} -> normalized (B, 3, H, W)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, 3) -> float (B, C, H, W) in [0, 1]."""
    x = batch.unsqueeze(1) if batch.dim() == 3 else batch.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Small affine (rotation, zoom, shift, flips) and brightness/contrast, per image; with
    ``cfg.policy == "robust"`` then the appearance ops of ``medxfer.data.robust``."""
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=g) * (hi - lo) + lo

    angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * math.pi / 180.0
    scale = uniform(1 - cfg.scale, 1 + cfg.scale)
    tx, ty = (
        uniform(-2 * cfg.translate, 2 * cfg.translate),
        uniform(-2 * cfg.translate, 2 * cfg.translate),
    )
    fx = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(b)
    fy = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if cfg.vflip else torch.ones(b)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * fx, -sin * fy, tx], 1), torch.stack([sin * fx, cos * fy, ty], 1)], 1
    ).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast).to(x.device).view(b, 1, 1, 1)
    bright = uniform(-cfg.brightness, cfg.brightness).to(x.device).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + bright).clamp_(0.0, 1.0)
    return robust_augment(x, g) if cfg.policy == "robust" else x


_END = object()


class BatchLoader:
    """Iterates ``(inputs, labels)`` over an index set of the cached images.

    Training: a fresh permutation (or class-balanced draw) per epoch, split evenly across DDP
    ranks so every rank runs the same number of steps. Evaluation: the indices in order,
    sharded by rank (``shard_indices`` tells which ones this rank saw).
    """

    def __init__(
        self,
        images: torch.Tensor | ImageStore,
        labels: torch.Tensor,
        indices: torch.Tensor,
        *,
        batch_size: int,
        normalize: Normalizer,
        device: torch.device,
        train: bool,
        augment: AugmentConfig | None = None,
        sample_weights: torch.Tensor | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        channels_last: bool = False,
        prefetch: bool = False,
    ) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.normalize, self.device = batch_size, normalize, device
        self.train, self.augment, self.sample_weights = train, augment, sample_weights
        self.seed, self.rank, self.world = seed, rank, world
        self.channels_last = channels_last
        self.prefetch = prefetch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.indices)
        if not self.train:
            return self.indices[self.rank :: self.world]
        if self.sample_weights is not None:
            pos = torch.multinomial(self.sample_weights, n, replacement=True, generator=g)
        else:
            pos = torch.randperm(n, generator=g)
        per_rank = n // self.world  # equal step counts on every rank (DDP needs it)
        return self.indices[pos[self.rank * per_rank : (self.rank + 1) * per_rank]]

    def shard_indices(self) -> torch.Tensor:
        return self.indices[self.rank :: self.world]

    def __len__(self) -> int:
        n = len(self.indices) // self.world if self.train else len(self.shard_indices())
        if self.train:
            return max(1, n // self.batch_size)  # drop the last partial batch (BatchNorm)
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.prefetch:
            yield from self._batches()
            return
        # One batch ahead in a thread: torch ops release the GIL, so the gather/augment of the
        # next batch fills the gaps that the model's many small kernels leave on the cores.
        q: queue.Queue[object] = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            # One OpenMP thread here (the setting is per thread): two thread teams on two cores
            # would spin against each other and slow the model down.
            torch.set_num_threads(1)
            try:
                for item in self._batches():
                    if stop.is_set():
                        return
                    q.put(item)
                q.put(_END)
            except BaseException as err:  # surface errors in the consumer
                q.put(err)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, self.epoch, self.rank)
        order = self._order(g)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = to_float(self.images[idx].to(self.device, non_blocking=True))
            if self.train and self.augment is not None and self.augment.enabled:
                x = augment_batch(x, self.augment, g)
            x = self.normalize(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx].to(self.device, non_blocking=True)
