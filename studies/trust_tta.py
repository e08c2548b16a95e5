"""Does averaging over the training flips (test-time augmentation) give a better failure
score than one view? Validation images only.

    python studies/trust_tta.py RUN [RUN ...] --name N [--boot B] [--threads T]

For each finished run, its validation images are scored as ``medxfer predict`` scores them
(BatchNorm folded), once as they are and once per flip the run was trained with
(``augment.hflip``, ``augment.vflip``: the views of ``eval.tta``). Measured:

- accuracy of one view and of the mean of the views' softmax probabilities (``tta``);
- AUGRC (lower is better) of the maximum softmax probability of one view (``msp``, the baseline
  the failure score is held against); of ``flips``, the confidence the failure score can
  choose (``medxfer.evaluate.trust.flips_score``: the probability of the one-view prediction
  averaged over the views, so the prediction is unchanged); and of test-time augmentation
  proper (``tta_msp``: the views' mean prediction ranked by its own MSP);
- the AUGRC ratio ``flips / msp`` with a paired bootstrap interval over validation images
  (``--boot`` resamples; the few errors of a validation split make single ratios noisy).

A run trained without flips has no views to average and is refused. Nothing here reads a test
image. Writes studies/results/trust-tta/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.evaluate.predict import folded_for_inference, probs_of_arrays
from medxfer.evaluate.selective import augrc
from medxfer.evaluate.trust import FLIP_AXES, flips_score, trained_flips
from medxfer.evaluate.trust_detectors import features_and_logits
from medxfer.evaluate.trust_run import run_split_arrays


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).double(), 1).numpy()


def ratio_interval(correct: np.ndarray, base: np.ndarray, new: np.ndarray, boot: int,
                   seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """95% paired bootstrap interval of AUGRC(new) / AUGRC(base) over the images (scores:
    higher = more confident)."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(boot):
        i = rng.integers(0, len(correct), len(correct))
        b = augrc(correct[i], base[i])
        if b > 0:
            ratios.append(augrc(correct[i], new[i]) / b)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return round(float(lo), 3), round(float(hi), 3)


def measure(folder: Path, boot: int) -> dict[str, Any]:
    model, meta, arrays = run_split_arrays(folder, ("val",))
    model, _ = folded_for_inference(model.eval(), meta)
    flips = trained_flips(meta)
    if not flips:
        raise SystemExit(f"{folder}: trained without flips, so there is no view to average")
    images, labels = arrays["val"]
    with torch.inference_mode():  # as the trust statistics score them: float64 softmax
        plain = softmax(features_and_logits(model, meta, images)[1])
        views = [plain] + [
            probs_of_arrays(model, meta, np.ascontiguousarray(np.flip(images, axis=FLIP_AXES[f])))
            for f in flips
        ]
    mean = np.mean(views, axis=0)
    correct, correct_tta = plain.argmax(1) == labels, mean.argmax(1) == labels
    # the product's confidence (predictions unchanged), checked against its own code path
    conf = -flips_score(model, meta, images, plain, flips)
    rows = np.arange(len(labels))
    assert np.allclose(conf, mean[rows, plain.argmax(1)], atol=1e-5)
    a_msp, a_flips = augrc(correct, plain.max(1)), augrc(correct, conf)
    return {
        "run": str(folder),
        "views": ["plain", *flips],
        "images": len(labels),
        "errors": {"plain": int((~correct).sum()), "tta": int((~correct_tta).sum())},
        "accuracy": {
            "plain": round(float(correct.mean()), 4),
            "tta": round(float(correct_tta.mean()), 4),
        },
        "augrc": {
            "msp": round(a_msp, 5),
            # the probability of the (one-view) predicted class, averaged over the views
            "flips": round(a_flips, 5),
            # test-time augmentation proper: its own predictions, ranked by their MSP
            "tta_msp": round(augrc(correct_tta, mean.max(1)), 5),
        },
        "flips_over_msp": round(a_flips / a_msp, 3) if a_msp else None,
        "flips_over_msp_95ci": ratio_interval(correct, plain.max(1), conf, boot),
    }


def study_args(doc: str, runs: str | int = "+") -> argparse.Namespace:
    """The arguments these validation studies share: run folders (``runs``: argparse's
    nargs), --name, --boot, --threads (set here)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("runs", nargs=runs)
    p.add_argument("--name", required=True, help="result name")
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = study_args(__doc__)
    t0 = time.perf_counter()
    rows = [measure(abspath(r), args.boot) for r in args.runs]
    for r in rows:
        print(f"{r['run']}: views {r['views']} acc {r['accuracy']} augrc {r['augrc']} "
              f"flips/msp {r['flips_over_msp']} {r['flips_over_msp_95ci']}")  # fmt: skip
    save(f"trust-tta/{args.name}", {"runs": rows, "seconds": round(time.perf_counter() - t0, 1)},
         STUDY_RESULTS)  # fmt: skip


if __name__ == "__main__":
    main()
