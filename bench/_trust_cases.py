"""bench/trust.py's cases: covariate shifts, far-OOD sets, the held-out class (and the run
without it), the robust run."""

from __future__ import annotations

import argparse
import csv
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import medxfer_cmd, run
from _trust_runs import (
    Run,
    Scorer,
    at_size,
    decode,
    fit_settings,
    load_run,
    pick,
    test_split,
    trust_record,
)
from _trust_tables import Scored, case_row, print_row
from rich.progress import Progress

from medxfer.config import load_config
from medxfer.data.prepare import resolve_root
from medxfer.data.sources import assign_splits, discover, with_patient_ids
from medxfer.data.synthetic import ensure_synthetic
from medxfer.errors import MedxferError
from medxfer.evaluate.predict import (
    folded_for_inference,
    load_trained,
    model_file,
    probs_of_arrays,
)
from medxfer.evaluate.shifts import LEVELS, SEVERITIES, SHIFTS, apply_shift


def covariate_cases(
    score: Scorer, base: Run, ref: Scored, idx: np.ndarray, source: np.ndarray, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Scored]]:
    """Every shift at every severity (and, when resizing from the source size is not exactly
    the test images, that resampling alone as a control)."""
    labels, classes = base.labels[idx], list(base.meta["classes"])
    rows, scored = [], {}
    plain = at_size(source, base.meta)
    if not np.array_equal(plain, base.images[idx]):
        s = score(base, "base", "resampled", lambda: plain)
        rows.append(case_row("resampled", "control", s, ref, labels, classes))
        rows[-1] |= {"shift": "none", "severity": 0}
        score.progress.console.print(print_row(rows[-1]))
    for shift in SHIFTS:
        for sev in SEVERITIES:
            case = f"{shift}-{sev}"

            def make(shift: str = shift, sev: int = sev) -> np.ndarray:
                return at_size(apply_shift(source, shift, sev, seed=seed), base.meta)

            scored[case] = s = score(base, "base", case, make)
            rows.append(case_row(case, "covariate", s, ref, labels, classes))
            rows[-1] |= {"shift": shift, "severity": sev, "level": LEVELS[shift][sev - 1]}
            score.progress.console.print(print_row(rows[-1]))
    return rows, scored


def far_cases(
    score: Scorer, base: Run, ref: Scored, other: Path | None, limit: int, seed: int
) -> list[dict[str, Any]]:
    """The other dataset's test images and the synthetic demo set (unless it is the run's)."""
    sets = {}
    if other is not None:
        sets["other-dataset"] = other
    if not base.data.get("synthetic"):
        sets["synthetic"] = ensure_synthetic()
    rows = []
    for case, root in sets.items():
        samples = test_split(root)
        paths = [samples[i].path for i in pick(len(samples), limit, seed)]

        def make(paths: list[str] = paths) -> np.ndarray:
            return base.load(paths)

        s = score(base, "base", case, make)
        rows.append(case_row(case, "far", s, ref) | {"data": str(root)})
        score.progress.console.print(print_row(rows[-1]))
    return rows


def held_out_manifest(base: Run, cls: str, out: Path) -> Path:
    """The run's dataset as a CSV manifest without ``cls``, each image in the split the run
    gave it (so validation and test stay the same images)."""
    d = load_config(base.folder / "config.yaml").data
    root, _ = resolve_root(d)
    samples = with_patient_ids(discover(root), d.patient_regex)
    samples = assign_splits(samples, d.val_fraction, d.test_fraction, d.split_seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "patient_id"])
        w.writerows([s.path, s.label, s.split, s.patient_id] for s in samples if s.label != cls)
    tmp.replace(out)
    return out


def held_out_run(base: Run, args: argparse.Namespace, work: Path) -> Path | None:
    """The run without the held-out class: given, trained here, or (None) the command printed."""
    cls = args.held_out_class
    if cls not in base.meta["classes"]:
        raise MedxferError(
            f"--held-out-class {cls!r} is not a class of the run",
            f"use one of {base.meta['classes']}",
        )
    if args.held_out_run is not None:
        return Path(args.held_out_run)
    folder = work / f"held-out-{cls}"
    manifest = held_out_manifest(base, cls, folder / "manifest.csv")
    cmd = [
        *medxfer_cmd(),
        "train",
        "--config",
        str(base.folder / "config.yaml"),
        "--data",
        str(manifest),
        "--run-dir",
        str(folder / "run"),
        "data.allow_outside_root=true",  # the manifest lists the base run's images where they are
        *(args.train_held_out or []),
    ]
    if args.train_held_out is None:
        print(
            f"near-OOD skipped: train the run without {cls} first, then pass "
            f"--held-out-run {folder / 'run'}:\n  {shlex.join(cmd)}"
        )
        return None
    if not (folder / "run" / "metrics.json").is_file():
        resume = ["--resume"] if (folder / "run" / "last.pt").is_file() else []
        run([*cmd, *resume], log=folder / "train.log")
    return folder / "run"


def near_case(
    score: Scorer, base: Run, folder: Path, cls: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The held-out run's own test split (in distribution) against the held-out class."""
    held = load_run(folder, trust="refit" if args.refit else "load", fit=fit_settings(args))
    if cls in held.meta["classes"]:
        raise MedxferError(f"{folder} was trained with {cls!r}", "pass a run trained without it")
    idx = pick(len(held.samples), args.limit, args.seed)
    ref = score(held, "held-out", "test", lambda: held.images[idx])
    k = list(base.meta["classes"]).index(cls)
    paths = [s.path for s, y in zip(base.samples, base.labels, strict=True) if y == k]
    paths = [paths[i] for i in pick(len(paths), args.limit, args.seed)]
    s = score(held, "held-out", f"class-{cls}", lambda: held.load(paths))
    row = case_row(f"held-out {cls}", "near", s, ref) | {"class": cls, "run": str(folder)}
    row["held_out_run_test"] = case_row(
        "test", "in-distribution", ref, None, held.labels[idx], list(held.meta["classes"])
    )
    row["trust"] = trust_record(held)
    score.progress.console.print(print_row(row))
    return row


def policy_of(folder: Path) -> str:
    """The run's augment.policy (standard for runs made before the key existed)."""
    import yaml

    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    return str((cfg.get("augment") or {}).get("policy", "standard"))


def robust_case(
    score: Scorer,
    folder: Path,
    base: Run,
    idx: np.ndarray,
    source: np.ndarray,
    base_rows: list[dict[str, Any]],
    base_acc: float,
    seed: int,
) -> dict[str, Any]:
    """The two augmentation policies compared: ``folder`` is the same recipe as the base run
    with the other augment.policy (one of the two must be robust). Accuracy on the test split
    and on the severity-3 shifts; the gain is robust minus standard (kept in the work folder
    like a scored case)."""
    model, meta = load_trained(folder)
    model, _ = folded_for_inference(model, meta)
    if list(meta["classes"]) != list(base.meta["classes"]):
        raise MedxferError(
            f"{folder} has classes {meta['classes']}, the base run {base.meta['classes']}",
            "pass a run on the same dataset",
        )
    policies = {"base": policy_of(base.folder), "other": policy_of(folder)}
    if sorted(policies.values()) != ["robust", "standard"]:
        raise MedxferError(
            f"the runs' augment.policy are {policies['base']} (base) and {policies['other']}",
            "pass a run of the same recipe with the other policy (robust against standard)",
        )
    stored = score.work / "cases" / "robust" / "accuracy.json"
    weights = model_file(folder)
    key = f"{weights}:{weights.stat().st_mtime_ns}|{score.settings}"
    known = json.loads(stored.read_text()) if stored.is_file() else {}
    if known.get("key") != key:
        known = {"key": key} | robust_accuracies(
            score.progress, model, meta, base, idx, source, seed
        )
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(known))
    base3 = {r["shift"]: r["accuracy"] for r in base_rows if r["severity"] == 3}
    by_policy = {
        policies["base"]: {"run": str(base.folder), "test": base_acc, "severity3": base3},
        policies["other"]: {
            "run": str(folder),
            "test": known["test"],
            "severity3": known["severity3"],
        },
    }
    robust, standard = by_policy["robust"], by_policy["standard"]
    gain = np.mean([robust["severity3"][sh] for sh in SHIFTS]) - np.mean(
        [standard["severity3"][sh] for sh in SHIFTS]
    )
    return {
        "run": str(folder),
        "base_policy": policies["base"],
        "robust_run": robust["run"],
        "standard_run": standard["run"],
        "test_accuracy": robust["test"],
        "severity3_accuracy": robust["severity3"],
        "standard_test_accuracy": standard["test"],
        "standard_severity3_accuracy": standard["severity3"],
        "covariate_gain_points": round(float(100 * gain), 2),
        "id_cost_points": round(100 * (standard["test"] - robust["test"]), 2),
    }


def robust_accuracies(
    progress: Progress,
    model: torch.nn.Module,
    meta: dict[str, Any],
    base: Run,
    idx: np.ndarray,
    source: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    labels = base.labels[idx]
    task = progress.add_task("robust run", total=1 + len(SHIFTS))

    def accuracy(arrays: np.ndarray) -> float:
        progress.advance(task)
        return round(float((probs_of_arrays(model, meta, arrays).argmax(1) == labels).mean()), 4)

    test = accuracy(decode([base.samples[i].path for i in idx], meta))
    shifted = {sh: accuracy(at_size(apply_shift(source, sh, 3, seed=seed), meta)) for sh in SHIFTS}
    progress.remove_task(task)
    return {"test": test, "severity3": shifted}
