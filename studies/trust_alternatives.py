"""Two more ways to trust predictions better, measured before building either of them.

    python studies/trust_alternatives.py RUN --name N [--boot B] [--threads T]

RUN is a finished run (``bench/trust.py``'s base run). Measured:

1. **More views for the failure score** (validation images of RUN). The ``flips`` confidence
   averages the predicted class's probability over the image and its training flips
   (``medxfer.evaluate.trust.flips_score``). Here the same average is taken over small
   geometric views that lie inside the ranges every run is trained with (``augment.rotate_deg``
   10, ``scale`` 0.10, ``translate`` 0.05): rotations of +-6 degrees, zooms of 1.08 and 0.93,
   shifts of +-4 pixels, alone and beside the flips. The measure is AUGRC over MSP's (lower is
   better), with a paired bootstrap interval.
2. **Is the test split a covariate shift of validation?** Weighted split-conformal prediction
   (Tibshirani et al. 2019) restores coverage under a covariate shift by weighing each
   validation image by the likelihood ratio of the new images' feature distribution to
   validation's. A logistic domain classifier, cross-fitted (5 folds) on standardised PCA-50
   features (penultimate, or penultimate and stage statistics as ``layers`` uses them), tells
   RUN's validation images from its official test images without their labels: its AUROC
   says how far the test split's inputs are from validation's. The test labels are used only
   to report the coverage and set size that plain and weighted sets (90%) reach, for every
   setting tried: nothing here is chosen on them, and no setting is adopted.

Writes studies/results/trust-alternatives/<name>.json.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save
from trust_tta import ratio_interval, softmax, study_args

from medxfer.evaluate.predict import folded_for_inference, probs_of_arrays
from medxfer.evaluate.selective import augrc
from medxfer.evaluate.trust import FLIP_AXES, trained_flips
from medxfer.evaluate.trust_detectors import features_and_logits, head_module
from medxfer.evaluate.trust_run import run_split_arrays

# (angle in degrees, zoom, horizontal shift in pixels): inside every run's training ranges
GEOMETRIC = {
    "rotate+6": (6.0, 1.0, 0),
    "rotate-6": (-6.0, 1.0, 0),
    "zoom1.08": (0.0, 1.08, 0),
    "zoom0.93": (0.0, 0.93, 0),
    "shift+4": (0.0, 1.0, 4),
    "shift-4": (0.0, 1.0, -4),
}
COVERAGE = 0.9


def geometric(images: np.ndarray, angle: float, scale: float, shift: int) -> np.ndarray:
    """uint8 (N, H, W[, 3]) images rotated, zoomed and shifted (bilinear, zero fill)."""
    import torchvision.transforms.v2.functional as F

    t = torch.from_numpy(images)
    chw = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    out = F.affine(chw, angle=angle, translate=[shift, 0], scale=scale, shear=[0.0, 0.0],
                   interpolation=F.InterpolationMode.BILINEAR)  # fmt: skip
    out = out[:, 0] if t.ndim == 3 else out.permute(0, 2, 3, 1)
    return np.ascontiguousarray(out.numpy())


def scored(folder: Path, splits: tuple[str, ...]) -> dict[str, Any]:
    model, meta, arrays = run_split_arrays(folder, splits)
    model, _ = folded_for_inference(model.eval(), meta)
    out: dict[str, Any] = {"model": model, "meta": meta, "arrays": arrays}
    with torch.inference_mode():
        for split in splits:
            feats, logits = features_and_logits(model, meta, arrays[split][0])
            out[split] = (feats, softmax(logits), arrays[split][1])
    return out


def views(run: dict[str, Any], boot: int) -> dict[str, Any]:
    model, meta = run["model"], run["meta"]
    images, labels = run["arrays"]["val"]
    _, probs, _ = run["val"]
    pred, rows = probs.argmax(1), np.arange(len(labels))
    correct = pred == labels
    with torch.inference_mode():
        of_pred = {name: probs_of_arrays(model, meta, geometric(images, *spec))[rows, pred]
                   for name, spec in GEOMETRIC.items()}  # fmt: skip
        flips = trained_flips(meta)
        for name in flips:
            flipped = np.ascontiguousarray(np.flip(images, axis=FLIP_AXES[name]))
            of_pred[name] = probs_of_arrays(model, meta, flipped)[rows, pred]
    plain = probs[rows, pred]
    groups = {f"plain+{name}": [name] for name in GEOMETRIC}
    groups["rotations"] = ["rotate+6", "rotate-6"]
    groups["zooms"] = ["zoom1.08", "zoom0.93"]
    groups["shifts"] = ["shift+4", "shift-4"]
    groups["geometric"] = list(GEOMETRIC)
    if flips:
        groups["flips"] = flips
        groups["flips+geometric"] = flips + list(GEOMETRIC)
    base = augrc(correct, plain)
    rows_out: dict[str, Any] = {}
    for name, members in groups.items():
        conf = np.mean([plain, *[of_pred[m] for m in members]], axis=0)
        rows_out[name] = {
            "augrc_over_msp": round(augrc(correct, conf) / base, 3) if base else None,
            "95ci": ratio_interval(correct, plain, conf, boot),
        }
    return {"images": len(labels), "errors": int((~correct).sum()),
            "msp_augrc": round(base, 5), "views": rows_out}  # fmt: skip


def weighted_sets(cal: np.ndarray, w_cal: np.ndarray, w_new: np.ndarray,
                  probs: np.ndarray) -> np.ndarray:  # fmt: skip
    """Weighted split-conformal sets: each new image's threshold is the COVERAGE quantile of
    the calibration scores weighted by w_cal, with its own weight on +inf."""
    order = np.argsort(cal)
    s, cum = cal[order], np.cumsum(w_cal[order])
    q = np.empty(len(w_new))
    for j, wj in enumerate(w_new):
        k = int(np.searchsorted(cum / (cum[-1] + wj), COVERAGE, side="left"))
        q[j] = s[k] if k < len(s) else math.inf
    return np.asarray((1 - probs) <= q[:, None])


def split_shift(run: dict[str, Any]) -> dict[str, Any]:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.preprocessing import StandardScaler

    fv, pv, yv = run["val"]
    ft, pt, yt = run["test"]
    width = head_module(run["model"], str(run["meta"]["arch"])).in_features  # penultimate
    cal = 1 - pv[np.arange(len(yv)), yv]

    def report(sets: np.ndarray) -> dict[str, float]:
        hit = sets[np.arange(len(yt)), yt]
        return {"coverage": round(float(hit.mean()), 4),
                "mean_set_size": round(float(sets.sum(1).mean()), 3),
                "empty": round(float((~sets.any(1)).mean()), 4)}  # fmt: skip

    n = len(cal)
    q = np.sort(cal)[math.ceil((n + 1) * COVERAGE) - 1]
    out: dict[str, Any] = {"coverage_nominal": COVERAGE, "plain": report((1 - pt) <= q)}
    domain = np.r_[np.zeros(len(fv)), np.ones(len(ft))]
    for feats in ("penultimate", "penultimate+stages"):
        x = np.concatenate([fv, ft])
        x = x[:, :width] if feats == "penultimate" else x
        x = PCA(50, random_state=0).fit_transform(StandardScaler().fit_transform(x))
        for c in (0.01, 0.1, 1.0):
            p = cross_val_predict(LogisticRegression(C=c, max_iter=2000), x, domain, cv=5,
                                  method="predict_proba")[:, 1]  # fmt: skip
            w = p / (1 - p) * len(fv) / len(ft)
            w_cal = w[: len(fv)]
            out[f"{feats} C={c}"] = {
                "domain_auroc": round(float(roc_auc_score(domain, p)), 3),
                "effective_calibration_images": round(float(w_cal.sum() ** 2 / (w_cal**2).sum())),
                **report(weighted_sets(cal, w_cal, w[len(fv) :], pt)),
            }
    return out


def main() -> None:
    args = study_args(__doc__, runs=1)
    t0 = time.perf_counter()
    folder = abspath(args.runs[0])
    first = scored(folder, ("val", "test"))
    result: dict[str, Any] = {"run": str(folder)}
    result["views"] = views(first, args.boot)
    ratios = {k: v["augrc_over_msp"] for k, v in result["views"]["views"].items()}
    print("views (validation):", ratios)
    result["split_shift"] = split_shift(first)
    print("split shift:", result["split_shift"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save(f"trust-alternatives/{args.name}", result, STUDY_RESULTS)


if __name__ == "__main__":
    main()
