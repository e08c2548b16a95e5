"""From ``DataConfig`` to tensors: discover, split, (drop leaks), decode once, index by split.

The pixels stay in the decode cache's memory map (``ImageStore``): samples and splits are index
arrays into it, so preparing a dataset copies no image and costs memory for the labels only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medxfer.config import DataConfig, parse_class_fraction
from medxfer.data.cache import load_images
from medxfer.data.generated import read_generated, select_generated
from medxfer.data.sources import (
    Sample,
    assign_splits,
    class_names,
    discover,
    patient_summary,
    with_patient_ids,
)
from medxfer.data.store import ImageStore
from medxfer.errors import MedxferError


@dataclass
class Prepared:
    samples: list[Sample]
    classes: list[str]
    images: ImageStore  # uint8 (N, H, W) or (N, H, W, 3), all splits; [idx] gathers a tensor
    labels: torch.Tensor  # int64 (N,)
    split_index: dict[str, torch.Tensor]  # split -> indices into images
    info: dict[str, Any] = field(default_factory=dict)
    # every image the dataset lists (after the consistency rules), with its given split: what
    # the run's fingerprint compares when a run is resumed or reused
    listing: list[Sample] = field(default_factory=list)

    def counts(self, split: str) -> dict[str, int]:
        c = Counter(self.labels[self.split_index[split]].tolist())
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def resolve_root(cfg: DataConfig) -> tuple[Path, bool]:
    """The dataset location, and whether it is the embedded synthetic set."""
    if cfg.root:
        return Path(cfg.root).expanduser(), False
    from medxfer.data.synthetic import ensure_synthetic

    return ensure_synthetic(), True


def list_samples(cfg: DataConfig) -> tuple[list[Sample], Path, bool, list[str]]:
    """The dataset's images with their given splits and patient IDs, checked by
    ``medxfer.data.consistency`` (no image is decoded): samples, root, whether it is the
    embedded synthetic set, and the images ``data.drop_conflicts`` left out."""
    from medxfer.data.consistency import check_samples

    root, synthetic = resolve_root(cfg)
    samples = with_patient_ids(discover(root), cfg.patient_regex)
    samples, dropped = check_samples(
        samples, root, drop_conflicts=cfg.drop_conflicts, allow_outside_root=cfg.allow_outside_root
    )
    return samples, root, synthetic, dropped


def _drop_leaks(samples: list[Sample], cfg: DataConfig) -> tuple[list[Sample], list[str]]:
    from medxfer.data.audit import audit, leaking_train_paths

    report = audit(
        [s for s in samples if s.split in ("train", "test", "")], near_threshold=cfg.leak_threshold
    )
    leaks = leaking_train_paths(report)
    return [s for s in samples if s.path not in leaks], sorted(leaks)


def _near_duplicate_groups(samples: list[Sample], cfg: DataConfig, workers: int) -> dict[str, str]:
    """Near-duplicate groups among the images validation (and a carved test) come from."""
    from medxfer.data.audit import near_duplicate_groups

    pool = [s.path for s in samples if s.split in ("train", "")]
    return near_duplicate_groups(pool, cfg.leak_threshold, workers=workers)


def _subset(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """A stratified ``fraction`` of the training split (for quick searches)."""
    if fraction >= 1.0:
        return samples
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    by_label: dict[str, list[Sample]] = {}
    for s in samples:
        if s.split == "train":
            by_label.setdefault(s.label, []).append(s)
    for group in by_label.values():
        n = max(2, round(len(group) * fraction))
        keep.update(group[i].path for i in rng.permutation(len(group))[:n])
    return [s for s in samples if s.split != "train" or s.path in keep]


def _cut_classes(samples: list[Sample], spec: str, seed: int) -> list[Sample]:
    """Keep ``fraction`` of the named classes' training images (``data.class_fraction``)."""
    fractions = parse_class_fraction(spec)
    train_labels = {s.label for s in samples if s.split == "train"}
    missing = sorted(set(fractions) - train_labels)
    if missing:
        raise MedxferError(
            f"data.class_fraction names class(es) {missing} that have no training images",
            f"the training classes are {sorted(train_labels)}",
        )
    rng = np.random.default_rng(seed + 2)
    drop: set[str] = set()
    for label, fraction in fractions.items():
        group = [s.path for s in samples if s.split == "train" and s.label == label]
        n_keep = max(2, round(len(group) * fraction))
        drop.update(group[i] for i in rng.permutation(len(group))[n_keep:])
    return [s for s in samples if s.path not in drop]


def _add_generated(prepared: Prepared, cfg: DataConfig, workers: int) -> Prepared:
    """Append the images of ``cfg.synthetic`` to the training split (never to val or test)."""
    generated, source = read_generated(cfg.synthetic)
    real_counts = prepared.counts("train")
    generated = select_generated(generated, real_counts, cfg.synthetic_ratio)
    paths = [s.path for s in generated]
    images_np, errors = load_images(
        paths, cfg.image_size, cfg.color, cfg.resize, cfg.cache_dir, workers,
        source=str(cfg.synthetic),
    )  # fmt: skip
    if errors:
        first = next(iter(errors.items()))
        raise MedxferError(
            f"{len(errors)} synthetic image(s) cannot be read, e.g. {first[0]}: {first[1]}",
            "sample again with `medxfer gan sample`",
        )
    lookup = {c: i for i, c in enumerate(prepared.classes)}
    start = len(prepared.samples)
    new_idx = torch.arange(start, start + len(generated), dtype=torch.long)
    prepared.samples = prepared.samples + generated
    prepared.images = prepared.images.extend(images_np)
    prepared.labels = torch.cat(
        [prepared.labels, torch.tensor([lookup[s.label] for s in generated], dtype=torch.long)]
    )
    prepared.split_index["train"] = torch.cat([prepared.split_index["train"], new_idx])
    per_class = {c: 0 for c in prepared.classes}
    for s in generated:
        per_class[s.label] += 1
    prepared.info["synthetic_images"] = source | {
        "ratio": cfg.synthetic_ratio, "per_class": per_class, "total": len(generated),
        "real_train_counts": real_counts,
    }  # fmt: skip
    return prepared


def prepare(cfg: DataConfig, *, workers: int = 2) -> Prepared:
    samples, root, synthetic, conflicting = list_samples(cfg)
    listing = samples
    synthetic = synthetic or (root / "SYNTHETIC").exists()
    # Decode in discovery order: the cache key then depends on the files and the size only, not
    # on split fractions, seeds or leak filtering, so every run on this dataset shares one cache.
    all_paths = [s.path for s in samples]
    images_np, errors = load_images(
        all_paths, cfg.image_size, cfg.color, cfg.resize, cfg.cache_dir, workers,
        source=str(root),
    )  # fmt: skip
    if errors:
        if not cfg.skip_unreadable:
            first = next(iter(errors.items()))
            raise MedxferError(
                f"{len(errors)} image(s) cannot be read, e.g. {first[0]}: {first[1]}",
                "remove them (`medxfer data audit` lists all) or set data.skip_unreadable=true",
            )
        samples = [s for s in samples if s.path not in errors]
    info: dict[str, Any] = {"root": str(root), "synthetic": synthetic}
    info["root_absolute"] = str(root.resolve())  # `evaluate` from another working directory
    if conflicting:
        info["dropped_conflicts"] = conflicting
    if errors:
        info["skipped_unreadable"] = sorted(errors)
    if cfg.drop_leaks:
        if not any(s.split == "test" for s in samples):
            raise MedxferError(
                "data.drop_leaks needs a test split given by the dataset",
                "add a test/ folder or a split column, or set data.drop_leaks=false",
            )
        samples, dropped = _drop_leaks(samples, cfg)
        info["dropped_leaks"] = dropped
    given = {s.split for s in samples}
    carves = ("val" not in given and cfg.val_fraction > 0) or (
        "test" not in given and cfg.test_fraction > 0
    )  # a split the dataset gives is kept as it is: nothing to group
    grouping = cfg.group_near_duplicates and carves
    groups = _near_duplicate_groups(samples, cfg, workers) if grouping else {}
    if grouping:
        sizes = Counter(groups.values())
        info["near_duplicate_groups"] = {
            "images": len(groups),
            "groups": len(sizes),
            "largest": max(sizes.values(), default=0),
            "threshold": cfg.leak_threshold,
        }
    samples = assign_splits(samples, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, groups)
    if any(s.patient_id for s in samples):
        info["patients"] = patient_summary(samples)
    samples = _subset(samples, cfg.train_subset, cfg.split_seed)
    if cfg.class_fraction:
        samples = _cut_classes(samples, cfg.class_fraction, cfg.split_seed)
        info["class_fraction"] = parse_class_fraction(cfg.class_fraction)
    if synthetic:
        samples = [replace(s, synthetic=True) for s in samples]
    classes = class_names(samples)
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise MedxferError(
            f"test labels {unknown} never occur in training",
            "every test class needs training images; fix the labels or remove those images",
        )
    position = {p: i for i, p in enumerate(all_paths)}
    rows = np.array([position[s.path] for s in samples], dtype=np.int64)
    images = ImageStore([images_np], rows)  # no pixel is copied
    lookup = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([lookup[s.label] for s in samples], dtype=torch.long)
    split_index = {
        sp: torch.tensor([i for i, s in enumerate(samples) if s.split == sp], dtype=torch.long)
        for sp in ("train", "val", "test")
    }
    prepared = Prepared(samples, classes, images, labels, split_index, info, listing)
    if cfg.synthetic:
        prepared = _add_generated(prepared, cfg, workers)
    info["counts"] = {sp: prepared.counts(sp) for sp in split_index}
    return prepared
