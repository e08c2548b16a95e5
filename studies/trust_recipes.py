"""Which training gives better trust signals: one run against another recipe, or against a deep
ensemble of runs that differ only in their seed? Validation images only.

    python studies/trust_recipes.py --held-out-class NAME --name N
        --recipe LABEL RUN HELD_OUT_RUN [--recipe LABEL RUN HELD_OUT_RUN ...]
        [--ensemble LABEL LABEL ...] [--threads T]

Every RUN is trained on the same split of one dataset; its HELD_OUT_RUN is the same recipe
trained without class NAME (bench/trust.py --train-held-out makes one; its training and
validation images are RUN's without NAME), or ``-`` where there is none (the new class is then
not measured for that recipe, nor for an ensemble that holds it). Each run is scored as
``medxfer predict`` scores it (BatchNorm folded, its own trust statistics). For each recipe,
and for each ensemble of recipes, this measures:

- shift proxies: the validation images against shifted copies of 500 of them (the proxies
  the default detector is chosen on, ``medxfer.evaluate.trust_proxies``), mean AUROC;
- a new class: HELD_OUT_RUN's validation images against the *validation* images of NAME,
  which it never saw: AUROC;
- failures on validation: accuracy, and the AUGRC of each score used to reject;
- a supervised reference: how well RUN itself, which was trained WITH class NAME, tells NAME's
  validation images from the others by its probability of NAME (AUROC). A detector that never
  saw the class can hardly do better.

The scores: the maximum softmax probability (``msp``) and ``layers``, each run's standardised
by its own validation scores. An ensemble averages its runs' softmax probabilities and their
standardised ``layers`` scores, and adds the mutual information between the prediction and
the member (``mi``; the disagreement of Lakshminarayanan et al. 2017) and the mean of the
standardised ``layers`` and ``mi`` (``layers+mi``). Nothing here reads a test image. Writes
studies/results/trust-recipes/<name>.json.
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

from medxfer.evaluate.predict import folded_for_inference
from medxfer.evaluate.selective import augrc, ood_auroc_fpr95
from medxfer.evaluate.trust import PROXY_IMAGES, _subsample, load_trust, run_settings
from medxfer.evaluate.trust_proxies import proxy_shifts
from medxfer.evaluate.trust_run import run_split_arrays


class Member:
    """One run: its folded model and trust statistics, and its validation split."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        model, self.meta, arrays = run_split_arrays(folder, ("val",))
        self.model, _ = folded_for_inference(model.eval(), self.meta)
        self.trust = load_trust(folder)
        self.val = arrays["val"]
        self.seed = run_settings(self.meta)[0]
        raw = self.raw(self.val[0])
        self.loc, self.scale = float(raw["layers"].mean()), max(float(raw["layers"].std()), 1e-12)
        self.val_scores = self._standardised(raw)

    def raw(self, images: np.ndarray) -> dict[str, np.ndarray]:
        ts = self.trust.score(self.model, self.meta, images)
        if "layers" not in ts.scores:
            raise SystemExit(f"{self.folder}: its architecture names no stages, so no `layers`")
        return {"probs": ts.probs, "layers": ts.scores["layers"]}

    def _standardised(self, r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return r | {"layers_z": (r["layers"] - self.loc) / self.scale}

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self._standardised(self.raw(images))


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


def ensemble(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean probabilities, mean standardised ``layers`` score, and the mutual information."""
    probs = np.stack([p["probs"] for p in parts])  # members, N, C
    mean = probs.mean(0)
    mi = entropy(mean) - np.mean([entropy(p) for p in probs], axis=0)
    return {"probs": mean, "layers_z": np.mean([p["layers_z"] for p in parts], axis=0),
            "mi": mi}  # fmt: skip


def _z(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (x - ref.mean()) / max(float(ref.std()), 1e-12)


def unusual(s: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores, higher = more unusual; ``ref``: the same model's validation scores."""
    out = {"msp": -s["probs"].max(1), "layers": s["layers_z"]}
    if "mi" in s:
        out["mi"] = s["mi"]
        out["layers+mi"] = (_z(s["layers_z"], ref["layers_z"]) + _z(s["mi"], ref["mi"])) / 2
    return out


def measure(recipes: dict[str, tuple[Path, Path | None]], ensembles: list[list[str]],
            cls: str) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    base = {n: Member(r) for n, (r, _) in recipes.items()}
    other = {n: Member(h) for n, (_, h) in recipes.items() if h is not None}
    if not other:
        raise SystemExit("give at least one recipe a held-out run")
    b0, o0 = next(iter(base.values())), next(iter(other.values()))
    for group, first in ((base, b0), (other, o0)):
        if any(m.val[1].tolist() != first.val[1].tolist() for m in group.values()):
            raise SystemExit("the runs were not split alike: give runs of one dataset and split")
    if any(cls in m.meta["classes"] for m in other.values()):
        raise SystemExit(f"a held-out run was trained with {cls!r}")
    classes = list(b0.meta["classes"])
    if cls not in classes:
        raise SystemExit(f"--held-out-class {cls!r} is not a class of the runs: {classes}")
    if any(other[n].val[0].shape[1:] != base[n].val[0].shape[1:] for n in other):
        raise SystemExit("a held-out run reads images at another size than its base run")
    # the same images for every recipe, each at its own input size (recipes may differ in it):
    # the same validation subset shifted alike, and the held-out class from its base run
    few_idx = _subsample(b0.val[1], PROXY_IMAGES, b0.seed)
    labels, k = b0.val[1], classes.index(cls)
    proxies = {n: proxy_shifts(m.val[0][few_idx], b0.seed) for n, m in base.items()}
    proxy_names = list(next(iter(proxies.values())))
    images = ["val", *proxy_names]
    scored = {n: {"val": m.val_scores} | {c: m.scores(x) for c, x in proxies[n].items()}
              for n, m in base.items()}  # fmt: skip
    held = {n: {"val": m.val_scores, "new": m.scores(base[n].val[0][labels == k])}
            for n, m in other.items()}  # fmt: skip

    def evaluate(names: list[str]) -> dict[str, Any]:
        pick = (lambda parts: parts[0]) if len(names) == 1 else ensemble
        s = {c: pick([scored[n][c] for n in names]) for c in images}
        with_held = all(n in held for n in names)
        h = {c: pick([held[n][c] for n in names]) for c in ("val", "new")} if with_held else {}
        val, shifted = s["val"], [s[c] for c in images if c != "val"]
        ref = unusual(val, val)
        oref = unusual(h["val"], h["val"]) if h else {}
        correct = val["probs"].argmax(1) == labels
        row: dict[str, Any] = {
            "accuracy": round(float(correct.mean()), 4),
            # what a model that was trained WITH the class reaches on the same question
            "supervised_reference_auroc": round(
                ood_auroc_fpr95(val["probs"][labels != k, k], val["probs"][labels == k, k])[0], 4
            ),
        }
        for name in ref:
            per = [ood_auroc_fpr95(ref[name], unusual(x, val)[name])[0] for x in shifted]
            near = (ood_auroc_fpr95(oref[name], unusual(h["new"], h["val"])[name])[0]
                    if h else None)  # fmt: skip
            row[name] = {
                "shift_proxy_mean_auroc": round(float(np.mean(per)), 4),
                "shift_proxy_auroc": dict(zip(proxy_names, (round(a, 4) for a in per),
                                              strict=True)),
                "new_class_auroc": None if near is None else round(near, 4),
                "failure_augrc": round(augrc(correct, -ref[name]), 5),
            }  # fmt: skip
        return row

    table = {n: evaluate([n]) for n in recipes}
    table |= {" + ".join(g): evaluate(g) for g in ensembles}
    return {
        "recipes": {
            n: {"run": str(r), "held_out_run": h and str(h)} for n, (r, h) in recipes.items()
        },
        "held_out_class": cls,
        "images": {"validation": len(labels), "per_proxy": len(few_idx),
                   "held_out_validation": len(o0.val[1]), "new_class": int((labels == k).sum())},
        "table": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", nargs=3, action="append", required=True,
                   metavar=("NAME", "RUN", "HELD_OUT_RUN"))  # fmt: skip
    p.add_argument("--ensemble", nargs="+", action="append", default=[], metavar="NAME",
                   help="recipes whose runs are averaged (two or more)")  # fmt: skip
    p.add_argument("--held-out-class", required=True)
    p.add_argument("--name", required=True, help="result name")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    recipes = {n: (abspath(r), None if h == "-" else abspath(h)) for n, r, h in args.recipe}
    if len(recipes) != len(args.recipe):
        p.error("give each --recipe a different NAME")
    for g in args.ensemble:
        if len(g) < 2 or any(n not in recipes for n in g):
            p.error(f"--ensemble {' '.join(g)}: name two or more recipes given by --recipe")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = measure(recipes, args.ensemble, args.held_out_class)
    for who, row in out["table"].items():
        cells = "  ".join(
            f"{n}: shift {r['shift_proxy_mean_auroc']:.3f} new {r['new_class_auroc'] or '-'} "
            f"augrc {r['failure_augrc']:.4f}"
            for n, r in row.items()
            if isinstance(r, dict)
        )
        print(
            f"{who}: acc {row['accuracy']:.3f} "
            f"supervised {row['supervised_reference_auroc']:.3f}\n    {cells}"
        )
    save(f"trust-recipes/{args.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
