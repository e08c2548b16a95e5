"""bench/trust.py's numbers: a scored case, its row of the tables, the summary and targets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.evaluate.selective import (
    accepted_accuracy,
    augrc,
    aurc,
    coverage,
    errors_flagged,
    ood_auroc_fpr95,
)

FLAGS = ("ok", "review", "unfamiliar")
SET_SIZE_TARGET = {"brain-tumor-mri": 1.2, "chest-xray-pneumonia": 1.6}  # the targets


@dataclass
class Scored:
    """What ``TrustModel.score`` gives for a set of images, as plain arrays."""

    probs: np.ndarray  # (N, C)
    pred: np.ndarray  # (N,)
    scores: dict[str, np.ndarray]  # detector -> (N,), higher = more unusual
    ood: np.ndarray  # (N,) the chosen detector's score
    failure: np.ndarray  # (N,)
    flag: np.ndarray  # (N,) ok | review | unfamiliar
    sets: np.ndarray  # (N, C) bool

    @classmethod
    def of(cls, t: Any) -> Scored:
        return cls(
            np.asarray(t.probs),
            np.asarray(t.pred),
            {k: np.asarray(v) for k, v in t.scores.items()},
            np.asarray(t.ood_score),
            np.asarray(t.failure_score),
            np.asarray(t.flag).astype(str),
            np.asarray(t.sets, dtype=bool),
        )

    @classmethod
    def concat(cls, parts: list[Scored]) -> Scored:
        def cat(get: Any) -> np.ndarray:
            return np.concatenate([get(p) for p in parts])

        names = parts[0].scores
        return cls(
            cat(lambda p: p.probs),
            cat(lambda p: p.pred),
            {k: cat(lambda p, k=k: p.scores[k]) for k in names},
            cat(lambda p: p.ood),
            cat(lambda p: p.failure),
            cat(lambda p: p.flag),
            cat(lambda p: p.sets),
        )

    def save(self, path: Path, key: str) -> None:
        """One ``.npz`` (no pickled objects), written under a temporary name then renamed."""
        arrays = {
            "probs": self.probs,
            "pred": self.pred,
            "ood": self.ood,
            "sets": self.sets,
            "failure": self.failure,
            "flag": self.flag.astype("U16"),
            "key": np.array(key),
        } | {f"score_{k}": v for k, v in self.scores.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, key: str) -> Scored | None:
        """The case scored before with the same ``key`` (run, trust files, images), else None."""
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            scores = {k[6:]: z[k] for k in z.files if k.startswith("score_")}
            return cls(z["probs"], z["pred"], scores, z["ood"], z["failure"], z["flag"], z["sets"])


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def detectors(ref: Scored, case: Scored) -> dict[str, dict[str, float | None]]:
    """AUROC and FPR@95 of telling ``case`` from the in-distribution ``ref``, per detector and
    for the chosen one (``chosen``)."""
    out = {}
    for name, values in [*ref.scores.items(), ("chosen", ref.ood)]:
        other = case.ood if name == "chosen" else case.scores[name]
        auroc, fpr = ood_auroc_fpr95(values, other)
        out[name] = {"auroc": _r(auroc), "fpr95": _r(fpr)}
    return out


def labelled(s: Scored, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, what the flags accept and catch, selective risk, conformal sets."""
    correct, ok, msp = s.pred == labels, s.flag == "ok", s.probs.max(axis=1)
    sizes, held = s.sets.sum(axis=1), s.sets[np.arange(len(labels)), labels]
    per_class = {classes[c]: _r(held[labels == c].mean()) for c in np.unique(labels)}
    return {
        "accuracy": _r(correct.mean()),
        "accepted_accuracy": _r(accepted_accuracy(correct, ok)),
        "errors_flagged": _r(errors_flagged(correct, ok)),
        "aurc": {"msp": _r(aurc(correct, msp)), "failure": _r(aurc(correct, -s.failure))},
        "augrc": {"msp": _r(augrc(correct, msp)), "failure": _r(augrc(correct, -s.failure))},
        "conformal": {
            "coverage": _r(held.mean()),
            "mean_set_size": _r(sizes.mean()),
            "coverage_per_class": per_class,
        },
    }


def case_row(
    case: str,
    kind: str,
    s: Scored,
    ref: Scored | None,
    labels: np.ndarray | None = None,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """One case of the tables; ``ref`` (the in-distribution images) None for the test split."""
    row: dict[str, Any] = {"case": case, "kind": kind, "n": len(s.pred)}
    row["flags"] = {f: _r((s.flag == f).mean()) for f in FLAGS}
    row["ok_fraction"] = _r(coverage(s.flag == "ok"))
    if ref is not None:
        row["detectors"] = detectors(ref, s)
    if labels is not None:
        row |= labelled(s, labels, classes or [str(c) for c in range(s.probs.shape[1])])
    return row


def _worst(values: list[float | None], worst: Any) -> float | None:
    present = [v for v in values if v is not None]
    return worst(present) if present else None


def summary(
    test: dict[str, Any],
    covariate: list[dict[str, Any]],
    far: list[dict[str, Any]],
    near: dict[str, Any] | None,
    robust: dict[str, Any] | None,
    nominal: float,
) -> dict[str, Any]:
    """The issue's summary keys from the tables (points where it says points)."""
    sev3 = [r for r in covariate if r["severity"] == 3]
    gaps = [
        None
        if r["accepted_accuracy"] is None
        else 100 * (test["accuracy"] - r["accepted_accuracy"])
        for r in sev3
    ]
    augrc_ = test["augrc"]
    reduction = 1 - augrc_["failure"] / augrc_["msp"] if augrc_["msp"] else None
    return {
        "far_ood_auroc": _worst([r["detectors"]["chosen"]["auroc"] for r in far], min),
        "held_out_class_auroc": near["detectors"]["chosen"]["auroc"] if near else None,
        "severity3_accepted_accuracy_gap": _r(_worst(gaps, max), 2),
        "severity3_errors_flagged": _worst([r["errors_flagged"] for r in sev3], min),
        "test_ok_fraction": test["ok_fraction"],
        "augrc_reduction_vs_msp": _r(reduction),
        "conformal_nominal": nominal,
        "conformal_coverage": test["conformal"]["coverage"],
        "conformal_mean_set_size": test["conformal"]["mean_set_size"],
        "robust_covariate_gain": robust["covariate_gain_points"] if robust else None,
        "robust_id_cost": robust["id_cost_points"] if robust else None,
    }


def targets(s: dict[str, Any], dataset: str) -> dict[str, dict[str, Any]]:
    """Each target of the issue: the measured value, the bound, met (None: not measured)."""
    cov_gap = (
        None
        if s["conformal_coverage"] is None
        else round(100 * abs(s["conformal_coverage"] - s["conformal_nominal"]), 2)
    )
    checks: list[tuple[str, float | None, str, float | None]] = [
        ("far_ood_auroc", s["far_ood_auroc"], ">=", 0.99),
        ("held_out_class_auroc", s["held_out_class_auroc"], ">=", 0.90),
        ("severity3_accepted_accuracy_gap", s["severity3_accepted_accuracy_gap"], "<=", 3.0),
        ("severity3_errors_flagged", s["severity3_errors_flagged"], ">=", 0.80),
        ("test_ok_fraction", s["test_ok_fraction"], ">=", 0.90),
        ("augrc_reduction_vs_msp", s["augrc_reduction_vs_msp"], ">=", 0.30),
        ("conformal_coverage_gap_points", cov_gap, "<=", 2.0),
        (
            "conformal_mean_set_size",
            s["conformal_mean_set_size"],
            "<=",
            SET_SIZE_TARGET.get(dataset),
        ),
        ("robust_covariate_gain", s["robust_covariate_gain"], ">=", 10.0),
        ("robust_id_cost", s["robust_id_cost"], "<=", 1.0),
    ]
    out = {}
    for name, value, op, bound in checks:
        met = (
            None
            if value is None or bound is None
            else (value >= bound if op == ">=" else value <= bound)
        )
        out[name] = {
            "value": value,
            "target": None if bound is None else f"{op} {bound}",
            "met": met,
        }
    return out


def folder_warnings(rows: list[dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    """Whether ``medxfer predict`` would warn about each case as one folder (its flag counts
    against the run's acceptance: ``folder_summary``); sets ``folder_warning`` on each row and
    returns the share of folders warned per kind (covariate shifts per severity)."""
    from medxfer.evaluate.predict_trust import folder_summary

    for row in rows:
        # the fractions are rounded to 4 places: exact counts for up to 5,000 images
        counts = {f: round(row["flags"][f] * row["n"]) for f in FLAGS}
        row["folder_warning"] = bool(folder_summary(counts, record)[1])
    out: dict[str, Any] = {"test": next(r["folder_warning"] for r in rows if r["case"] == "test")}
    for kind in ("control", "far", "near"):
        kept = [r["folder_warning"] for r in rows if r["kind"] == kind]
        if kept:
            out[kind] = _r(float(np.mean(kept)))
    for sev in (1, 2, 3):
        kept = [r["folder_warning"] for r in rows
                if r["kind"] == "covariate" and r.get("severity") == sev]  # fmt: skip
        if kept:
            out[f"covariate_severity{sev}"] = _r(float(np.mean(kept)))
    return out


def print_row(row: dict[str, Any]) -> str:
    """One line of progress output for a finished case."""
    parts = [f"{row['case']:<16} n={row['n']:<5} ok={row['ok_fraction']:.3f}"]
    if "accuracy" in row:
        acc = row["accepted_accuracy"]
        parts.append(f"acc={row['accuracy']:.3f} accepted={'-' if acc is None else f'{acc:.3f}'}")
    if "detectors" in row:
        parts.append(f"auroc={row['detectors']['chosen']['auroc']:.3f}")
    return "  ".join(parts)
