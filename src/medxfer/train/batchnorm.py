"""BatchNorm running statistics, re-estimated from scratch on a given set of images.

Two uses share this one routine:

- **After training** (``train.bn_recalibrate``, on by default): during training every
  BatchNorm layer's running mean and variance follow the *augmented* batches (random
  brightness, contrast, zoom with zero padding, rotation), while the model is evaluated and
  deployed on plain images. Re-estimating them on the un-augmented training images fixes that
  mismatch; measured on the 64 px brain-tumor seed runs it was worth several points of
  validation and test accuracy (studies/bn_statistics.py). It is the "precise BN" step of
  pycls/detectron2 (Wu & Johnson, "Rethinking 'batch' in BatchNorm", 2021), done on the
  images the model will see. ``medxfer.train.loop`` keeps it only when validation balanced
  accuracy does not drop.
- **At a new site** (``medxfer adapt``): the same estimate on the site's unlabelled images
  (AdaBN), in ``medxfer.evaluate.adapt``.

The estimate is the cumulative average (``momentum=None``) of the per-batch statistics, so the
batches must be shuffled (sorted by class, every batch would miss the variance between classes)
and none may hold a single image. Only the BatchNorm layers run in training mode: dropout and
stochastic depth stay off, so the statistics are those of the network that will predict. The
layers' momentum and every module's training flag are restored; weights are never touched (a
pruned model's zeros stay zero).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (those re-estimated here)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Replace, in place, every BatchNorm layer's running statistics by their average over
    ``inputs`` (batches already preprocessed for ``model``, shuffled, each of 2 or more
    images). Returns the number of images seen; 0 leaves the statistics unchanged."""
    layers = batchnorm_layers(model)
    flags = {m: m.training for m in model.modules()}
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts equally
        m.train()
    seen = 0
    try:
        for x in inputs:
            model(x)
            seen += len(x)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        for module, flag in flags.items():
            module.train(flag)
    if seen == 0:
        for m, state in zip(layers, saved, strict=True):
            m.load_state_dict(state)
    return seen
