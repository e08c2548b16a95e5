"""Grad-CAM heatmaps (pytorch-grad-cam) over correct and wrong test images of each class.

The target layer is the last convolutional block of each backbone, where the feature maps
still have a spatial layout: the ``gradcam_layer`` each backbone is registered with
(``medxfer.models.registry.gradcam_target``).
The images are the test split exactly as evaluated (same cache, same order as
``test_predictions.npz``), so the picture shows what the reported numbers were computed on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medxfer.config import ExperimentConfig
from medxfer.errors import MedxferError


def pick_examples(
    labels: np.ndarray, probs: np.ndarray, per_class: int, seed: int = 0
) -> list[tuple[int, str]]:
    """Up to ``per_class`` correct and ``per_class`` wrong test indices for every true class."""
    rng = np.random.default_rng(seed)
    pred = probs.argmax(1)
    out: list[tuple[int, str]] = []
    for c in range(probs.shape[1]):
        for kind, sel in (("correct", pred == c), ("wrong", pred != c)):
            idx = np.flatnonzero((labels == c) & sel)
            take = rng.permutation(idx)[:per_class] if len(idx) else idx
            out += [(int(i), kind) for i in sorted(take)]
    return out


def _test_images(cfg: ExperimentConfig, labels: np.ndarray, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` of the test split (gathered from the cache alone, not the whole split)."""
    from medxfer.data.prepare import prepare

    data = prepare(cfg.data)
    idx = data.split_index["test"]
    if not np.array_equal(data.labels[idx].numpy(), labels):
        raise MedxferError(
            "the test split no longer matches the run's test_predictions.npz",
            "the dataset changed since training; train again before the report",
        )
    return data.images[idx[rows]]


def compute_gradcam(run_dir: Path, per_class: int, out_png: Path) -> dict[str, Any]:
    """Heatmaps of ``run_dir``'s best checkpoint; writes a grid PNG, returns what it shows."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from medxfer.config import load_config
    from medxfer.data.loader import Normalizer, to_float
    from medxfer.evaluate.predict import load_trained
    from medxfer.models.registry import Preprocess, gradcam_target

    cfg = load_config(run_dir / "config.yaml")
    preds = np.load(run_dir / "test_predictions.npz")
    labels, probs = preds["labels"], preds["probs"]
    model, meta = load_trained(run_dir)
    picks = pick_examples(labels, probs, per_class, cfg.train.seed)
    if not picks:
        raise MedxferError(f"{run_dir} has no test predictions to explain")
    images = _test_images(cfg, labels, [i for i, _ in picks])
    x01 = to_float(images)
    norm = Normalizer.from_preprocess(
        Preprocess(tuple(meta["mean"]), tuple(meta["std"]), "checkpoint"), torch.device("cpu")
    )
    x = norm(x01)
    pred = probs.argmax(1)
    targets = [ClassifierOutputTarget(int(pred[i])) for i, _ in picks]
    layer = gradcam_target(model, str(meta["arch"]))
    model.eval()
    with GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=targets)  # (N, H, W) in [0, 1]
    rgb = x01.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    classes = list(meta["classes"])
    tiles = [
        {
            "index": i,
            "kind": kind,
            "true": classes[int(labels[i])],
            "pred": classes[int(pred[i])],
            "p": float(probs[i].max()),
        }
        for i, kind in picks
    ]
    _grid(rgb, maps, tiles, classes, per_class, out_png)
    return {
        "png": str(out_png),
        "layer": _layer_name(model, layer),
        "arch": meta["arch"],
        "images": tiles,
        "per_class": per_class,
    }


def _layer_name(model: nn.Module, layer: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)


def _grid(
    rgb: np.ndarray,
    maps: np.ndarray,
    tiles: list[dict[str, Any]],
    classes: list[str],
    per_class: int,
    path: Path,
) -> None:
    """One row per true class: its correct examples, then its wrong ones (heatmap overlaid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pytorch_grad_cam.utils.image import show_cam_on_image

    cols = 2 * per_class
    fig, axes = plt.subplots(
        len(classes), cols, figsize=(1.9 * cols, 2.1 * len(classes)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    slots = {c: {"correct": 0, "wrong": 0} for c in classes}
    for k, t in enumerate(tiles):
        row = classes.index(t["true"])
        col = slots[t["true"]][t["kind"]] + (per_class if t["kind"] == "wrong" else 0)
        slots[t["true"]][t["kind"]] += 1
        ax = axes[row][col]
        ax.imshow(show_cam_on_image(rgb[k].astype(np.float32), maps[k], use_rgb=True))
        colour = "tab:green" if t["kind"] == "correct" else "tab:red"
        ax.set_title(f"{t['true']} → {t['pred']}\np={t['p']:.2f}", fontsize=7, color=colour)
    for row, c in enumerate(classes):
        for kind, start in (("correct", 0), ("wrong", per_class)):
            if slots[c][kind] == 0:
                axes[row][start].text(
                    0.5,
                    0.5,
                    f"no {kind}\n{c} image",
                    ha="center",
                    va="center",
                    fontsize=7,
                    transform=axes[row][start].transAxes,
                )
    fig.suptitle("Grad-CAM: left correct, right wrong (true → predicted)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
