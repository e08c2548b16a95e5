"""Is a run's test split harder than its validation split because validation leaks more?

    python studies/split_leakage.py RUN [--name N] [--threshold 0.999]

For the validation and the test images of a finished run (split as training split them,
``samples.csv.gz``), this counts the images that have a near-duplicate among the run's
training images, by ``medxfer audit``'s rule (32 px thumbnails, correlation at least
``--threshold`` as they are, flipped either way or rotated 180 degrees), and sets beside it the
run's accuracy and per-class recall on each split (``val_predictions.npz``,
``test_predictions.npz``). If validation held many more near-copies of training images than
test, its optimism would explain why thresholds and conformal sets calibrated on it fall short
on test. Each split's accuracy is also given apart for the images with and without a
near-copy. ``--trust`` adds, for the validation images only, what the run's trust statistics
make of each part: the flags, the errors flagged and the conformal sets' coverage (a run whose
validation held near-copies calibrated them partly on images the model had in effect seen).
Writes studies/results/split-leakage/<name>.json.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.config import load_config
from medxfer.data.audit import inspect_file, near_pairs
from medxfer.data.prepare import resolve_root

THUMB = 32


def _part(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    right = pred[mask] == labels[mask]
    return {"images": int(mask.sum()), "errors": int((~right).sum()),
            "accuracy": round(float(right.mean()), 4) if mask.any() else None}  # fmt: skip


def _trust_parts(run: Path, labels: np.ndarray, copy: np.ndarray) -> dict[str, Any]:
    """The run's flags and conformal sets on its validation images, with and without a copy."""
    from medxfer.evaluate.predict import folded_for_inference
    from medxfer.evaluate.trust import load_trust
    from medxfer.evaluate.trust_run import run_split_arrays

    model, meta, arrays = run_split_arrays(run, ("val",))
    images, val_labels = arrays["val"]
    if val_labels.tolist() != labels.tolist():
        raise SystemExit(f"{run}: the validation split does not match samples.csv.gz")
    model, _ = folded_for_inference(model.eval(), meta)
    with torch.inference_mode():
        t = load_trust(run).score(model, meta, images)
    wrong = t.pred != labels
    out: dict[str, Any] = {}
    for part, mask in (("with_a_near_copy", copy), ("without", ~copy), ("all", copy | ~copy)):
        n = max(int(mask.sum()), 1)
        out[part] = {
            "images": int(mask.sum()),
            "flags": {f: round(float((t.flag[mask] == f).sum() / n), 4)
                      for f in ("ok", "review", "unfamiliar")},
            "errors_flagged": round(float((t.flag[mask & wrong] != "ok").mean()), 4)
            if (mask & wrong).any() else None,
            "conformal_coverage": round(float(t.sets[mask, labels[mask]].mean()), 4),
            "mean_set_size": round(float(t.sets[mask].sum(1).mean()), 4),
        }  # fmt: skip
    return out


def measure(run: Path, threshold: float, trust: bool = False) -> dict[str, Any]:
    for f in ("samples.csv.gz", "val_predictions.npz", "test_predictions.npz", "config.yaml"):
        if not (run / f).is_file():
            raise SystemExit(f"{run} has no {f}: pass the folder of a finished `medxfer train`")
    root, _ = resolve_root(load_config(run / "config.yaml").data)
    with gzip.open(run / "samples.csv.gz", "rt") as fh:
        rows = list(csv.DictReader(fh))
    decoded = [inspect_file(str(root / r["path"]), THUMB) for r in rows]
    bad = [r["path"] for r, d in zip(rows, decoded, strict=True) if d[5]]
    if bad:
        raise SystemExit(f"{len(bad)} image(s) cannot be read under {root}, e.g. {bad[0]}")
    thumbs = np.stack([d[4] for d in decoded])
    split = np.array([r["split"] for r in rows])
    train = np.flatnonzero(split == "train")
    out: dict[str, Any] = {}
    for name in ("val", "test"):
        idx = np.flatnonzero(split == name)
        pairs = near_pairs(thumbs[train], thumbs[idx], THUMB, threshold)
        touched = {j for _, j, _, _ in pairs}
        z = np.load(run / f"{name}_predictions.npz")
        probs, labels = z["probs"], z["labels"]
        classes = sorted({r["label"] for r in rows if r["split"] != "test"})
        listed = [classes.index(rows[i]["label"]) for i in idx]
        if len(labels) != len(idx) or labels.tolist() != listed:
            raise SystemExit(f"{run}: {name}_predictions.npz does not match samples.csv.gz")
        pred = probs.argmax(1)
        copy = np.isin(np.arange(len(idx)), sorted(touched))
        out[name] = {
            "images": len(idx),
            "with_a_near_duplicate_in_train": len(touched),
            "share": round(len(touched) / max(len(idx), 1), 4),
            "accuracy": round(float((pred == labels).mean()), 4),
            "recall": {c: round(float((pred[labels == k] == k).mean()), 4)
                       for k, c in enumerate(classes) if (labels == k).any()},
            "with_a_near_copy": _part(pred, labels, copy),
            "without": _part(pred, labels, ~copy),
        }  # fmt: skip
        if trust and name == "val":
            out[name]["trust"] = _trust_parts(run, labels, copy)
    return {"run": str(run), "data": str(root), "threshold": threshold, "thumbnail": THUMB,
            "splits": out}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=abspath)
    p.add_argument("--name", help="result name (default: the run folder's name)")
    p.add_argument("--threshold", type=float, default=0.999)
    p.add_argument("--trust", action="store_true", help="the run's flags and sets on validation")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.run, args.threshold, args.trust)
    for name, r in result["splits"].items():
        n, share = r["with_a_near_duplicate_in_train"], r["share"]
        print(f"{name}: {n} of {r['images']} images ({share:.0%}) have a near-duplicate in "
              f"train; accuracy {r['accuracy']:.3f} (with one {r['with_a_near_copy']['accuracy']},"
              f" without {r['without']['accuracy']})")  # fmt: skip
        for part, v in r.get("trust", {}).items():
            print(f"  {name} {part}: {v}")
    save(f"split-leakage/{args.name or args.run.name}", result, STUDY_RESULTS)


if __name__ == "__main__":
    main()
