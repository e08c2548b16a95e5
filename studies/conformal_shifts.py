"""Do conformal sets keep their coverage under appearance shifts? LAC and APS, on validation.

    python studies/conformal_shifts.py RUN --name N [--threads T] [--repeats R] [--cases DIR]

medxfer's sets use LAC scores (``1 - p(class)``, ``medxfer.evaluate.conformal``): the smallest
sets for a given coverage. Under a shift that flattens the softmax, LAC lets fewer classes in,
so its sets shrink, even to empty, exactly when the model is less sure. APS (adaptive
prediction sets, Romano et al. 2020) scores a class by the probability mass of the classes
ranked above it, plus its own: a flatter softmax then lets more classes in. It is measured in
two forms: randomized (the class's own mass times a seeded uniform draw, exact coverage) and
non-randomized (the whole own mass: deterministic sets, a little conservative).

On validation only: the run's validation images (split as training split them) and copies of
them under the nine covariate shifts of ``medxfer.evaluate.shifts`` at severity 3 (the suite's
functions and seed, at the model's input size as in ``studies/policy_shifts.py``). Validation is
split in halves ``--repeats`` times: sets calibrated on clean images of one half, counted on the
other half, clean and shifted. The sets are crepes' (unsmoothed), for every score.

Decision, stated before any number: a score other than LAC is worth offering if, on both
datasets, its mean coverage over the severity-3 shifted copies is at least 3 points closer to
nominal than LAC's, while on clean validation it covers within 1 point of nominal at a mean set
size within 1.2 (brain) and 1.6 (chest).

Amended after the seed-0 runs of both datasets, and then checked on the seed-1 runs: on chest
LAC already held its coverage under the shifts (0.887), so no score could be 3 points closer,
and the rule could never pass there whatever the score did. Amended rule: the mean coverage over
the severity-3 shifted copies is at least 0.88 (nominal minus 2 points) and above LAC's, on
every run; clean validation as before. Of the scores that pass, a deterministic one is
preferred: the same image must get the same set.

``--cases DIR`` (the suite's cached cases of this run, DIR/cases/base) then reads, once and not
to choose, the test split and the severity-3 cases with sets calibrated on all of validation.
Writes studies/results/conformal-shifts/<name>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.evaluate.conformal import nonconformity
from medxfer.evaluate.predict import folded_for_inference, probs_of_arrays
from medxfer.evaluate.shifts import SHIFTS, apply_shift
from medxfer.evaluate.trust_run import run_split_arrays

SEVERITY = 3


def aps_randomized(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, C) randomized APS: the mass ranked above each class plus its own times a uniform
    draw per image (medxfer's APS with the own mass scaled)."""
    return nonconformity(probs, "aps") - (1.0 - rng.random((len(probs), 1))) * probs


SCORES: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "lac": lambda p, rng: nonconformity(p, "lac"),
    "aps_randomized": aps_randomized,
    "aps": lambda p, rng: nonconformity(p, "aps"),
}


def sets_from(cal: np.ndarray, alphas: np.ndarray, coverage: float) -> np.ndarray:
    from crepes import ConformalClassifier

    cc = ConformalClassifier().fit(cal)
    return np.asarray(cc.predict_set(alphas, confidence=coverage, smoothing=False), bool)


def counted(sets: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Coverage, mean size, the share of empty sets and the mean top-class probability of the
    images given one (LAC leaves the least sure images without a class, APS the surest)."""
    empty = ~sets.any(1)
    return {
        "coverage": float(sets[np.arange(len(labels)), labels].mean()),
        "mean_set_size": float(sets.sum(1).mean()),
        "empty": float(empty.mean()),
        "empty_top_probability": float(probs[empty].max(1).mean()) if empty.any() else math.nan,
    }


def _rounded(values: list[float]) -> float | None:
    """The mean of the values that are numbers, to 4 places (None: none is)."""
    got = [v for v in values if not math.isnan(v)]
    return round(float(np.mean(got)), 4) if got else None


def validation_probs(run: Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Validation labels, clean probabilities and those under each severity-3 shift."""
    model, meta, arrays = run_split_arrays(run, ("val",))
    model, _ = folded_for_inference(model.eval(), meta)
    images, labels = arrays["val"]
    shifted = {}
    with torch.inference_mode():
        clean = probs_of_arrays(model, meta, images)
        for shift in SHIFTS:
            shifted[shift] = probs_of_arrays(
                model, meta, apply_shift(images, shift, SEVERITY, seed=0)
            )
    return labels, clean, shifted


def on_validation(
    labels: np.ndarray, clean: np.ndarray, shifted: dict[str, np.ndarray], coverage: float,
    repeats: int,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for name, score in SCORES.items():
        rng = np.random.default_rng(0)
        rows: list[dict[str, dict[str, float]]] = []
        for _ in range(repeats):
            perm = rng.permutation(len(labels))
            cal, held = perm[: len(perm) // 2], perm[len(perm) // 2 :]
            a_cal = score(clean[cal], rng)[np.arange(len(cal)), labels[cal]]
            row = {"clean": counted(sets_from(a_cal, score(clean[held], rng), coverage),
                                    labels[held], clean[held])}  # fmt: skip
            for shift, p in shifted.items():
                row[shift] = counted(sets_from(a_cal, score(p[held], rng), coverage),
                                     labels[held], p[held])  # fmt: skip
            rows.append(row)
        mean = {case: {k: _rounded([r[case][k] for r in rows]) for k in rows[0][case]}
                for case in rows[0]}  # fmt: skip
        sev3 = round(float(np.mean([mean[s]["coverage"] for s in shifted])), 4)
        out[name] = {**mean, "severity3_mean_coverage": sev3}
    return out


def read_cases(
    cases: Path, labels_val: np.ndarray, clean: np.ndarray, test_labels: np.ndarray,
    coverage: float,
) -> dict[str, Any]:  # fmt: skip
    """Test split and severity-3 cases, sets calibrated on all of validation (read once)."""
    out: dict[str, Any] = {}
    for name, score in SCORES.items():
        rng = np.random.default_rng(1)
        a_cal = score(clean, rng)[np.arange(len(labels_val)), labels_val]
        per: dict[str, Any] = {}
        for case in ["test", *(f"{s}-{SEVERITY}" for s in SHIFTS)]:
            with np.load(cases / f"{case}.npz") as z:
                probs = z["probs"]
            per[case] = {k: _rounded([v]) for k, v in
                         counted(sets_from(a_cal, score(probs, rng), coverage),
                                 test_labels, probs).items()}  # fmt: skip
        per["severity3_mean_coverage"] = round(
            float(np.mean([per[f"{s}-{SEVERITY}"]["coverage"] for s in SHIFTS])), 4
        )
        out[name] = per
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=abspath)
    p.add_argument("--name", required=True, help="studies/results/conformal-shifts/<name>.json")
    p.add_argument("--coverage", type=float, default=0.90)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--cases", type=abspath, help="the suite's DIR/cases/base (read once)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.run / "config.yaml").exists():
        raise SystemExit(f"error: {args.run} is not a run folder\nfix: give a `medxfer train` run")
    if args.cases is not None and not (args.cases / "test.npz").is_file():
        raise SystemExit(f"error: {args.cases} holds no cached suite cases\n"
                         f"fix: run bench/trust.py {args.run} --work-dir DIR, then --cases "
                         "DIR/cases/base")  # fmt: skip
    t0 = time.perf_counter()
    labels, clean, shifted = validation_probs(args.run)
    val = on_validation(labels, clean, shifted, args.coverage, args.repeats)
    for name, m in val.items():
        print(f"{name}: clean {m['clean']}, severity-3 mean coverage "
              f"{m['severity3_mean_coverage']}", flush=True)  # fmt: skip
    out: dict[str, Any] = {"run": str(args.run), "coverage": args.coverage,
                           "repeats": args.repeats, "validation_images": len(labels),
                           "validation": val}  # fmt: skip
    if args.cases is not None:
        test_labels = np.load(args.run / "test_predictions.npz")["labels"]
        out["read_once"] = read_cases(args.cases, labels, clean, test_labels, args.coverage)
        for name, m in out["read_once"].items():
            print(f"read once, {name}: test {m['test']}, severity-3 mean coverage "
                  f"{m['severity3_mean_coverage']}")  # fmt: skip
    out["seconds"] = round(time.perf_counter() - t0, 1)
    save(f"conformal-shifts/{args.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
