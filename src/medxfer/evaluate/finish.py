"""After ``fit``: evaluate the trained run's best model once on validation and the untouched
test split; write the predictions, the test figures, the per-image trust step and, last,
metrics.json (what marks a run complete: ``runs.is_complete``, resume and reuse key on it).

``evaluate_trained`` is also what the commands pass down as the ``Evaluate`` of the layers
below this one (``prune``, ``tune``, ``gan``), which train runs but cannot import evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from medxfer.config import ExperimentConfig
from medxfer.evaluate.metrics import (
    by_near_copy,
    compute_metrics,
    format_near_copies,
    format_summary,
    shift_warnings,
)
from medxfer.train import compute as compute_mod
from medxfer.train.callbacks import Callback
from medxfer.train.checkpoint import atomic_write_json
from medxfer.train.epoch import predict_probs
from medxfer.train.loop import fit, save_predictions, tta_flips
from medxfer.train.trained import TrainedRun

console = Console(stderr=True)


def evaluate_trained(
    trained: TrainedRun,
    *,
    evaluate_test: bool = True,
    warn_shift: bool = True,
    trust: bool = True,
) -> dict[str, Any]:
    """Evaluate the best model on val and test; write metrics.json (last) and the figures;
    return the metrics. Every rank calls it (the predictions are gathered across DDP ranks).

    ``evaluate_test=False`` never runs the model on the test split (tuning trials): only the
    validation split is evaluated.
    ``warn_shift=False``: no console warning for classes that validation and test disagree on
    (a lottery prints one summary for all its runs instead).
    ``trust=False``: no per-image trust statistics (lottery levels, fine-tuning steps and
    strategy comparisons; ``medxfer trust RUN`` fits them later on demand)."""
    cfg, run_dir, s, c = trained.cfg, trained.run_dir, trained.setup, trained.compute
    history = trained.history
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "best_epoch": trained.best_epoch + 1,
        "epochs_run": len(history),
        "train_seconds": sum(h["train_seconds"] for h in history),
        "fit_seconds_this_call": trained.seconds,
        "data": {"root": s.data.info["root"], "synthetic": s.data.info["synthetic"],
                 "counts": s.data.info["counts"], "classes": s.data.classes,
                 "dropped_leaks": len(s.data.info.get("dropped_leaks", [])),
                 "synthetic_images": s.data.info.get("synthetic_images"),
                 "patients": s.data.info.get("patients"),
                 "near_duplicate_groups": s.data.info.get("near_duplicate_groups")},
        "model": {"arch": cfg.model.arch, "weights": cfg.model.weights,
                  "preprocess": s.built.preprocess.source},
        "compute": {"device": str(c.device), "channels_last": c.channels_last,
                    "precision": str(c.dtype) if c.dtype else "fp32", "world_size": c.world,
                    "threads": torch.get_num_threads()},
    }  # fmt: skip
    if trained.bn_recalibration is not None:
        results["bn_recalibration"] = trained.bn_recalibration
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
                results["test_near_copies"] = _near_copies(trained, loader.indices, labels, probs)
            # val: the reference of `medxfer shift`, usable where the training data is not
            save_predictions(run_dir / f"{split}_predictions.npz", probs, labels, cfg, c)
    if c.is_main and evaluate_test and trust and cfg.trust.enabled:
        results["trust"] = _fit_trust(trained)
    if c.is_main:
        atomic_write_json(results, run_dir / "metrics.json")  # written last: marks the run complete
        if "test" in results:
            console.print(f"test: {format_summary(results['test'])}")
            if results.get("test_near_copies"):
                console.print(f"  {format_near_copies(results['test_near_copies'])}")
            if "val" in results and warn_shift:
                for line in shift_warnings(results["val"], results["test"]):
                    console.print(f"[yellow]warning:[/] {line}")
        console.print(f"run folder: {escape(str(run_dir))}", soft_wrap=True)
    compute_mod.barrier(c)
    return results


def fit_and_evaluate(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    evaluate_test: bool = True,
    warn_shift: bool = True,
    trust: bool = True,
) -> dict[str, Any]:
    """``fit`` then ``evaluate_trained``: a whole run, as ``medxfer train`` makes it; returns
    its metrics (also in metrics.json). The BatchNorm recalibration runs when the test split
    is evaluated (``fit(recalibrate=evaluate_test)``)."""
    trained = fit(cfg, run_dir, resume=resume, callbacks=callbacks, recalibrate=evaluate_test)
    return evaluate_trained(
        trained, evaluate_test=evaluate_test, warn_shift=warn_shift, trust=trust
    )


def _near_copies(
    trained: TrainedRun, indices: torch.Tensor, labels: np.ndarray, probs: np.ndarray
) -> dict[str, Any] | None:
    """Test accuracy apart for the test images with and without a near copy among the
    training images (``data.leak_threshold``, the audit's rule)."""
    from medxfer.data.audit import has_near_copy

    samples, cfg = trained.setup.data.samples, trained.cfg
    test = [samples[int(i)].path for i in indices]
    train = [x.path for x in samples if x.split == "train"]
    if not test or not train:
        return None
    copy = has_near_copy(test, train, cfg.data.leak_threshold)
    return by_near_copy(copy, labels, probs, cfg.data.leak_threshold)


def _fit_trust(trained: TrainedRun) -> dict[str, Any]:
    """Per-image trust statistics of the best model (``medxfer.evaluate.trust``): detectors
    fitted on the training images, thresholds and conformal sets on validation, then test
    scored once with them."""
    from medxfer.evaluate.trust_run import after_training, summary_line

    console.print("fitting per-image trust scores (train/val) and scoring test")
    out = after_training(
        trained.run_dir, trained.model, trained.meta, trained.setup.data, trained.cfg
    )
    if "skipped" in out:
        console.print(f"[yellow]trust scores skipped:[/] {out['skipped']}")
    elif "test" in out:
        console.print(f"  {summary_line(out['test'])} ({out['seconds']:.1f} s)")
    return out


def _save_figures(
    run_dir: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    history: list[dict[str, Any]],
) -> None:
    from medxfer.evaluate.figures import save_all_figures

    save_all_figures(run_dir, labels, probs, classes, history, prefix="test")
