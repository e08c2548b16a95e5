"""The report section "Will it work on new images?": per-image flags, conformal sets and the
risk–coverage curve of each evaluated model, from its metrics.json ``trust`` entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medxfer.evaluate.metrics import format_near_copies
from medxfer.report.blocks import Note, Section, Table, Text, load, num, status_note

FIGURE = "test_risk_coverage.png"  # written by medxfer.evaluate.trust_run


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


CONFIDENCE = {"msp": "MSP", "pnorm": "MaxLogit-pNorm", "flips": "flips"}  # failure score input


def _row(label: str, t: dict[str, Any]) -> list[str]:
    test, conf = t["test"], t["test"]["conformal"]
    kind = t.get("confidence", {"kind": "msp"})["kind"]
    failure = f"{t['failure_score']} of {CONFIDENCE.get(kind, kind)} and distance"
    return [
        label, t["ood_detector"], failure, _pct(test["ok_fraction"]),
        _pct(test["flags"]["review"]), _pct(test["flags"]["unfamiliar"]),
        num(test["accuracy"]), num(test["accepted_accuracy"]), _pct(test["errors_flagged"]),
        f"{num(test['augrc']['msp'], 4)} / {num(test['augrc']['failure'], 4)}",
        f"{_pct(conf['coverage'])} (nominal {_pct(conf['nominal'])})",
        num(conf["mean_set_size"], 2),
    ]  # fmt: skip


def trust(r: dict[str, Any]) -> Section:
    s = Section("trust", "Will it work on new images?")
    if "evaluate" not in r["outputs"]:
        return s.add(status_note(str(r["status"].get("evaluate", "not run")), "evaluate"))
    s.add(Text(
        "Every prediction gets a flag: `unfamiliar` when the image's features lie far from "
        "the training images' (the detector chosen on validation against shifted copies of "
        "validation images), `review` when it looks familiar but is likely wrong (a failure "
        "score combining a confidence and that distance; `flips`: the predicted class's "
        "probability averaged over the image and its training flips), else `ok`. Thresholds are "
        "set on validation so that the stated share of validation images ends `ok`; the test "
        "split below was scored once with them. Conformal sets hold the true class with the "
        "nominal probability for images like validation. AUGRC (lower is better) compares "
        "ranking images by confidence alone with the failure score. `medxfer predict RUN "
        "FOLDER --html page.html` gives the same per image, flagged images first."
    ))  # fmt: skip
    rows, figures, missing, copies = [], [], [], []
    for row in load(r["outputs"]["evaluate"]["evaluation"])["rows"]:
        label = "fine-tuned + pruned" if row["pruned"] else "fine-tuned"
        metrics = load(Path(row["run_dir"]) / "metrics.json")
        if metrics.get("test_near_copies"):
            copies.append(f"{label}: {format_near_copies(metrics['test_near_copies'])}")
        t = metrics.get("trust")
        if not t or "test" not in t:
            missing.append(f"{label} ({row['run_dir']})")
            continue
        rows.append(_row(label, t))
        figures.append((label, Path(row["run_dir"]) / FIGURE))
    if rows:
        header = ["model", "distance", "failure score", "test ok", "review", "unfamiliar",
                  "accuracy", "accuracy of ok", "errors flagged", "AUGRC MSP / failure",
                  "set coverage", "mean set size"]  # fmt: skip
        s.add(Table(header, rows, caption="Per-image flags and conformal sets on test",
                    id="trust-table"))  # fmt: skip
    if copies:
        s.add(Text(
            "A test image that is a near copy of a training image (the audit's rule) has in "
            "effect been seen, so accuracy is given apart; the images without one are the "
            "closer estimate for images from elsewhere. " + "; ".join(copies) + "."
        ))  # fmt: skip
    for label, fig in figures:
        s.image(fig, f"Risk–coverage on test ({label}): error rate of the accepted images as "
                "more are accepted")  # fmt: skip
    if missing:
        s.add(Note("No trust statistics for " + "; ".join(missing) + ": run `medxfer trust "
                   "RUN` on each (no retraining)."))  # fmt: skip
    return s
