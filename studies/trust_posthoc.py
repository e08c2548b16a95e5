"""pytorch-ood's other post-hoc detectors against medxfer's, chosen on validation images only.

    python studies/trust_posthoc.py RUN --held-out-run RUN2 --held-out-class NAME [--name N]
    python studies/trust_posthoc.py --combine JSON JSON

medxfer's ``unfamiliar`` flag rests on ``layers`` (the penultimate Mahalanobis distance with the
stages' feature statistics, ``medxfer.evaluate.trust_detectors``); ``trust.detector:
mahalanobis`` is what the docs recommend where an unseen finding is the bigger worry. pytorch-ood
implements several newer post-hoc detectors that read only the penultimate features and the
head, so they cost no retraining: activation shaping or clipping before the energy score
(ReAct, Sun et al. 2021; ASH-S, Djurisic et al. 2023; SCALE, Xu et al. 2024), weight
sparsification (DICE, Sun & Li 2022), nearest neighbours guided by confidence (NNGuide, Park et
al. 2023), the distance to the decision boundaries (fDBD, Liu & Qin 2024), the generalized
entropy (GEN, Liu et al. 2023) and simplified Hopfield energy (SHE, Zhang et al. 2023). Their
hyper-parameters are the papers' and pytorch-ood's defaults, plus the value OpenOOD uses where
it differs; nothing is tuned here.

Two stand-ins that use no test image, as studies/trust_depths.py measures them:

- shift proxies: RUN's validation images against shifted copies of at most 500 of them
  (uniform noise, inversion, strong blur, resolution loss: the proxies the default detector is
  chosen on), mean AUROC;
- a new class: RUN2 is the same recipe trained without NAME (``bench/trust.py
  --train-held-out``), so its training and validation images are RUN's without NAME. RUN2's
  validation images against RUN's *validation* images of NAME, which RUN2 never saw: AUROC.

Each candidate also goes into ``layers`` in the penultimate Mahalanobis distance's place
(``layers with X``: X standardised on validation like every depth, same weights).

The rules, stated before the first run:

1. ``layers`` changes its penultimate term to X only if, on both datasets, ``layers with X``
   gains at least 0.02 new-class AUROC over ``layers`` and loses at most 0.01 shift-proxy mean
   AUROC.
2. The docs recommend a standalone X instead of ``mahalanobis`` for an unseen finding only if,
   on both datasets, X gains at least 0.02 new-class AUROC over ``mahalanobis``.

Anything else is measured, not built. Writes studies/results/trust-posthoc/<name>.json; run it
on each dataset, then ``--combine`` the JSONs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, save
from trust_depths import FittedRun, stand_in_args, stand_ins

from medxfer.evaluate.selective import ood_auroc_fpr95
from medxfer.evaluate.trust_detectors import (
    Detectors,
    features_and_logits,
)

GAIN = 0.02  # the least new-class AUROC gain either rule asks for
SHIFT_LOSS = 0.01  # the most shift-proxy AUROC rule 1 lets ``layers with X`` lose
BASE = ("msp", "energy", "mahalanobis", "knn", "vim", "layers")  # medxfer's own detectors
INSIDE = ("knn", "vim", "nnguide", "fdbd", "react", "ash-s@0.65", "scale@0.85")  # in ``layers``

Scores = dict[str, np.ndarray]


class Fitted(FittedRun):
    """``FittedRun`` with ``layers`` standardised on its validation images, and pytorch-ood's
    post-hoc detectors fitted on the same training features. ``scores(images)``: every
    candidate's score per image, higher = more unusual."""

    def __init__(self, folder: Path) -> None:
        from pytorch_ood.detector import DICE, SHE, NNGuide, fDBD

        super().__init__(folder)
        tf, ty = self.train_features, self.train_labels
        vf, vl = features_and_logits(self.model, self.meta, self.val[0])
        self.det.standardise_layers(vf)
        pen = torch.from_numpy(np.ascontiguousarray(tf[:, : self.det.dim], np.float32))
        labels = torch.from_numpy(np.asarray(ty, np.int64))
        with torch.no_grad():
            # ReAct's clip: the 90th percentile of the training activations (the paper's)
            self.react_at = float(np.percentile(pen.numpy(), 90))
            self.nnguide = NNGuide(None, self.head, k=10).fit_features(pen, labels)
            self.fdbd = fDBD(None, self.head).fit_features(pen)
            self.she = SHE(None, self.head).fit_features(pen, labels)
            self.dice = DICE(None, self.head.weight, self.head.bias, p=0.7).fit_features(
                pen, labels
            )
        self.val_scores = self.scores_of(vf, vl)

    def scores(self, images: np.ndarray) -> Scores:
        return self.scores_of(*features_and_logits(self.model, self.meta, images))

    def scores_of(self, f: np.ndarray, logits: np.ndarray) -> Scores:
        from pytorch_ood.detector import ASH, GEN, SCALE, EnergyBased

        out = self.det.scores(f, logits)
        pen = torch.from_numpy(np.ascontiguousarray(f[:, : self.det.dim], np.float32))
        lg = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
        maps = pen[:, :, None, None]  # pooled features as 1x1 maps, as pytorch-ood's shapers want

        def head(x: torch.Tensor) -> torch.Tensor:
            return self.head(x.flatten(1))

        def ident(x: torch.Tensor) -> torch.Tensor:
            return x

        with torch.no_grad():
            shaped: dict[str, torch.Tensor] = {
                "gen": GEN.score(lg),
                "react": EnergyBased.score(self.head(pen.clamp(max=self.react_at))),
                "ash-s@0.65": ASH(ident, head, "ash-s", 0.65).predict_feature_maps(maps),
                "ash-s@0.90": ASH(ident, head, "ash-s", 0.90).predict_feature_maps(maps),
                "scale@0.65": SCALE(ident, head, 0.65).predict_feature_maps(maps),
                "scale@0.85": SCALE(ident, head, 0.85).predict_feature_maps(maps),
                "dice@0.7": self.dice.predict_features(pen),
                "nnguide": self.nnguide.predict_features(pen),
                "fdbd": self.fdbd.predict_features(pen),
                "she": self.she.predict_features(pen),
            }
        out |= {n: s.double().numpy() for n, s in shaped.items()}
        if self.det.layer_loc is not None:
            out["_depths"] = self.det.layer_distances(f, out["mahalanobis"])
        return out


def with_inside(name: str, s: Scores, ref: Scores, det: Detectors) -> np.ndarray:
    """``layers`` with ``name``'s score, standardised on ``ref`` (the run's validation scores),
    in the penultimate Mahalanobis distance's place."""
    assert det.layer_loc is not None and det.layer_scale is not None
    assert det.layer_weights is not None
    z = (s["_depths"] - det.layer_loc) / det.layer_scale
    r = ref[name]
    z[:, -1] = (s[name] - r.mean()) / max(float(r.std()), 1e-12)
    return z @ np.asarray(det.layer_weights, np.float64)


def candidates(det: Detectors) -> dict[str, Callable[[Scores, Scores], np.ndarray]]:
    names = [*BASE, "gen", "react", "ash-s@0.65", "ash-s@0.90", "scale@0.65", "scale@0.85",
             "dice@0.7", "nnguide", "fdbd", "she"]  # fmt: skip

    def alone(name: str) -> Callable[[Scores, Scores], np.ndarray]:
        return lambda s, ref: s[name]

    def inside(name: str) -> Callable[[Scores, Scores], np.ndarray]:
        return lambda s, ref: with_inside(name, s, ref, det)

    out = {n: alone(n) for n in names}
    if det.layer_loc is not None:
        out |= {f"layers with {n}": inside(n) for n in INSIDE}
    return out


def measure(run: Path, held: Path, cls: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    base, shifted, other, new, n_proxy = stand_ins(Fitted, run, held, cls)
    bv, ov = base.val_scores, other.val_scores
    table: dict[str, Any] = {}
    near_scores = candidates(other.det)
    for name, score in candidates(base.det).items():
        near_score = near_scores[name]
        ref = score(bv, bv)
        per = {p: ood_auroc_fpr95(ref, score(s, bv)) for p, s in shifted.items()}
        near = ood_auroc_fpr95(near_score(ov, ov), near_score(new, ov))
        table[name] = {
            "shift_proxy_auroc": {p: round(a, 4) for p, (a, _) in per.items()},
            "shift_proxy_mean_auroc": round(float(np.mean([a for a, _ in per.values()])), 4),
            "new_class_auroc": round(near[0], 4),
            "new_class_fpr95": round(near[1], 4),
        }
    return {
        "runs": {"base": str(run), "held_out": str(held)},
        "held_out_class": cls,
        "images": {"validation": len(base.val[1]), "per_proxy": n_proxy,
                   "held_out_validation": len(other.val[1]), "new_class": len(new["msp"])},
        "react_clip": {"base": base.react_at, "held_out": other.react_at},
        "detectors": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def choose(paths: list[Path]) -> dict[str, Any]:
    """Both pre-stated rules, applied to every dataset's JSON."""
    per = {p.stem: json.loads(p.read_text())["detectors"] for p in paths}

    def gains(name: str, against: str) -> dict[str, dict[str, float]]:
        def gain(t: dict[str, Any], key: str) -> float:
            return round(t[name][key] - t[against][key], 4)

        return {
            d: {
                "new_class": gain(t, "new_class_auroc"),
                "shift_proxy": gain(t, "shift_proxy_mean_auroc"),
            }
            for d, t in per.items()
        }

    inside = {f"layers with {n}": gains(f"layers with {n}", "layers") for n in INSIDE}
    alone = [n for n in next(iter(per.values())) if not n.startswith("layers")]
    standalone = {n: gains(n, "mahalanobis") for n in alone if n != "mahalanobis"}
    passes_1 = [n for n, g in inside.items()
                if all(v["new_class"] >= GAIN and v["shift_proxy"] >= -SHIFT_LOSS
                       for v in g.values())]  # fmt: skip
    passes_2 = [n for n, g in standalone.items() if all(v["new_class"] >= GAIN for v in g.values())]
    return {
        "datasets": list(per),
        "rule_1": {"states": f"`layers with X` gains >= {GAIN} new-class AUROC over `layers` and "
                   f"loses <= {SHIFT_LOSS} shift-proxy mean AUROC, on every dataset",
                   "gains_over_layers": inside, "passes": passes_1},
        "rule_2": {"states": f"X gains >= {GAIN} new-class AUROC over `mahalanobis` on every "
                   "dataset", "gains_over_mahalanobis": standalone, "passes": passes_2},
        "images": "validation only (no test image)",
    }  # fmt: skip


def main() -> None:
    args = stand_in_args(__doc__ or "")
    if args.combine:
        out = choose(args.combine)
        print("rule 1 passes:", out["rule_1"]["passes"], " rule 2 passes:", out["rule_2"]["passes"])
        save("trust-posthoc/choice", out, STUDY_RESULTS)
        return
    out = measure(args.run, args.held_out_run, args.held_out_class)
    for name, row in out["detectors"].items():
        print(f"{name:>22}: shift proxies {row['shift_proxy_mean_auroc']:.3f}  "
              f"new class {row['new_class_auroc']:.3f}")  # fmt: skip
    save(f"trust-posthoc/{args.name or args.run.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
