"""Find the labelled images of a dataset and assign every one to train, val or test.

Accepted layouts:

* ``root/<class>/<image>``: one sub-folder per class (val and test are carved out).
* ``root/{train,val,test}/<class>/<image>``: the dataset's own splits (``val`` optional).
* a CSV manifest with columns ``path,label[,split][,patient_id]`` (paths relative to the CSV).

The test split is sacred: it is never used for training or model selection. Validation is
carved from train, stratified by class, grouped by patient when patient IDs are known, and
seeded. Patient IDs come from the manifest's ``patient_id`` column or, for any layout, from the
file names through ``data.patient_regex`` (``with_patient_ids``): several images of one patient
must not sit on both sides of the train/val boundary, or validation scores are inflated.
"""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.data.io import IMAGE_SUFFIXES
from medxfer.errors import MedxferError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: str
    label: str
    split: str  # train | val | test | "" (not yet assigned)
    patient_id: str = ""
    synthetic: bool = False


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _from_class_folders(root: Path, split: str) -> list[Sample]:
    classes = _class_folders(root)
    if not classes:
        raise MedxferError(
            f"{root} has no class sub-folders",
            "arrange images as <root>/<class>/<image> or <root>/train/<class>/<image>, "
            "or pass a CSV manifest with columns path,label",
        )
    out: list[Sample] = []
    for cls in classes:
        files = _images_in(cls)
        if not files:
            raise MedxferError(
                f"class folder {cls} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                "add images to it or remove the empty folder",
            )
        out.extend(Sample(str(f), cls.name, split) for f in files)
    return out


def from_folder(root: Path) -> list[Sample]:
    if not root.exists():
        raise MedxferError(f"data path {root} does not exist", "check data.root / --data")
    if not root.is_dir():
        raise MedxferError(f"data path {root} is not a folder", "pass a folder or a .csv")
    top = {p.name.lower(): p for p in _class_folders(root)}
    if "train" in top:
        samples: list[Sample] = []
        for split in SPLITS:
            if split in top:
                samples.extend(_from_class_folders(top[split], split))
        return samples
    return _from_class_folders(root, "")


def from_manifest(csv_path: Path) -> list[Sample]:
    if not csv_path.exists():
        raise MedxferError(f"manifest {csv_path} does not exist", "check data.root / --data")
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise MedxferError(
            f"manifest {csv_path} needs the columns path,label[,split][,patient_id]",
            "add a header line: path,label,split,patient_id",
        )
    out: list[Sample] = []
    for i, row in enumerate(rows, start=2):
        split = (row.get("split") or "").strip().lower()
        split = {"training": "train", "validation": "val", "testing": "test"}.get(split, split)
        if split not in ("", *SPLITS):
            raise MedxferError(
                f"{csv_path}:{i}: unknown split {row['split']!r}", "use train, val or test"
            )
        p = Path(row["path"])
        p = p if p.is_absolute() else csv_path.parent / p
        out.append(Sample(str(p), row["label"].strip(), split, (row.get("patient_id") or "")))
    return out


def discover(root: str | Path) -> list[Sample]:
    """All samples below ``root`` (a folder or a CSV manifest), with their given splits."""
    path = Path(root).expanduser()
    samples = from_manifest(path) if path.suffix.lower() == ".csv" else from_folder(path)
    labels = {s.label for s in samples if s.split != "test"}
    if len(labels) < 2:
        raise MedxferError(
            f"{root} has {len(labels)} class(es) for training ({', '.join(sorted(labels))}); "
            "a classifier needs at least two",
            "add a folder per class (e.g. normal/ and pneumonia/)",
        )
    return samples


def with_patient_ids(samples: list[Sample], pattern: str) -> list[Sample]:
    """Samples with ``patient_id`` taken from their file names by the regular expression
    ``pattern`` (searched in the name, not the folder; its first group if it has one, else the
    whole match). IDs already given (a manifest's ``patient_id`` column) are kept. A training or
    validation file whose name does not match is an error: left ungrouped, it could leak."""
    if not pattern:
        return samples
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise MedxferError(
            f"data.patient_regex {pattern!r} is not a regular expression: {err}",
            r"e.g. data.patient_regex='^(person\d+|IM-\d+)'",
        ) from None
    out: list[Sample] = []
    missed: list[str] = []
    for s in samples:
        if s.patient_id:
            out.append(s)
            continue
        m = rx.search(Path(s.path).name)
        pid = (m.group(1) if rx.groups else m.group(0)) if m else None
        if not pid:  # no match, or an optional first group that took no part in it
            if s.split != "test":
                missed.append(s.path)
            out.append(s)
            continue
        out.append(replace(s, patient_id=pid))
    if missed:
        raise MedxferError(
            f"data.patient_regex {pattern!r} matches no patient ID in {len(missed)} training "
            f"file name(s), e.g. {Path(missed[0]).name}",
            "widen the expression so that every training image has a patient, give a CSV "
            "manifest with a patient_id column, or set data.patient_regex='' to carve "
            "validation by image (images of one patient may then land in both)",
        )
    return out


def patient_summary(samples: list[Sample]) -> dict[str, Any]:
    """Patients per split, images per patient, and the patients found in more than one split
    (pairs of splits, with up to 5 examples each) or under more than one label."""
    by_split: dict[str, set[str]] = defaultdict(set)
    labels: dict[str, set[str]] = defaultdict(set)
    images: Counter[str] = Counter()
    for s in samples:
        if s.patient_id:
            by_split[s.split or "unassigned"].add(s.patient_id)
            labels[s.patient_id].add(s.label)
            images[s.patient_id] += 1
    splits = [sp for sp in (*SPLITS, "unassigned") if sp in by_split]
    shared = {}
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            both = sorted(by_split[a] & by_split[b])
            shared[f"{a}-{b}"] = {"patients": len(both), "examples": both[:5]}
    per = sorted(images.values()) or [0]
    return {
        "with_id": sum(1 for s in samples if s.patient_id),
        "without_id": sum(1 for s in samples if not s.patient_id),
        "patients": {sp: len(by_split[sp]) for sp in splits},
        "images_per_patient": {"median": float(np.median(per)), "max": per[-1]},
        "multi_image_patients": sum(1 for v in images.values() if v > 1),
        "shared_across_splits": shared,
        "patients_with_several_labels": sum(1 for v in labels.values() if len(v) > 1),
    }


def _group_names(samples: list[Sample], extra: dict[str, str]) -> list[str]:
    """One group name per sample ("" = in no group). Without ``extra`` (path -> group name)
    the groups are the patients. With it, images that share a patient or an ``extra`` group,
    directly or through a chain of such links, share a group."""
    if not extra:
        return [s.patient_id for s in samples]
    parent = list(range(len(samples)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first: dict[str, int] = {}
    for i, s in enumerate(samples):
        for key in (f"patient:{s.patient_id}" if s.patient_id else "", extra.get(s.path, "")):
            if key:
                parent[find(i)] = find(first.setdefault(key, i))
    grouped = {find(first[key]) for key in first}
    return [
        f"group:{samples[find(i)].path}" if find(i) in grouped else "" for i in range(len(samples))
    ]


def _carve(
    samples: list[Sample],
    fraction: float,
    seed: int,
    new_split: str,
    groups: dict[str, str] | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Move a stratified ``fraction`` of ``samples`` to ``new_split``, keeping every patient
    (and every ``groups`` group: path -> name) on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    if fraction <= 0 or not samples:
        return samples, []
    labels = [s.label for s in samples]
    counts = Counter(labels)
    if min(counts.values()) < 2:
        rare = [k for k, v in counts.items() if v < 2]
        raise MedxferError(
            f"class(es) {rare} have fewer than 2 training images, too few to carve a {new_split} "
            "split",
            "add images to those classes or remove them",
        )
    idx = np.arange(len(samples))
    names = _group_names(samples, groups or {})
    if any(names):
        names = [g or f"__nogroup_{i}" for i, g in enumerate(names)]
        n_splits = max(2, round(1.0 / fraction))
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        keep_idx, take_idx = next(sgkf.split(idx, labels, names))
    else:
        keep_idx, take_idx = train_test_split(
            idx, test_size=fraction, stratify=labels, random_state=seed
        )
    keep = [samples[i] for i in sorted(keep_idx)]
    take = [replace(samples[i], split=new_split) for i in sorted(take_idx)]
    return keep, take


def assign_splits(
    samples: list[Sample],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: dict[str, str] | None = None,
) -> list[Sample]:
    """Give every sample a split. Given test/val splits are kept as they are. ``groups``
    (path -> group name, e.g. near duplicates) are kept whole, like patients."""
    test = [s for s in samples if s.split == "test"]
    val = [s for s in samples if s.split == "val"]
    pool = [replace(s, split="train") for s in samples if s.split in ("train", "")]
    if not test and test_fraction > 0:
        pool, test = _carve(pool, test_fraction, seed + 1, "test", groups)
    if not val and val_fraction > 0:
        pool, val = _carve(pool, val_fraction, seed, "val", groups)
    return pool + val + test


def class_names(samples: list[Sample]) -> list[str]:
    return sorted({s.label for s in samples if s.split != "test"})
