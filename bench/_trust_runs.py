"""bench/trust.py's runs: a trained run with its test split and trust model, and the scorer
that keeps each scored case in the work folder."""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _trust_tables import Scored
from rich.progress import Progress

from medxfer.config import load_config
from medxfer.data.cache import load_images
from medxfer.data.io import resize
from medxfer.data.prepare import prepare
from medxfer.data.sources import Sample, assign_splits, discover, with_patient_ids
from medxfer.errors import MedxferError
from medxfer.evaluate.predict import folded_for_inference, load_trained, model_file
from medxfer.evaluate.trust import TRUST_JSON, TrustModel, fit_trust, load_trust

CHUNK = 128  # images per scoring call: progress, and memory of the feature maps


@dataclass
class Run:
    folder: Path
    model: torch.nn.Module
    meta: dict[str, Any]
    trust: TrustModel
    samples: list[Sample]  # its test split
    labels: np.ndarray  # index into meta["classes"]
    images: np.ndarray  # uint8 at the model's size
    data: dict[str, Any]  # prepare's info: root, synthetic

    @property
    def key(self) -> str:
        """Changes whenever the model or its trust statistics change."""
        files = [model_file(self.folder), self.folder / TRUST_JSON]
        stamp = [f"{f}:{f.stat().st_mtime_ns}" for f in files if f.exists()]
        return hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]

    def load(self, paths: list[str], size: int = 0) -> np.ndarray:
        return decode(paths, self.meta, size)


def decode(paths: list[str], meta: dict[str, Any], size: int = 0) -> np.ndarray:
    """Files decoded as the model's data were (colour, resize rule; the shared decode cache),
    at the model's size or ``size``."""
    size = size or int(meta["image_size"])
    arrays, errors = load_images(paths, size, str(meta["color"]), str(meta["resize"]))
    if errors:
        first = next(iter(errors.items()))
        raise MedxferError(f"{len(errors)} image(s) cannot be read, e.g. {first}")
    return arrays


def load_run(folder: Path, *, trust: str, fit: dict[str, Any]) -> Run:
    """A trained run with its test split; ``trust``: "load" (fit when absent) or "refit"."""
    if not (folder / "config.yaml").is_file():
        raise MedxferError(f"{folder} is not a trained run", "pass a folder of `medxfer train`")
    cfg = load_config(folder / "config.yaml")
    model, meta = load_trained(folder)
    # scored as `medxfer predict` scores: BatchNorm folded into the convolutions (outputs equal
    # within 1e-4, checked by the fold; 1.6x faster at batch 32 on 2 CPU cores,
    # bench/results/inference-fold-brain-tumor-mri-160px.json)
    model, _ = folded_for_inference(model, meta)
    if trust == "refit" or not (folder / TRUST_JSON).is_file():
        print(f"fitting trust statistics of {folder} (training and validation images)")
        tm = fit_trust(folder, **fit)
    else:
        tm = load_trust(folder)
    data = prepare(cfg.data)
    if list(data.classes) != list(meta["classes"]):
        raise MedxferError(f"{folder}: data classes {data.classes} are not the model's")
    idx = data.split_index["test"].numpy()
    samples = [data.samples[i] for i in idx]
    images, labels = data.images[idx].numpy(), data.labels[idx].numpy()
    return Run(folder, model, meta, tm, samples, labels, images, data.info)


def test_split(root: Path) -> list[Sample]:
    """A dataset's test images (its own split, else the one medxfer's defaults carve)."""
    samples = assign_splits(with_patient_ids(discover(root), ""), 0.0, 0.15, 0)
    return [s for s in samples if s.split == "test"]


def pick(n: int, limit: int, seed: int) -> np.ndarray:
    """``limit`` indices of ``n`` drawn without replacement (all when 0 or more than n)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


class Scorer:
    """Scores a case with a run's trust model, or reads it back from the work folder."""

    def __init__(self, work: Path, progress: Progress, settings: str) -> None:
        self.work, self.progress, self.settings = work, progress, settings
        self.seconds: dict[str, float] = {}

    def __call__(self, run: Run, tag: str, case: str, make: Callable[[], np.ndarray]) -> Scored:
        path = self.work / "cases" / tag / f"{case}.npz"
        key = f"{run.key}|{self.settings}|{case}"
        cached = Scored.load(path, key)
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        arrays = make()
        task = self.progress.add_task(f"{tag}: {case}", total=len(arrays))
        parts = []
        for start in range(0, len(arrays), CHUNK):
            parts.append(
                Scored.of(run.trust.score(run.model, run.meta, arrays[start : start + CHUNK]))
            )
            self.progress.advance(task, len(parts[-1].pred))
        self.progress.remove_task(task)
        scored = Scored.concat(parts)
        scored.save(path, key)
        self.seconds[f"{tag}/{case}"] = round(time.perf_counter() - t0, 1)
        return scored


def at_size(arrays: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    size, mode = int(meta["image_size"]), str(meta["resize"])
    return np.stack([resize(a, size, mode) for a in arrays]) if len(arrays) else arrays


def fit_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "acceptance": args.acceptance,
        "coverage": args.coverage,
        "class_conditional": args.class_conditional,
        "detector": args.detector,
        "conformal_score": args.conformal_score,
    }


def trust_record(r: Run) -> dict[str, Any]:
    """What the run's trust.json says was chosen on validation (not the fit details)."""
    keys = (
        "ood_detector",
        "acceptance",
        "coverage",
        "class_conditional",
        "conformal_score",
        "ood_threshold",
        "review_threshold",
        "layers_weights",
        "validation",
    )
    return {k: r.trust.record.get(k) for k in keys}
