"""``fit``: train with checkpoints every epoch, keep the best by validation balanced accuracy,
re-estimate its BatchNorm statistics on the un-augmented training images (kept when validation
balanced accuracy does not drop; ``train.bn_recalibrate``), then evaluate that model once on the
untouched test split.

Resume contract: every random choice of epoch ``e`` is seeded from (seed, e), and the last
checkpoint holds model, optimizer, scheduler, scaler, history and early-stopping state, so a run
killed after epoch ``k`` and resumed ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from medxfer.config import ExperimentConfig, config_text
from medxfer.data.loader import BatchLoader
from medxfer.errors import MedxferError
from medxfer.evaluate.metrics import compute_metrics, format_summary, shift_warnings
from medxfer.runs import make_run_dir
from medxfer.train import compute as compute_mod
from medxfer.train.checkpoint import (
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    load_checkpoint,
)
from medxfer.train.distill import DistillationLoss, Teacher
from medxfer.train.epoch import loss_from_probs, predict_probs, train_one_epoch
from medxfer.train.record import check_resume, record
from medxfer.train.setup import Setup, build, frozen_modules, set_trainable

EpochCallback = Callable[[int, dict[str, Any]], None]
EpochStart = Callable[[torch.nn.Module, int], None]
console = Console(stderr=True)


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)
    assert isinstance(inner, torch.nn.Module)
    return inner


def checkpoint_meta(cfg: ExperimentConfig, s: Setup) -> dict[str, Any]:
    """Everything ``predict`` needs to use the model without the training data."""
    pre = s.built.preprocess
    return {
        "arch": cfg.model.arch,
        "classes": s.data.classes,
        "image_size": cfg.data.image_size,
        "color": cfg.data.color,
        "resize": cfg.data.resize,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "config": cfg.to_dict(),
        "synthetic_data": s.data.info.get("synthetic", False),
    }


def _state(
    s: Setup, epoch: int, history: list[dict[str, Any]], best: float, stale: int
) -> dict[str, Any]:
    return {
        "model": _bare(s.model).state_dict(),
        "opt": s.opt.state_dict(),
        "sched": s.sched.state_dict(),
        "scaler": s.scaler.state_dict() if s.scaler is not None else None,
        "epoch": epoch,
        "history": history,
        "best": best,
        "stale": stale,
    }


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_json(history, run_dir / "history.json")
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for row in history for k in row))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(buf.getvalue(), run_dir / "history.csv")


def tta_flips(cfg: ExperimentConfig) -> list[list[int]]:
    """Test-time augmentation uses the flips the model was trained with (none if eval.tta off)."""
    if not cfg.eval.tta:
        return []
    return ([[3]] if cfg.augment.hflip else []) + ([[2]] if cfg.augment.vflip else [])


def _validate(s: Setup, c: compute_mod.Compute, cfg: ExperimentConfig) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    probs, labels = predict_probs(s.model, s.val_loader, c, tta=tta_flips(cfg), desc="  val")
    pred = probs.argmax(1)
    return {
        "val_loss": loss_from_probs(probs, labels),
        "val_accuracy": float(accuracy_score(labels, pred)),
        "val_balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
    }


def fit(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    callbacks: tuple[EpochCallback, ...] = (),
    prepare_model: Callable[[torch.nn.Module], None] | None = None,
    evaluate_test: bool = True,
    start_epoch: int = 0,
    warn_shift: bool = True,
    teacher: Teacher | None = None,
    epoch_start: EpochStart | None = None,
    trust: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; return the final metrics (also in metrics.json).

    ``prepare_model`` is called on the bare network after it is built and before training (or
    resuming) starts: the hook later stages use to load a rewound state or attach pruning masks.
    ``callbacks`` are called after every epoch with (epoch, history row).
    ``evaluate_test=False`` never runs the model on the test split (tuning trials), and skips
    the BatchNorm recalibration (a trial's value is its best per-epoch validation score).
    ``start_epoch=k`` begins a fresh run at epoch ``k`` of the schedule (epochs before it are
    skipped and the LR schedule is advanced past them): late rewinding retrains from epoch k.
    ``warn_shift=False``: no console warning for classes that validation and test disagree on
    (a lottery prints one summary for all its runs instead).
    ``teacher``: distill from this trained model besides the labels (``DistillationLoss``).
    ``epoch_start(model, epoch)`` is called on the bare network before each epoch trains (also
    the first epoch after a resume): soft pruning zeroes channels there.
    ``trust=False``: no per-image trust statistics at the end (lottery levels, fine-tuning
    steps and strategy comparisons; ``medxfer trust RUN`` fits them later on demand).
    """
    c = compute_mod.resolve(cfg.train)
    compute_mod.init_distributed(c)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    s = build(cfg, c)
    last = run_dir / "last.pt"
    resuming = resume and last.exists()
    if resuming:  # the same config, image list and splits as the epochs so far, or stop
        check_resume(cfg, s.data, run_dir)
    if c.is_main:
        ensure_dir(run_dir.parent)  # one message when the file system refuses
        make_run_dir(run_dir, "train")
    if prepare_model is not None:
        prepare_model(_bare(s.model))
    if teacher is not None:
        s.loss_fn = DistillationLoss(s.loss_fn, teacher, c.device, c.channels_last)
    if c.is_main:
        atomic_write_text(config_text(cfg), run_dir / "config.yaml")
        atomic_write_json(s.data.info, run_dir / "data.json")
        if not resuming:
            record(cfg, s.data, run_dir)
    history: list[dict[str, Any]] = []
    best, stale, start = -1.0, 0, 0
    if start_epoch:
        start = start_epoch
        _skip_schedule(s, start_epoch, cfg.train.steps_per_epoch)
    if resuming:
        st = load_checkpoint(last)
        _bare(s.model).load_state_dict(st["model"])
        s.opt.load_state_dict(st["opt"])
        s.sched.load_state_dict(st["sched"])
        if s.scaler is not None and st["scaler"] is not None:
            s.scaler.load_state_dict(st["scaler"])
        history, best, stale, start = st["history"], st["best"], st["stale"], st["epoch"] + 1
        if c.is_main:
            console.print(f"resuming {run_dir} after epoch {start}")
            was = history[-1].get("threads") if history else None
            if was is not None and was != torch.get_num_threads():
                console.print(
                    f"[yellow]warning[/yellow]: epochs so far ran with {was} CPU threads, this "
                    f"call has {torch.get_num_threads()} (train.threads=0 follows "
                    "OMP_NUM_THREADS): sums run in another order, so the result will differ "
                    "slightly from an uninterrupted run; set train.threads to pin it"
                )
    meta = checkpoint_meta(cfg, s)
    t_start = time.perf_counter()
    for epoch in range(start, cfg.train.epochs):
        head_only = cfg.model.freeze == "head" or (
            cfg.model.freeze == "unfreeze_after" and epoch < cfg.model.unfreeze_epoch
        )
        set_trainable(s.built, head_only=head_only)
        torch.manual_seed(cfg.train.seed * 7919 + epoch)  # dropout etc. replay after a resume
        s.train_loader.set_epoch(epoch)
        if epoch_start is not None:
            epoch_start(_bare(s.model), epoch)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": s.opt.param_groups[0]["lr"],
                               "threads": torch.get_num_threads()}  # fmt: skip
        t0 = time.perf_counter()
        row |= train_one_epoch(
            s.model, s.train_loader, s.loss_fn, s.opt, s.sched, c, s.scaler,
            epoch=epoch, max_steps=cfg.train.steps_per_epoch,
            frozen=frozen_modules(s.built) if head_only else None,
        )  # fmt: skip
        row["train_seconds"] = time.perf_counter() - t0
        row |= _validate(s, c, cfg)
        _check_finite(row, run_dir, has_val=len(s.val_loader.indices) > 0)  # before any save
        history.append(row)
        improved = row["val_balanced_accuracy"] > best
        if improved:
            best, stale = row["val_balanced_accuracy"], 0
        else:
            stale += 1
        if c.is_main:
            if improved:
                atomic_save(
                    {"model": _bare(s.model).state_dict(), "meta": meta, "epoch": epoch},
                    run_dir / "best.pt",
                )
            atomic_save(_state(s, epoch, history, best, stale), last)
            _write_history(run_dir, history)
            console.print(
                f"epoch {epoch + 1}/{cfg.train.epochs} loss {row['train_loss']:.4f} "
                f"val acc {row['val_accuracy']:.4f} bal-acc {row['val_balanced_accuracy']:.4f} "
                f"{row['train_images_per_s']:.1f} img/s{' *' if improved else ''}"
            )
        compute_mod.barrier(c)
        for cb in callbacks:
            cb(epoch, row)
        if cfg.train.early_stopping and stale >= cfg.train.early_stopping:
            if c.is_main:
                console.print(f"early stopping: no val improvement for {stale} epochs")
            break
    seconds = time.perf_counter() - t_start
    return finish(
        cfg,
        run_dir,
        s,
        c,
        history,
        seconds,
        evaluate_test=evaluate_test,
        warn_shift=warn_shift,
        trust=trust,
    )


def _check_finite(row: dict[str, Any], run_dir: Path, *, has_val: bool) -> None:
    """A non-finite loss means the weights diverged: stop before the epoch is saved (as last
    or as best), so the run folder keeps the epochs before it. (Without a validation split
    its loss is NaN by definition.)"""
    keys = ("train_loss", "val_loss") if has_val else ("train_loss",)
    bad = {k: row[k] for k in keys if not math.isfinite(float(row[k]))}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise MedxferError(
            f"training diverged at epoch {row['epoch']}: {what}; nothing of this epoch was saved "
            f"in {run_dir}",
            "lower train.lr (or use train.precision=fp32), then train into a new run folder",
        )


def _skip_schedule(s: Setup, epochs: int, cap: int) -> None:
    """Put the LR schedule where it stands after ``epochs`` epochs (``cap``: steps_per_epoch)."""
    per_epoch = len(s.train_loader) if cap <= 0 else min(cap, len(s.train_loader))
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        s.sched.last_epoch = epochs * per_epoch - 1
        s.sched.step()


def finish(
    cfg: ExperimentConfig,
    run_dir: Path,
    s: Setup,
    c: compute_mod.Compute,
    history: list[dict[str, Any]],
    seconds: float,
    *,
    evaluate_test: bool = True,
    warn_shift: bool = True,
    trust: bool = True,
) -> dict[str, Any]:
    """Evaluate the best checkpoint on val and test; write metrics.json and the figures.

    With ``evaluate_test=False`` only the validation split is evaluated."""
    _record_ranks(run_dir, s, c)
    compute_mod.barrier(c)
    best = load_checkpoint(run_dir / "best.pt")
    _bare(s.model).load_state_dict(best["model"])
    recal = best.get("bn_recalibration")  # present: done before this run was interrupted
    if recal is None and evaluate_test and cfg.train.bn_recalibrate:
        row = [h for h in history if h.get("epoch") == best["epoch"] + 1]
        # the best epoch's validation score is that of best.pt as saved: no second pass
        recal = recalibrate_batchnorm(s, c, cfg, row[0]["val_balanced_accuracy"] if row else None)
        if recal is not None and c.is_main:
            best |= {"model": _bare(s.model).state_dict(), "bn_recalibration": recal}
            atomic_save(best, run_dir / "best.pt")
        compute_mod.barrier(c)
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "best_epoch": best["epoch"] + 1,
        "epochs_run": len(history),
        "train_seconds": sum(h["train_seconds"] for h in history),
        "fit_seconds_this_call": seconds,
        "data": {"root": s.data.info["root"], "synthetic": s.data.info["synthetic"],
                 "counts": s.data.info["counts"], "classes": s.data.classes,
                 "dropped_leaks": len(s.data.info.get("dropped_leaks", [])),
                 "synthetic_images": s.data.info.get("synthetic_images"),
                 "patients": s.data.info.get("patients")},
        "model": {"arch": cfg.model.arch, "weights": cfg.model.weights,
                  "preprocess": s.built.preprocess.source},
        "compute": {"device": str(c.device), "channels_last": c.channels_last,
                    "precision": str(c.dtype) if c.dtype else "fp32", "world_size": c.world,
                    "threads": torch.get_num_threads()},
    }  # fmt: skip
    if recal is not None:
        results["bn_recalibration"] = recal
    splits = [("val", s.val_loader), ("test", s.test_loader)][: 2 if evaluate_test else 1]
    for split, loader in splits:
        if len(loader.indices) == 0:
            continue
        probs, labels = predict_probs(s.model, loader, c, tta=tta_flips(cfg), desc=f"  {split}")
        if c.is_main:
            results[split] = compute_metrics(
                labels, probs, s.data.classes, n_bootstrap=cfg.eval.n_bootstrap, seed=cfg.train.seed
            )
            if split == "test":
                _save_figures(run_dir, labels, probs, s.data.classes, history)
            # val: the reference of `medxfer shift`, usable where the training data is not
            save_predictions(run_dir / f"{split}_predictions.npz", probs, labels, cfg, c)
    if c.is_main and evaluate_test and trust and cfg.trust.enabled:
        results["trust"] = _fit_trust(run_dir, s, best["meta"], cfg)
    if c.is_main:
        atomic_write_json(results, run_dir / "metrics.json")  # written last: marks the run complete
        if "test" in results:
            console.print(f"test: {format_summary(results['test'])}")
            if "val" in results and warn_shift:
                for line in shift_warnings(results["val"], results["test"]):
                    console.print(f"[yellow]warning:[/] {line}")
        console.print(f"run folder: {run_dir}")
    compute_mod.barrier(c)
    return results


def _fit_trust(
    run_dir: Path, s: Setup, meta: dict[str, Any], cfg: ExperimentConfig
) -> dict[str, Any]:
    """Per-image trust statistics of the best model (``medxfer.evaluate.trust``): detectors
    fitted on the training images, thresholds and conformal sets on validation, then test
    scored once with them."""
    from medxfer.evaluate.trust_run import after_training, summary_line

    console.print("fitting per-image trust scores (train/val) and scoring test")
    out = after_training(run_dir, _bare(s.model), meta, s.data, cfg)
    if "skipped" in out:
        console.print(f"[yellow]trust scores skipped:[/] {out['skipped']}")
    elif "test" in out:
        console.print(f"  {summary_line(out['test'])} ({out['seconds']:.1f} s)")
    return out


def plain_train_loader(s: Setup, c: compute_mod.Compute, cfg: ExperimentConfig) -> BatchLoader:
    """The whole training split without augmentation, in a seeded shuffle with the last partial
    batch dropped (never a batch of one image), on every rank: what BatchNorm statistics are
    re-estimated from."""
    return BatchLoader(
        s.data.images, s.data.labels, s.data.split_index["train"],
        batch_size=max(cfg.train.eval_batch_size, 2), normalize=s.train_loader.normalize,
        device=c.device, train=True, augment=None, seed=cfg.train.seed,
        channels_last=c.channels_last,
    )  # fmt: skip


def recalibrate_batchnorm(
    s: Setup, c: compute_mod.Compute, cfg: ExperimentConfig, before: float | None = None
) -> dict[str, Any] | None:
    """Re-estimate the model's BatchNorm statistics on the un-augmented training images and
    keep them when validation balanced accuracy does not drop below ``before`` (the model's
    score as it stands; measured when not given), else restore the model as it was; None for a
    model without BatchNorm. Every rank computes the same statistics from the whole training
    split, so DDP ranks stay equal."""
    import copy

    from medxfer.train.batchnorm import batchnorm_layers, recompute_batchnorm

    model = _bare(s.model)
    if not batchnorm_layers(model) or len(s.data.split_index["train"]) < 2:
        return None
    if before is None:
        before = _validate(s, c, cfg)["val_balanced_accuracy"]
    saved = copy.deepcopy(model.state_dict())
    loader = plain_train_loader(s, c, cfg)
    if c.is_main:
        console.print(
            f"recalibrating BatchNorm statistics on {len(loader.indices)} un-augmented "
            "training images"
        )
    t0 = time.perf_counter()
    images = recompute_batchnorm(model, (x for x, _ in loader))
    after = _validate(s, c, cfg)["val_balanced_accuracy"]
    kept = after >= before
    if not kept:
        model.load_state_dict(saved)
    if c.is_main:
        console.print(
            f"  val balanced accuracy {before:.4f} -> {after:.4f}: "
            + ("kept" if kept else "not kept (training statistics restored)")
        )
    return {
        "images": images,
        "val_balanced_accuracy_before": before,
        "val_balanced_accuracy_after": after,
        "kept": kept,
        "seconds": time.perf_counter() - t0,
    }


def save_predictions(
    path: Path, probs: np.ndarray, labels: np.ndarray, cfg: ExperimentConfig, c: compute_mod.Compute
) -> None:
    """A split's probabilities and labels, with what made them (test-time flips, precision)."""
    precision = str(c.dtype) if c.dtype else "fp32"
    np.savez_compressed(path, probs=probs, labels=labels, tta=bool(tta_flips(cfg)),
                        precision=precision)  # fmt: skip


def state_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(_bare(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _record_ranks(run_dir: Path, s: Setup, c: compute_mod.Compute) -> None:
    """Under DDP every rank must end with the same weights; write each rank's checksum."""
    if not c.distributed:
        return
    import torch.distributed as dist

    sums: list[Any] = [None] * c.world
    dist.all_gather_object(sums, state_checksum(s.model))
    if c.is_main:
        atomic_write_json({"world_size": c.world, "state_checksums": sums}, run_dir / "ddp.json")


def _save_figures(
    run_dir: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    history: list[dict[str, Any]],
) -> None:
    from medxfer.evaluate.figures import save_all_figures

    save_all_figures(run_dir, labels, probs, classes, history, prefix="test")
