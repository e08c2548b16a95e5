"""Trust statistics for a run folder: after training, or later with ``medxfer trust RUN``.

Thresholds are fitted first (training and validation images only); the test split is scored
once afterwards, with those thresholds, for metrics.json and the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxfer.errors import MedxferError
from medxfer.evaluate import conformal, selective
from medxfer.evaluate.trust import (
    FLAGS,
    TrustModel,
    TrustScores,
    _subsample,
    fit_on_arrays,
    run_settings,
)

FIGURE = "test_risk_coverage.png"


def run_split_arrays(
    run_dir: Path, splits: tuple[str, ...]
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A finished run's model, meta, and (images, labels) of ``splits``, split exactly as
    training split them (the run's config.yaml; images from the decode cache)."""
    from medxfer.config import load_config
    from medxfer.data.prepare import prepare, resolve_root
    from medxfer.evaluate.predict import load_trained

    if not (run_dir / "config.yaml").is_file():
        raise MedxferError(f"{run_dir} has no config.yaml", "pass a run folder of `medxfer train`")
    cfg = load_config(run_dir / "config.yaml")
    root, _ = resolve_root(cfg.data)
    if not root.exists():
        raise MedxferError(
            f"the run's training data {root} is not reachable here",
            f"run `medxfer trust {run_dir}` on a machine that has it, then copy the run folder",
        )
    model, meta = load_trained(run_dir)
    data = prepare(cfg.data)
    if list(data.classes) != list(meta["classes"]):
        raise MedxferError(
            f"the data at {root} has classes {data.classes}, the model {meta['classes']}",
            "point the run's data.root at the dataset it was trained on",
        )
    out = {sp: _split_arrays(data, sp, cfg) for sp in splits}
    return model, meta, out


def _split_arrays(data: Any, split: str, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """A split's pixels and labels. Only the seeded subsample of training images the detectors
    are fitted on is gathered (``trust.train_images``): pixels are read from the memory-mapped
    cache, never copied for the whole split."""
    idx = data.split_index[split]
    labels = data.labels[idx].numpy()
    if split == "train":
        keep = _subsample(labels, cfg.trust.train_images, cfg.train.seed)
        idx, labels = idx[keep], labels[keep]
    return data.images[idx].numpy(), labels


def test_report(tm: TrustModel, ts: TrustScores, labels: np.ndarray) -> dict[str, Any]:
    """Selective-prediction and conformal metrics of labelled images scored with ``tm``."""
    correct = ts.pred == labels
    ok = ts.flag == "ok"
    failure_conf = -ts.failure_score  # higher = more trusted
    msp_conf = -ts.scores["msp"]
    return {
        "n": len(labels),
        "flags": {f: float((ts.flag == f).mean()) for f in FLAGS},
        "ok_fraction": float(ok.mean()),
        "accuracy": float(correct.mean()),
        "accepted_accuracy": selective.accepted_accuracy(correct, ok),
        "errors_flagged": selective.errors_flagged(correct, ok),
        "aurc": {"msp": selective.aurc(correct, msp_conf),
                 "failure": selective.aurc(correct, failure_conf)},
        "augrc": {"msp": selective.augrc(correct, msp_conf),
                  "failure": selective.augrc(correct, failure_conf)},
        "risk_coverage": {"msp": selective.curve_points(correct, msp_conf),
                          "failure": selective.curve_points(correct, failure_conf)},
        "conformal": conformal.coverage_report(ts.sets, labels, list(tm.record["classes"]))
        | {"nominal": tm.record["coverage"]},
    }  # fmt: skip


def summary(tm: TrustModel, test: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """What metrics.json keeps under ``trust``."""
    r = tm.record
    out: dict[str, Any] = {
        "acceptance": r["acceptance"], "coverage": r["coverage"],
        "class_conditional": r["class_conditional"],
        "conformal_score": r.get("conformal_score", "lac"), "ood_detector": r["ood_detector"],
        "failure_score": r["failure"]["method"],
        "confidence": r["failure"].get("confidence", {"kind": "msp"}),
        "validation": r["validation"]["flags"],
        "seconds": round(seconds, 2),
    }  # fmt: skip
    if test is not None:
        out["test"] = test
    return out


def fit_and_report(
    run_dir: Path, model: torch.nn.Module, meta: dict[str, Any],
    arrays: dict[str, tuple[np.ndarray, np.ndarray]], **options: Any,
) -> dict[str, Any]:  # fmt: skip
    """Fit on train/val, save the trust files, then score test once; the metrics.json entry."""
    t0 = time.perf_counter()
    tm = fit_on_arrays(model, meta, arrays["train"], arrays["val"], **options)
    tm.save(run_dir)
    test = None
    if "test" in arrays and len(arrays["test"][1]):
        images, labels = arrays["test"]
        test = test_report(tm, tm.score(model, meta, images), labels)
        plot_risk_coverage(test, run_dir / FIGURE)
    return summary(tm, test, time.perf_counter() - t0)


def after_training(
    run_dir: Path, model: torch.nn.Module, meta: dict[str, Any], data: Any, cfg: Any
) -> dict[str, Any]:
    """The trust step of training (``trust.*`` config keys). A model whose features cannot be
    read, too small a validation split or any failure of the fit is reported as skipped
    (``medxfer trust RUN`` retries it and shows the error): it never fails a trained run."""
    arrays = {sp: _split_arrays(data, sp, cfg) for sp in ("train", "val", "test")}
    was_training = model.training
    try:
        return fit_and_report(
            run_dir, model, meta, arrays, acceptance=cfg.trust.acceptance,
            coverage=cfg.trust.coverage, class_conditional=cfg.trust.class_conditional,
            bank_size=cfg.trust.train_images, seed=cfg.train.seed,
            batch_size=cfg.train.eval_batch_size, detector=cfg.trust.detector,
            conformal_score=cfg.trust.conformal_score,
        )  # fmt: skip
    except MedxferError as err:
        return {"skipped": err.message}
    except Exception as err:  # the trained model matters more than its trust statistics
        return {"skipped": f"{type(err).__name__}: {err}"}
    finally:
        model.train(was_training)


def trust_command(
    run_dir: Path, *, acceptance: float = 0.95, coverage: float = 0.90,
    class_conditional: bool = False, detector: str = "auto", conformal_score: str = "lac",
) -> dict[str, Any]:  # fmt: skip
    """``medxfer trust RUN``: fit (or refit) a finished run's trust statistics without
    retraining, then add the test metrics to its metrics.json."""
    from medxfer.train.checkpoint import atomic_write_json

    run_dir = Path(run_dir)
    model, meta, arrays = run_split_arrays(run_dir, ("train", "val", "test"))
    seed, bank = run_settings(meta)
    result = fit_and_report(
        run_dir,
        model,
        meta,
        arrays,
        acceptance=acceptance,
        coverage=coverage,
        class_conditional=class_conditional,
        seed=seed,
        bank_size=bank,
        detector=detector,
        conformal_score=conformal_score,
    )
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        atomic_write_json(metrics | {"trust": result}, metrics_path)
    return result


def plot_risk_coverage(test: dict[str, Any], path: Path) -> Path:
    """Risk–coverage curves of MSP and the failure score on test, the ``ok`` point marked."""
    from medxfer.evaluate.figures import _save, plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, label in (("msp", "confidence (MSP)"), ("failure", "failure score")):
        pts = test["risk_coverage"][name]
        auc = test["augrc"][name]
        ax.plot(pts["coverage"], pts["risk"], label=f"{label}, AUGRC {auc:.4f}")
    if test["accepted_accuracy"] is not None:
        ax.scatter([test["ok_fraction"]], [1 - test["accepted_accuracy"]], color="k", zorder=3,
                   label="images flagged ok")  # fmt: skip
    ax.set_xlabel("coverage (fraction of test images accepted)")
    ax.set_ylabel("risk (error rate of accepted)")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def summary_line(test: dict[str, Any]) -> str:
    """One line on the test split's flags and conformal sets, as ``train`` and ``trust`` print."""
    conf = test["conformal"]
    return (
        f"test: {test['ok_fraction']:.3f} ok (accepted accuracy "
        f"{test['accepted_accuracy'] or 0:.3f}), conformal coverage {conf['coverage']:.3f}, "
        f"mean set size {conf['mean_set_size']:.2f}"
    )
