"""Build everything ``fit`` needs from a config: data, model, loaders, optimizer, loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medxfer.config import ExperimentConfig
from medxfer.data.loader import BatchLoader, Normalizer
from medxfer.data.prepare import Prepared, prepare
from medxfer.errors import MedxferError
from medxfer.models import Built, create_model
from medxfer.train.compute import Compute, main_first
from medxfer.train.optim import build_optimizer, build_scheduler


@dataclass
class Setup:
    data: Prepared
    built: Built
    model: nn.Module  # possibly DDP-wrapped; ``built.model`` is the bare network
    train_loader: BatchLoader
    val_loader: BatchLoader
    test_loader: BatchLoader
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None


def class_weights(counts: list[int]) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (sklearn's 'balanced')."""
    c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    return c.sum() / (len(c) * c)


def set_trainable(built: Built, head_only: bool) -> None:
    for name, p in built.model.named_parameters():
        p.requires_grad = (not head_only) or any(name.startswith(h + ".") for h in built.head)


def frozen_modules(built: Built) -> list[nn.Module]:
    """The top-level children that hold no head parameters (put in eval mode when frozen)."""
    heads = {h.split(".")[0] for h in built.head}
    return [m for name, m in built.model.named_children() if name not in heads]


def make_loader(
    cfg: ExperimentConfig, data: Prepared, split: str, norm: Normalizer, c: Compute, train: bool
) -> BatchLoader:
    idx = data.split_index[split]
    weights = None
    if train and cfg.train.weighted_sampling:
        per_class = class_weights(list(data.counts("train").values()))
        weights = per_class[data.labels[idx]]
    return BatchLoader(
        data.images,
        data.labels,
        idx,
        batch_size=cfg.train.batch_size if train else cfg.train.eval_batch_size,
        normalize=norm,
        device=c.device,
        train=train,
        augment=cfg.augment if train else None,
        sample_weights=weights,
        seed=cfg.train.seed,
        rank=c.rank,
        world=c.world,
        channels_last=c.channels_last,
        prefetch=train,
    )


def build(cfg: ExperimentConfig, c: Compute) -> Setup:
    with main_first(c):  # rank 0 decodes and caches the images, the others then read the cache
        data = prepare(cfg.data)
    if len(data.split_index["train"]) < cfg.train.batch_size * c.world:
        raise MedxferError(
            f"only {len(data.split_index['train'])} training images for batch size "
            f"{cfg.train.batch_size} x {c.world} process(es)",
            "lower train.batch_size or add images",
        )
    if len(data.split_index["val"]) == 0:
        raise MedxferError("the validation split is empty", "set data.val_fraction > 0")
    torch.manual_seed(cfg.train.seed)  # the new head's init is part of the seeded run
    built = create_model(
        cfg.model.arch,
        weights=cfg.model.weights,
        num_classes=len(data.classes),
        dropout=cfg.model.dropout,
    )
    model = built.model.to(c.device)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_trainable(built, cfg.model.freeze in ("head", "unfreeze_after"))
    norm = Normalizer.from_preprocess(built.preprocess, c.device)
    train_loader = make_loader(cfg, data, "train", norm, c, train=True)
    val_loader = make_loader(cfg, data, "val", norm, c, train=False)
    test_loader = make_loader(cfg, data, "test", norm, c, train=False)
    weight = None
    if cfg.train.class_weight:
        weight = class_weights(list(data.counts("train").values())).to(c.device)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
    opt = build_optimizer(model, cfg.train)
    steps = len(train_loader)
    if cfg.train.steps_per_epoch > 0:
        steps = min(steps, cfg.train.steps_per_epoch)
    sched = build_scheduler(opt, cfg.train, steps)
    if c.distributed:
        ids = [c.device.index] if c.device.type == "cuda" else None
        # find_unused_parameters: with a frozen backbone some parameters get no gradient
        model = DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=cfg.model.freeze != "none"
        )
    scaler = torch.amp.GradScaler("cuda") if c.use_grad_scaler else None
    return Setup(
        data, built, model, train_loader, val_loader, test_loader, loss_fn, opt, sched, scaler
    )
