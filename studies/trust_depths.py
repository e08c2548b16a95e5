"""How the ``layers`` detector should weigh its depths, chosen on validation images only.

    python studies/trust_depths.py RUN --held-out-run RUN2 --held-out-class NAME [--name N]

``layers`` (``medxfer.evaluate.trust_detectors``) standardises a Mahalanobis distance per
network stage and the penultimate one on validation images and combines them with fixed
weights (equal weights before this study; ``PENULTIMATE_SHARE`` of them to the penultimate
distance since). The early stages see appearance shifts that a robust-trained network's penultimate
features ignore; the penultimate features see a new class better. This study measures, for
several ways of combining the standardised distances, two stand-ins that use no test image:

- shift proxies: RUN's validation images against shifted copies of them (uniform noise,
  inversion, strong blur, resolution loss: `medxfer.evaluate.trust_proxies`, the proxies the
  default detector is chosen on), mean AUROC;
- a new class: RUN2 is the same recipe trained without NAME (bench/trust.py --train-held-out
  makes it; its training and validation images are RUN's without NAME). RUN2's validation
  images against RUN's *validation* images of NAME, which RUN2 never saw: AUROC.

The rules: ``equal`` weighs every depth alike (``layers`` before this study), ``w=<share>``
gives the penultimate distance that share and the stages' mean the rest (``w=1`` is the
penultimate Mahalanobis alone), ``max`` takes the largest standardised distance, and
``either`` the larger of two: the penultimate distance and the stages' mean, that mean
standardised again on validation (added after the first run had shown the others' numbers;
see docs/studies/trust.md). Beside them, measured the same way: the relative Mahalanobis
distance (``rmd``: the class-wise distance minus that of one class-agnostic Gaussian, Ren et
al. 2021, for near-OOD), ``w=0.75`` with it in the penultimate's place, and pytorch-ood's
Gram-matrix detector (``gram``, Sastry & Oore 2020: per-class bounds of the Gram-matrix
statistics of the stem and the seven block groups; EfficientNet runs only).

The criterion stated before the first run: per dataset, the worse of the two stand-ins (min
of shift-proxy mean AUROC and new-class AUROC); across datasets, the mean of that; ties to the
earlier rule. ``--combine`` also reports the mean of the two stand-ins, the criterion the
default follows (docs/studies/trust.md says why). Writes
studies/results/trust-depths/<name>.json; run it on each dataset, then ``--combine`` the JSONs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

from medxfer.evaluate.selective import ood_auroc_fpr95
from medxfer.evaluate.trust import PROXY_IMAGES, _subsample, run_settings
from medxfer.evaluate.trust_detectors import (
    Detectors,
    depth_weights,
    features_and_logits,
    fit_detectors,
    head_module,
    stage_widths,
)
from medxfer.evaluate.trust_proxies import proxy_shifts
from medxfer.evaluate.trust_run import run_split_arrays

SHARES = (0.25, 0.5, 0.75, 1.0)


def rules(n_depths: int) -> dict[str, np.ndarray | str]:
    """name -> weights over the (stages..., penultimate) standardised distances, or "max"."""
    out: dict[str, np.ndarray | str] = {"equal": np.full(n_depths, 1.0 / n_depths)}
    out |= {f"w={w}": depth_weights(n_depths, w) for w in SHARES}
    out["max"] = "max"
    out["either"] = "either"
    return out


def combine(z: np.ndarray, rule: np.ndarray | str, ref: np.ndarray) -> np.ndarray:
    """The rule's score of ``z``; ``ref``: the same run's validation ``z`` (for ``either``)."""
    if isinstance(rule, np.ndarray):
        return z @ rule
    if rule == "max":
        return z.max(1)
    stages, ref_stages = z[:, :-1].mean(1), ref[:, :-1].mean(1)  # either: the larger of two
    stages = (stages - ref_stages.mean()) / max(float(ref_stages.std()), 1e-12)
    return np.maximum(stages, z[:, -1])


class FittedRun:
    """A run's model and validation images, and its detectors fitted as ``medxfer trust`` fits
    them on (at most ``trust.train_images``) training images, whose features and labels it
    keeps (``train_features``, ``train_labels``)."""

    def __init__(self, folder: Path) -> None:
        self.model, self.meta, arrays = run_split_arrays(folder, ("train", "val"))
        self.model.eval()
        seed, bank = run_settings(self.meta)
        self.seed = seed
        (tx, ty), self.val = arrays["train"], arrays["val"]
        keep = _subsample(ty, bank, seed)
        self.train_images, self.train_labels = tx[keep], ty[keep]
        tf, _ = features_and_logits(self.model, self.meta, self.train_images)
        self.train_features = tf
        self.head = head_module(self.model, str(self.meta["arch"]))
        self.det: Detectors = fit_detectors(
            tf, self.train_labels, self.head.weight.detach().double().numpy(),
            self.head.bias.detach().double().numpy(), seed=seed,
            stage_dims=stage_widths(self.model, self.meta, self.val[0]),
        )  # fmt: skip


class Fitted(FittedRun):
    """``FittedRun`` with the relative Mahalanobis and Gram detectors. ``scores(images)`` gives
    each image's standardised distance per depth (``z``: N, stages + 1), its relative
    Mahalanobis distance (``rmd``) and pytorch-ood's Gram-matrix deviation (``gram``)."""

    def __init__(self, folder: Path) -> None:
        from pytorch_ood.detector import RMD

        super().__init__(folder)
        tf, ty = self.train_features, self.train_labels
        # relative Mahalanobis (Ren et al. 2021), pytorch-ood's (its covariances are the raw
        # ones: with Ledoit-Wolf shrinkage on both Gaussians the difference measured worse)
        self.rmd = RMD(None).fit_features(
            torch.from_numpy(np.ascontiguousarray(tf[:, : self.det.dim], np.float32)),
            torch.from_numpy(np.asarray(ty, np.int64)),
        )
        self.gram = gram_detector(self.model, self.meta, self.train_images, ty)
        raw = self._raw(self.val[0])
        self.loc, self.scale = raw["z"].mean(0), np.clip(raw["z"].std(0), 1e-12, None)
        self.val_scores = raw | {"z": (raw["z"] - self.loc) / self.scale}

    def _raw(self, images: np.ndarray) -> dict[str, np.ndarray]:
        f, _ = features_and_logits(self.model, self.meta, images)
        maha = self.det._mahalanobis(f)
        pen = torch.from_numpy(np.ascontiguousarray(f[:, : self.det.dim], np.float32))
        return {"z": self.det.layer_distances(f, maha),
                "rmd": self.rmd.predict_features(pen).double().numpy(),
                "gram": gram_scores(self.gram, self.meta, images)}  # fmt: skip

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raw = self._raw(images)
        return raw | {"z": (raw["z"] - self.loc) / self.scale}


def _lite_parts(model: torch.nn.Module) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """A timm EfficientNet as pytorch-ood's Gram takes it: the stem and each block group
    applied in turn, then the head."""
    from medxfer.errors import MedxferError

    m: Any = model
    if not all(hasattr(m, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        raise MedxferError(
            "this study splits the network for pytorch-ood's Gram as timm's EfficientNet is built",
            "pass runs of efficientnet_lite0 (the dataset configurations' model)",
        )
    layers = [torch.nn.Sequential(m.conv_stem, m.bn1), *m.blocks]
    return layers, torch.nn.Sequential(m.conv_head, m.bn2, m.global_pool, m.classifier)


class _Batches:
    """(preprocessed images, labels) batches, made as they are read (pytorch-ood's
    ``Gram.fit`` takes any iterable with a length)."""

    def __init__(self, meta: dict[str, Any], images: np.ndarray, labels: np.ndarray) -> None:
        self.meta, self.images, self.labels = meta, images, labels

    def __len__(self) -> int:
        return -(-len(self.images) // 64)

    def __iter__(self) -> Any:
        from medxfer.evaluate.predict import preprocess_arrays

        for s in range(0, len(self.images), 64):
            x = preprocess_arrays(self.meta, self.images[s : s + 64])
            yield x, torch.from_numpy(np.asarray(self.labels[s : s + 64], np.int64))


def gram_detector(
    model: torch.nn.Module, meta: dict[str, Any], images: np.ndarray, labels: np.ndarray
) -> Any:
    """pytorch-ood's Gram detector (Sastry & Oore 2020; poles 1 to the number of layers, its
    default), fitted on the same training images as the other detectors."""
    from pytorch_ood.detector import Gram

    layers, head = _lite_parts(model)
    torch.manual_seed(0)  # Gram holds out a random 10% of each class for its normalisation
    gram = Gram(head, layers, num_classes=len(meta["classes"]))
    gram.to("cpu")
    return gram.fit(_Batches(meta, images, labels))


def gram_scores(gram: Any, meta: dict[str, Any], images: np.ndarray) -> np.ndarray:
    from medxfer.evaluate.predict import preprocess_arrays

    out = [gram.predict(preprocess_arrays(meta, images[s : s + 64])).double().numpy()
           for s in range(0, len(images), 64)]  # fmt: skip
    return np.concatenate(out) if out else np.zeros(0)


OTHERS = ("rmd", "w=0.75 with rmd", "gram")  # detectors beside the depth weightings


def other_score(name: str, s: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
    """``rmd`` / ``gram`` alone, or ``layers`` at w=0.75 with the relative Mahalanobis distance
    (standardised on ``ref``, the run's validation scores) in the penultimate's place."""
    if name in ("rmd", "gram"):
        return s[name]
    r = ref["rmd"]
    z = s["z"].copy()
    z[:, -1] = (s["rmd"] - r.mean()) / max(float(r.std()), 1e-12)
    return z @ depth_weights(z.shape[1], 0.75)


class StandIn(Protocol):
    """What ``stand_ins`` needs of a fitted run (``Fitted`` here and in trust_posthoc.py)."""

    det: Detectors
    meta: dict[str, Any]
    val: tuple[np.ndarray, np.ndarray]
    seed: int

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


F = TypeVar("F", bound=StandIn)


def stand_ins(
    fit: Callable[[Path], F], run: Path, held: Path, cls: str
) -> tuple[F, dict[str, dict[str, np.ndarray]], F, dict[str, np.ndarray], int]:
    """RUN and RUN2 fitted by ``fit``; RUN's scores on the shifted copies of at most
    ``PROXY_IMAGES`` validation images (by proxy); RUN2's scores on RUN's validation images of
    ``cls``; how many images each proxy has."""
    base = fit(run)
    if base.det.layer_mean is None:
        raise SystemExit(f"{run}: its architecture names no stages, so there is no `layers`")
    classes = list(base.meta["classes"])
    if cls not in classes:
        raise SystemExit(f"{run} has no class {cls!r}; it has {classes}")
    few = base.val[0][_subsample(base.val[1], PROXY_IMAGES, base.seed)]
    shifted = {name: base.scores(x) for name, x in proxy_shifts(few, base.seed).items()}
    other = fit(held)
    if cls in other.meta["classes"]:
        raise SystemExit(f"{held} was trained with {cls!r}")
    new = other.scores(base.val[0][base.val[1] == classes.index(cls)])
    return base, shifted, other, new, len(few)


def measure(run: Path, held: Path, cls: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    base, shifted, other, new, n_proxy = stand_ins(Fitted, run, held, cls)
    bv, ov = base.val_scores, other.val_scores
    table: dict[str, Any] = {}
    candidates: dict[str, Any] = {
        n: (lambda s, ref, rule=rule: combine(s["z"], rule, ref["z"]))
        for n, rule in rules(bv["z"].shape[1]).items()
    } | {n: (lambda s, ref, n=n: other_score(n, s, ref)) for n in OTHERS}
    for name, score in candidates.items():
        ref = score(bv, bv)
        per = {p: ood_auroc_fpr95(ref, score(s, bv)) for p, s in shifted.items()}
        near = ood_auroc_fpr95(score(ov, ov), score(new, ov))
        shift_mean = float(np.mean([a for a, _ in per.values()]))
        table[name] = {
            "shift_proxy_auroc": {p: round(a, 4) for p, (a, _) in per.items()},
            "shift_proxy_mean_auroc": round(shift_mean, 4),
            "new_class_auroc": round(near[0], 4),
            "new_class_fpr95": round(near[1], 4),
            "worse_of_two": round(min(shift_mean, near[0]), 4),
        }
    return {
        "runs": {"base": str(run), "held_out": str(held)},
        "held_out_class": cls,
        "images": {"validation": len(base.val[1]), "per_proxy": n_proxy,
                   "held_out_validation": len(other.val[1]), "new_class": len(new["rmd"])},
        "depths": [*(f"stage {i}" for i in range(bv["z"].shape[1] - 1)), "penultimate"],
        "rules": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def choose(paths: list[Path]) -> dict[str, Any]:
    """The pre-stated rule (mean over datasets of each dataset's worse stand-in), and beside it
    the mean of the two stand-ins (docs/studies/trust.md says which one the default follows
    and why)."""
    per = {p.stem: json.loads(p.read_text())["rules"] for p in paths}
    names = list(next(iter(per.values())))

    def pick(of: Any) -> dict[str, Any]:
        score = {n: round(float(np.mean([of(per[d][n]) for d in per])), 4) for n in names}
        return {"score": score, "chosen": max(names, key=lambda n: (score[n], -names.index(n)))}

    return {
        "datasets": list(per),
        "stated_before": {"criterion": "mean over datasets of min(shift-proxy mean AUROC, "
                          "new-class AUROC)"} | pick(lambda r: r["worse_of_two"]),
        "mean_of_two": {"criterion": "mean over datasets of the mean of shift-proxy mean AUROC "
                        "and new-class AUROC"} | pick(
            lambda r: (r["shift_proxy_mean_auroc"] + r["new_class_auroc"]) / 2),
        "images": "validation only (no test image)",
    }  # fmt: skip


def stand_in_args(doc: str) -> argparse.Namespace:
    """The command line of a stand-in study: RUN --held-out-run RUN2 --held-out-class NAME, or
    --combine JSON ...; sets the thread count."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("run", type=abspath, nargs="?")
    p.add_argument("--held-out-run", type=abspath)
    p.add_argument("--held-out-class")
    p.add_argument("--name", help="result name (default: the run folder's name)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--combine", type=abspath, nargs="+", help="study JSONs: apply the rules")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.combine and not (args.run and args.held_out_run and args.held_out_class):
        p.error("give RUN, --held-out-run and --held-out-class (or --combine JSON ...)")
    return args


def main() -> None:
    args = stand_in_args(__doc__ or "")
    if args.combine:
        save("trust-depths/choice", choose(args.combine), STUDY_RESULTS)
        return
    out = measure(args.run, args.held_out_run, args.held_out_class)
    for name, row in out["rules"].items():
        print(f"{name:>8}: shift proxies {row['shift_proxy_mean_auroc']:.3f}  "
              f"new class {row['new_class_auroc']:.3f}")  # fmt: skip
    save(f"trust-depths/{args.name or args.run.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
