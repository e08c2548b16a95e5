"""One training epoch and one evaluation pass (the torchvision references' shape)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from medxfer.data.loader import BatchLoader
from medxfer.train.compute import Compute

TIMING_WARMUP_STEPS = 3  # the first steps of an epoch allocate memory; not timed


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
    )


def train_one_epoch(
    model: nn.Module,
    loader: BatchLoader,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    compute: Compute,
    scaler: torch.amp.GradScaler | None,
    *,
    epoch: int,
    max_steps: int = 0,
    on_step: Callable[[int], None] | None = None,
    frozen: list[nn.Module] | None = None,
) -> dict[str, float]:
    model.train()
    for m in frozen or []:
        m.eval()  # a frozen backbone also keeps its BatchNorm statistics
    total = len(loader) if max_steps <= 0 else min(max_steps, len(loader))
    takes_input = getattr(loss_fn, "takes_input", False)
    loss_sum, seen, timed_images, t0 = 0.0, 0, 0, 0.0
    t_first = time.perf_counter()
    with _progress(compute.is_main) as bar:
        task = bar.add_task(f"epoch {epoch + 1} train", total=total, status="")
        for step, (x, y) in enumerate(loader):
            if step >= total:
                break
            if step == TIMING_WARMUP_STEPS:
                t0 = time.perf_counter()
            with compute.autocast():
                logits = model(x)
                # a DistillationLoss also needs the batch, for its teacher
                loss = loss_fn(logits, y, x) if takes_input else loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
            if step >= TIMING_WARMUP_STEPS:
                timed_images += y.shape[0]
            bar.update(task, advance=1, status=f"loss {loss_sum / seen:.4f}")
            if on_step is not None:
                on_step(step)
    if not t0:  # an epoch too short to skip the warm-up steps: time all of it
        t0, timed_images = t_first, seen
    elapsed = time.perf_counter() - t0
    ips = timed_images * compute.world / elapsed if elapsed > 0 else float("nan")
    return {"train_loss": loss_sum / max(1, seen), "train_images_per_s": ips, "train_steps": total}


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    loader: BatchLoader,
    compute: Compute,
    *,
    tta: bool | list[list[int]] = False,
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels over the loader's indices, gathered across ranks.

    ``tta``: also average the logits over flipped copies (a list of flip dims, e.g.
    ``[[3], [2]]`` for horizontal and vertical; ``True`` = horizontal only).
    """
    flips = [[3]] if tta is True else (tta or [])
    model.eval()
    probs, labels = [], []
    with _progress(compute.is_main) as bar:
        task = bar.add_task(desc, total=len(loader), status="")
        for x, y in loader:
            with compute.autocast():
                logits = model(x).float()
                for dims in flips:
                    logits = logits + model(torch.flip(x, dims=dims)).float()
                logits = logits / (1 + len(flips))
            probs.append(torch.softmax(logits, dim=1).cpu())
            labels.append(y.cpu())
            bar.advance(task)
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 0), dtype=np.float32)
    lab = torch.cat(labels).numpy() if labels else np.zeros((0,), dtype=np.int64)
    if compute.distributed:
        p, lab = _gather(p, lab, loader.shard_indices().numpy(), compute)
    return p.astype(np.float64), lab


def _gather(
    p: np.ndarray, lab: np.ndarray, idx: np.ndarray, compute: Compute
) -> tuple[np.ndarray, np.ndarray]:
    """Each rank evaluated ``indices[rank::world]``; put the pieces back in order."""
    parts: list[Any] = [None] * compute.world
    dist.all_gather_object(parts, (p, lab, idx))
    p_all = np.concatenate([q[0] for q in parts if len(q[0])])
    lab_all = np.concatenate([q[1] for q in parts])
    order = np.argsort(np.concatenate([q[2] for q in parts]), kind="stable")
    return p_all[order], lab_all[order]


def loss_from_probs(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood (no label smoothing): comparable across settings."""
    if len(labels) == 0:
        return float("nan")
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())
