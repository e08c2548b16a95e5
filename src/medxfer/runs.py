"""Run folders: ``<out_dir>/<name>-<config fingerprint>``; complete when metrics.json exists.

A folder medxfer creates for a run or an output carries ``.medxfer-run`` (a small JSON: kind,
creation time, version). ``--force`` replaces a folder only through ``remove_run_dir``, which
refuses anything without that marker and anything that is, or holds, what the command reads
(data, a source run), the current directory, the home folder or a file-system root: nothing
medxfer did not make is ever deleted.

``run_summary`` and ``split_shift`` read a finished run's metrics.json (pure functions of its
dicts, re-exported by ``medxfer.evaluate.metrics``): they live here, below ``train``, so that
the lottery summary and the GAN strategy comparison may quote runs without importing
evaluation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medxfer.config import ExperimentConfig
from medxfer.errors import MedxferError

MARKER = ".medxfer-run"


def run_dir_for(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out_dir) / f"{cfg.name}-{cfg.fingerprint()}"


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists()


def make_run_dir(path: Path, kind: str) -> Path:
    """Create ``path`` (with its parents) as medxfer's own: the marker is written when the
    folder is new or empty. A folder that already holds files is used but never marked, so it
    is never deleted by ``--force``."""
    fresh = not path.exists() or (path.is_dir() and not any(path.iterdir()))
    path.mkdir(parents=True, exist_ok=True)
    if fresh and not is_run_dir(path):
        from medxfer import __version__

        record = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "version": __version__}  # fmt: skip
        (path / MARKER).write_text(json.dumps(record) + "\n")
    return path


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` carries medxfer's run marker."""
    return (path / MARKER).is_file()


def _absolute(path: str | Path) -> Path:
    """``path`` made absolute and normalised without following links."""
    return Path(os.path.normpath(os.path.abspath(Path(path).expanduser())))


def _holds(folder: Path, other: Path) -> bool:
    """Whether ``other`` is ``folder`` or lies below it."""
    return other == folder or folder in other.parents


def config_inputs(cfg: ExperimentConfig) -> list[Path]:
    """What a training of ``cfg`` reads: the data (folder or manifest), the synthetic manifest,
    a weights file, and the embedded demo set's location."""
    from medxfer.data.synthetic import default_synthetic_root

    out = [Path(cfg.data.root) if cfg.data.root else default_synthetic_root()]
    if cfg.data.synthetic:
        out.append(Path(cfg.data.synthetic))
    if cfg.model.weights not in ("imagenet", "none", ""):
        out.append(Path(cfg.model.weights))
    return out


def check_output_dir(path: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is, or holds, something the command reads."""
    out = _absolute(path)
    for item in inputs:
        if _holds(out, _absolute(item)):
            raise MedxferError(
                f"the output folder {path} is or holds the input {item}; writing there would "
                "mix results into it (and --force would delete it)",
                "choose an output folder outside the data (e.g. --run-dir runs/NAME or --out)",
            )


def remove_run_dir(path: Path, *, inputs: Iterable[str | Path] = ()) -> None:
    """Delete the run folder ``path`` (for ``--force``), only when medxfer made it and it is not,
    nor holds, an input, the current directory, the home folder or a root; else one error."""
    if not path.exists() and not path.is_symlink():
        return
    fix = "delete it yourself if you are sure, or choose a new folder"
    if path.is_symlink() or not path.is_dir():
        raise MedxferError(f"{path} is not a plain folder, so --force does not delete it", fix)
    target = _absolute(path)
    if target == Path(target.anchor) or target.resolve() == Path(target.anchor):
        raise MedxferError(f"{path} is a file-system root; --force never deletes it", fix)
    guarded = {"the current directory": Path.cwd(), "your home folder": Path.home()}
    for what, where in guarded.items():
        if _holds(target, _absolute(where)) or _holds(target, where.resolve()):
            raise MedxferError(f"{path} is or holds {what}; --force never deletes it", fix)
    if (path / "SYNTHETIC").is_file():  # medxfer.data.synthetic.MARKER: a data set
        raise MedxferError(f"{path} is a data set; --force never deletes it", fix)
    check_output_dir(path, inputs)
    if not is_run_dir(path):
        raise MedxferError(
            f"{path} was not made by medxfer (it has no {MARKER} marker), so --force does not "
            "delete it; run folders made by medxfer before the marker existed have none either",
            f"{fix} (another --run-dir / --out)",
        )
    shutil.rmtree(path)


def run_inputs(run: Path) -> list[Path]:
    """What a command reading the run folder ``run`` reads: the run and its training inputs."""
    from medxfer.config import load_config

    config = run / "config.yaml"
    return [run, *(config_inputs(load_config(config)) if config.is_file() else [])]


def replace_output_dir(path: Path, *, force: bool, inputs: Iterable[str | Path]) -> None:
    """An output folder's checks before a command writes there: never an input's folder; with
    ``force``, delete it first (``remove_run_dir``)."""
    inputs = list(inputs)
    check_output_dir(path, inputs)
    if force:
        remove_run_dir(path, inputs=inputs)


def prepare_run_dir(
    run_dir: Path, *, resume: bool, force: bool, inputs: Iterable[str | Path] = ()
) -> bool:
    """Decide what to do with an existing folder. Returns True when training should resume."""
    inputs = list(inputs)
    check_output_dir(run_dir, inputs)
    if not run_dir.exists():
        return False
    if force:
        remove_run_dir(run_dir, inputs=inputs)
        return False
    if is_complete(run_dir):
        return True  # resume of a complete run only re-reads its results
    if resume:
        return True
    if (run_dir / "last.pt").exists():
        raise MedxferError(
            f"{run_dir} holds an unfinished run of this config",
            "add --resume to continue it, or --force to start again",
        )
    return False


def run_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The flat record that benchmarks and comparisons quote from a run's ``metrics.json``:
    test accuracy, balanced accuracy and macro-F1 with their 95% intervals, per-class recall,
    the validation score the model was selected on, and what training cost and saw."""
    t = metrics["test"]
    ci = t.get("ci95", {})
    return {
        "test_accuracy": t["accuracy"],
        "test_accuracy_ci95": ci.get("accuracy"),
        "test_balanced_accuracy": t["balanced_accuracy"],
        "test_balanced_accuracy_ci95": ci.get("balanced_accuracy"),
        "test_macro_f1": t["macro_f1"],
        "test_auroc_macro_ovr": t.get("auroc_macro_ovr"),
        "test_ece": t.get("ece"),
        "per_class_recall": t["per_class_recall"],
        "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
        "best_epoch": metrics["best_epoch"],
        "train_seconds": round(metrics["train_seconds"], 1),
        "train_counts": metrics["data"]["counts"]["train"],
    }


# split_shift's defaults: a recall gap this large, and this unlikely under chance alone
SHIFT_MIN_GAP = 0.10
SHIFT_ALPHA = 0.01


def split_shift(
    val: dict[str, Any],
    test: dict[str, Any],
    *,
    min_gap: float = SHIFT_MIN_GAP,
    alpha: float = SHIFT_ALPHA,
) -> list[dict[str, Any]]:
    """Per class, where validation and test disagree: recall on each split, the class's share
    of each split, and whether the recall gap is both large (``min_gap``) and beyond chance.

    Validation is carved from the training split, so every choice made on it (tuning, the
    checkpoint, the pruned level) assumes test images look like validation images. A class
    whose recall differs between the two by more than sampling noise says that assumption
    fails for it: the test split likely comes from elsewhere (another site, period, or
    labeller), and validation cannot guide choices for that class. Chance is a two-sided
    two-proportion z-test on the recall counts, Bonferroni-corrected over the classes; classes
    absent from either split are skipped. The checkpoint was picked on validation, which makes
    its validation recall slightly optimistic; the ``min_gap`` floor keeps that selection bias
    from being flagged. Input: two ``compute_metrics`` results of one model.
    """
    names = [c for c in test["class_names"] if c in val["class_names"]]
    out = []
    for name in names:
        v, t = val["per_class"][name], test["per_class"][name]
        n1, n2 = v["support"], t["support"]
        if not n1 or not n2 or v["recall"] is None or t["recall"] is None:
            continue
        x1, x2 = round(v["recall"] * n1), round(t["recall"] * n2)
        pooled = (x1 + x2) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        gap = t["recall"] - v["recall"]
        p = 1.0 if se == 0 else math.erfc(abs(gap) / se / math.sqrt(2))
        out.append({
            "class": name,
            "val_recall": v["recall"], "test_recall": t["recall"], "gap": gap,
            "val_share": n1 / val["n"], "test_share": n2 / test["n"],
            "p_value": p,
            "shifted": abs(gap) >= min_gap and p < alpha / max(len(names), 1),
        })  # fmt: skip
    return out
