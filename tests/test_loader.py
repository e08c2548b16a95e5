from __future__ import annotations

import torch

from medxfer.config import AugmentConfig
from medxfer.data.loader import BatchLoader, Normalizer, augment_batch, epoch_generator
from medxfer.models.registry import IMAGENET


def _loader(rank: int = 0, world: int = 1, train: bool = True) -> BatchLoader:
    images = torch.randint(
        0, 255, (50, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.arange(50) % 3
    return BatchLoader(
        images, labels, torch.arange(50), batch_size=8,
        normalize=Normalizer.from_preprocess(IMAGENET, torch.device("cpu")),
        device=torch.device("cpu"), train=train, augment=AugmentConfig(), seed=1,
        rank=rank, world=world,
    )  # fmt: skip


def test_augment_keeps_shape_and_range() -> None:
    x = torch.rand(4, 1, 32, 32)
    y = augment_batch(x, AugmentConfig(vflip=True), epoch_generator(0, 0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_epoch_replays_exactly() -> None:
    a, b = _loader(), _loader()
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])


def test_ranks_get_disjoint_equal_shards() -> None:
    r0, r1 = _loader(0, 2), _loader(1, 2)
    assert len(r0) == len(r1)
    e0, e1 = _loader(0, 2, train=False), _loader(1, 2, train=False)
    s0, s1 = set(e0.shard_indices().tolist()), set(e1.shard_indices().tolist())
    assert s0.isdisjoint(s1) and s0 | s1 == set(range(50))


def test_output_is_normalised_three_channel() -> None:
    x, y = next(iter(_loader(train=False)))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.long


def test_prefetch_yields_the_same_batches() -> None:
    a, b = _loader(), _loader()
    b.prefetch = True
    pairs = list(zip(a, b, strict=True))
    assert len(pairs) == len(a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)
