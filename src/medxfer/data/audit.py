"""Audit a dataset before training: counts, image formats, unreadable files and leakage.

Exact duplicates are files whose decoded pixels hash the same (sha256), reported within each
split and across splits. Near duplicates are looked for ACROSS splits only (train-test,
train-val, val-test): every image becomes a small grayscale thumbnail (padded to a square),
mean-centred and L2-normalised, so the dot product of two thumbnails is their correlation,
which ignores brightness and contrast changes. Each query is compared with the other split as
is, flipped left-right, flipped up-down and rotated 180 degrees, with chunked matrix products.
Pairs that are exact duplicates are reported only as exact. Within the training split, near
copies are only counted (up to WITHIN_TRAIN_MAX images): a validation split carved from it at
random would hold copies of training images (``data.group_near_duplicates`` prevents that).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from medxfer.data.io import is_dicom, pad_to_square, read_dicom, read_pil
from medxfer.data.shortcuts import cues, shortcut_check
from medxfer.data.sources import SPLITS, Sample, patient_summary
from medxfer.errors import MedxferError
from medxfer.parallel import process_map

TRANSFORMS = ("identity", "hflip", "vflip", "rot180")
SPLIT_PAIRS = (("train", "test"), ("train", "val"), ("val", "test"))
SERIAL_BELOW = 200  # fewer images than this are decoded without a process pool
POOL_FROM = 2000  # has_near_copy: below this a process pool costs more than it saves
PROGRESS_FROM = 500
WITHIN_TRAIN_MAX = 40_000  # more training images: near copies within train are not looked for
_MAX_SIMILARITIES = 1 << 24  # floats held at once while comparing two splits (64 MiB)
_COLUMNS = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())

# mode, width, height, sha256 of pixels, thumbnail (k*k float32), error ("" when readable),
# the shortcut check's cues (empty unless asked for)
Decoded = tuple[str, int, int, str, np.ndarray, str, np.ndarray]
_NO_CUES = np.zeros(0, np.float32)


def _thumbnail(arr: np.ndarray, size: int) -> np.ndarray:
    """Padded, box-averaged ``size x size`` gray thumbnail, mean-centred, unit L2 norm."""
    im = Image.fromarray(pad_to_square(arr))
    if im.mode != "L":
        im = im.convert("L")
    t = np.asarray(im.resize((size, size), Image.Resampling.BOX), dtype=np.float32).ravel()
    t = t - t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm > 1e-6 else np.zeros_like(t)  # a flat image matches nothing


def inspect_file(path: str, thumb: int = 32, with_cues: bool = False) -> Decoded:
    """Decode one file; never raises (the error text is returned instead)."""
    p = Path(path)
    try:
        if is_dicom(p):
            mode, arr = "DICOM", read_dicom(p)
        else:
            with Image.open(p) as im:
                mode = im.mode
            arr = read_pil(p)
    except Exception as err:  # an audit lists broken files, whatever the decoder raised
        empty = np.zeros(thumb * thumb, np.float32)
        return ("", 0, 0, "", empty, f"{type(err).__name__}: {err}", _NO_CUES)
    if arr.ndim == 3 and (arr == arr[..., :1]).all():
        arr = arr[..., 0]  # RGB with R == G == B hashes like its grayscale copy
    arr = np.ascontiguousarray(arr)
    sha = hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
    vector = cues(arr, path) if with_cues else _NO_CUES
    return (mode, int(arr.shape[1]), int(arr.shape[0]), sha, _thumbnail(arr, thumb), "", vector)


def _decode_all(
    paths: list[str], thumb: int, workers: int, show: bool, with_cues: bool = False
) -> list[Decoded]:
    fn = partial(inspect_file, thumb=thumb, with_cues=with_cues)
    out: list[Decoded] = []
    with ExitStack() as stack:
        if workers <= 1 or len(paths) < SERIAL_BELOW:
            results: Iterable[Decoded] = map(fn, paths)
        else:
            results = process_map(fn, paths, workers, preload=(__name__,), what="audit")
        progress = stack.enter_context(Progress(*_COLUMNS, transient=True, disable=not show))
        task = progress.add_task("auditing images", total=len(paths))
        for r in results:
            out.append(r)
            progress.advance(task)
    return out


def _variants(q: np.ndarray, k: int) -> Iterator[np.ndarray]:
    """``q`` (n, k*k) under each of TRANSFORMS, in order."""
    sq = q.reshape(-1, k, k)
    for t in (sq, sq[:, :, ::-1], sq[:, ::-1, :], sq[:, ::-1, ::-1]):
        yield np.ascontiguousarray(t).reshape(len(q), k * k)


def near_pairs(
    a: np.ndarray, b: np.ndarray, k: int, threshold: float
) -> list[tuple[int, int, int, float]]:
    """``(i, j, transform index, corr)`` for every row pair with best correlation >= threshold."""
    out: list[tuple[int, int, int, float]] = []
    if len(a) == 0 or len(b) == 0:
        return out
    bt = np.ascontiguousarray(b.T, dtype=np.float32)
    rows = max(1, _MAX_SIMILARITIES // (len(TRANSFORMS) * len(b)))
    for start in range(0, len(a), rows):
        query = a[start : start + rows].astype(np.float32, copy=False)
        sims = np.empty((len(TRANSFORMS), len(query), len(b)), dtype=np.float32)
        for t, v in enumerate(_variants(query, k)):
            np.matmul(v, bt, out=sims[t])
        best, which = sims.max(axis=0), sims.argmax(axis=0)
        for i, j in zip(*np.nonzero(best >= threshold), strict=True):
            out.append((start + int(i), int(j), int(which[i, j]), float(best[i, j])))
    return out


def _near_components(thumbs: np.ndarray, k: int, threshold: float) -> list[list[int]]:
    """Groups (row indices, two or more) of near duplicates among ``thumbs``: the connected
    components of the pairs that correlate at ``threshold`` or more (as is, flipped or rotated
    180 degrees), so a chain of slightly different copies forms one group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.array(
        [(i, j) for i, j, _, _ in near_pairs(thumbs, thumbs, k, threshold) if i != j], np.int64
    ).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), (len(thumbs),) * 2)
    component = connected_components(graph, directed=False)[1]
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(component):
        members[int(c)].append(i)
    return [g for g in members.values() if len(g) > 1]


def near_duplicate_groups(
    paths: list[str], threshold: float, *, workers: int = 2, show: bool = True
) -> dict[str, str]:
    """Path -> group name for every image that has a near duplicate among ``paths`` (groups as
    in ``_near_components``). Images without one, and unreadable files, are left out."""
    decoded = _decode_all(paths, 32, workers, show)
    ok = [i for i, d in enumerate(decoded) if not d[5]]
    if len(ok) < 2:
        return {}
    thumbs = np.stack([decoded[i][4] for i in ok])
    out: dict[str, str] = {}
    for group in _near_components(thumbs, 32, threshold):
        name = f"near-duplicates:{paths[ok[min(group)]]}"
        out.update({paths[ok[i]]: name for i in group})
    return out


def has_near_copy(
    queries: list[str], references: list[str], threshold: float, *, workers: int = 2
) -> np.ndarray:
    """For each file of ``queries``: whether a file of ``references`` is a near copy of it (the
    audit's rule: 32 px thumbnails correlating at ``threshold`` or more, as they are, flipped or
    rotated 180 degrees). An unreadable file has no copy."""
    paths = [*queries, *references]
    decoded = _decode_all(paths, 32, workers if len(paths) >= POOL_FROM else 1, show=False)
    ok = np.array([not d[5] for d in decoded], dtype=bool)
    thumbs = np.stack([d[4] for d in decoded]) if decoded else np.zeros((0, 32 * 32))
    q = np.flatnonzero(ok[: len(queries)])
    r = len(queries) + np.flatnonzero(ok[len(queries) :])
    out = np.zeros(len(queries), dtype=bool)
    for i, _, _, _ in near_pairs(thumbs[q], thumbs[r], 32, threshold):
        out[q[i]] = True
    return out


def _near_within_train(
    samples: list[Sample], decoded: list[Decoded], k: int, threshold: float
) -> dict[str, Any]:
    """How many training images have a near copy in training (None above WITHIN_TRAIN_MAX)."""
    idx = [i for i, s in enumerate(samples) if s.split in ("train", "") and not decoded[i][5]]
    if len(idx) > WITHIN_TRAIN_MAX:
        return {"images": None, "groups": None, "checked": False}
    thumbs = np.stack([decoded[i][4] for i in idx]) if idx else np.zeros((0, k * k))
    groups = _near_components(thumbs, k, threshold)
    return {"images": sum(map(len, groups)), "groups": len(groups), "checked": True}


def shortcut_report(samples: list[Sample], *, workers: int = 2) -> dict[str, Any]:
    """The audit's shortcut check alone (``medxfer.data.shortcuts``), for ``samples``."""
    return _shortcuts(samples, _decode_all([s.path for s in samples], 32, workers, False, True))


def _shortcuts(samples: list[Sample], decoded: list[Decoded]) -> dict[str, Any]:
    ok = [i for i, d in enumerate(decoded) if not d[5]]
    vectors = np.stack([decoded[i][6] for i in ok]) if ok else np.zeros((0, 1), np.float32)
    patients = [samples[i].patient_id for i in ok] if any(s.patient_id for s in samples) else None
    return shortcut_check([samples[i].label for i in ok], [samples[i].split for i in ok],
                          vectors, patients)  # fmt: skip


def _file(s: Sample) -> dict[str, str]:
    return {"path": s.path, "split": s.split or "unassigned", "label": s.label}


def _exact_groups(samples: list[Sample], decoded: list[Decoded]) -> dict[str, Any]:
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(decoded):
        if not d[5]:
            by_sha[d[3]].append(i)
    within: dict[str, list[dict[str, Any]]] = defaultdict(list)
    across: list[dict[str, Any]] = []
    for sha, idx in by_sha.items():
        if len(idx) < 2:
            continue
        files = [_file(samples[i]) for i in idx]
        splits = sorted({f["split"] for f in files})
        labels = sorted({f["label"] for f in files})
        group: dict[str, Any] = {"sha256": sha, "files": files, "splits": splits}
        group.update(labels=labels, label_conflict=len(labels) > 1)
        if len(splits) > 1:
            across.append(group)
        else:
            within[splits[0]].append(group)
    return {"within_split": dict(within), "across_splits": across}


def _near_duplicates(
    samples: list[Sample], decoded: list[Decoded], k: int, threshold: float
) -> list[dict[str, Any]]:
    idx_by_split: dict[str, list[int]] = defaultdict(list)
    for i, (s, d) in enumerate(zip(samples, decoded, strict=True)):
        if not d[5]:
            idx_by_split[s.split].append(i)
    out: list[dict[str, Any]] = []
    for sa, sb in SPLIT_PAIRS:
        ia, ib = idx_by_split.get(sa, []), idx_by_split.get(sb, [])
        thumbs_a = np.stack([decoded[i][4] for i in ia]) if ia else np.zeros((0, k * k))
        thumbs_b = np.stack([decoded[i][4] for i in ib]) if ib else np.zeros((0, k * k))
        for i, j, t, corr in near_pairs(thumbs_a, thumbs_b, k, threshold):
            a, b = samples[ia[i]], samples[ib[j]]
            if decoded[ia[i]][3] == decoded[ib[j]][3]:
                continue  # identical pixels: already an exact duplicate
            out.append(
                {
                    "split_pair": f"{sa}-{sb}",
                    **{f"a_{key}": v for key, v in _file(a).items()},
                    **{f"b_{key}": v for key, v in _file(b).items()},
                    "transform": TRANSFORMS[t],
                    "corr": round(min(corr, 1.0), 5),
                    "label_conflict": a.label != b.label,
                }
            )
    return out


def _image_stats(decoded: list[Decoded]) -> dict[str, Any]:
    ok = [d for d in decoded if not d[5]]
    if not ok:
        return {"modes": {}, "width": None, "height": None, "common_sizes": []}
    widths, heights = np.array([d[1] for d in ok]), np.array([d[2] for d in ok])

    def stats(v: np.ndarray) -> dict[str, float]:
        return {"min": int(v.min()), "max": int(v.max()), "median": float(np.median(v))}

    sizes = dict(Counter(f"{d[1]}x{d[2]}" for d in ok).most_common(5))
    modes = dict(Counter(d[0] for d in ok).most_common())
    return {"modes": modes, "width": stats(widths), "height": stats(heights), "common_sizes": sizes}


def _counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for s in samples:
        out[s.split or "unassigned"][s.label] += 1
    order = [*SPLITS, "unassigned"]
    return {k: dict(sorted(out[k].items())) for k in order if k in out}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    exact, near = report["exact_duplicates"], report["near_duplicates"]
    within = {
        split: {"groups": len(g), "extra_copies": sum(len(x["files"]) - 1 for x in g)}
        for split, g in exact["within_split"].items()
    }
    groups = [g for gs in exact["within_split"].values() for g in gs] + exact["across_splits"]
    return {
        "images": report["n_samples"],
        "unreadable": len(report["unreadable"]),
        "exact_within_split": within,
        "exact_across_split_groups": len(exact["across_splits"]),
        "exact_label_conflicts": sum(g["label_conflict"] for g in groups),
        "near_pairs": dict(Counter(p["split_pair"] for p in near)),
        "near_by_transform": dict(Counter(p["transform"] for p in near)),
        "near_label_conflicts": sum(p["label_conflict"] for p in near),
        "leaking_train_files": len(leaking_train_paths(report)),
        "train_images_with_near_copy": report["near_within_train"]["images"],
        "label_from_image_statistics": report["shortcuts"].get("balanced_accuracy"),
    } | _patient_findings(report)


def _patient_findings(report: dict[str, Any]) -> dict[str, Any]:
    if "patients" not in report:
        return {}
    p = report["patients"]
    shared = {pair: v["patients"] for pair, v in p["shared_across_splits"].items()}
    return {"patients": sum(p["patients"].values()), "patients_across_splits": shared}


def audit(
    samples: list[Sample],
    *,
    thumb: int = 32,
    near_threshold: float = 0.99,
    workers: int = 2,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Audit ``samples``; returns a JSON-able report (see the module docstring)."""
    if not 0.0 < near_threshold <= 1.0:
        raise MedxferError(f"near_threshold {near_threshold} is outside (0, 1]", "use e.g. 0.99")
    if thumb < 4:
        raise MedxferError(f"thumbnail size {thumb} is too small", "use e.g. 32")
    show = show_progress and len(samples) >= PROGRESS_FROM
    decoded = _decode_all([s.path for s in samples], thumb, workers, show, with_cues=True)
    report: dict[str, Any] = {
        "n_samples": len(samples),
        "settings": {"thumb": thumb, "near_threshold": near_threshold, "transforms": [*TRANSFORMS]},
        "counts": _counts(samples),
        "images": _image_stats(decoded),
        "unreadable": [
            {**_file(s), "error": d[5]} for s, d in zip(samples, decoded, strict=True) if d[5]
        ],
        "exact_duplicates": _exact_groups(samples, decoded),
        "near_duplicates": _near_duplicates(samples, decoded, thumb, near_threshold),
        "near_within_train": _near_within_train(samples, decoded, thumb, near_threshold),
    }
    if any(s.patient_id for s in samples):
        report["patients"] = patient_summary(samples)
    with Progress(SpinnerColumn(), *_COLUMNS[:1], TimeElapsedColumn(), transient=True,
                  disable=not show) as progress:  # fmt: skip
        progress.add_task("can image statistics alone tell the labels apart?", total=None)
        report["shortcuts"] = _shortcuts(samples, decoded)
    report["summary"] = _summary(report)
    return report


def leaking_train_paths(report: dict[str, Any]) -> set[str]:
    """Train files that are exact or near duplicates of a test file (for ``data.drop_leaks``)."""
    out: set[str] = set()
    for group in report["exact_duplicates"]["across_splits"]:
        if "test" in group["splits"]:
            out.update(f["path"] for f in group["files"] if f["split"] == "train")
    for pair in report["near_duplicates"]:
        if pair["a_split"] == "train" and pair["b_split"] == "test":
            out.add(pair["a_path"])
    return out


def _counts_table(counts: dict[str, dict[str, int]]) -> Table:
    table = Table(title="Images per split and class")
    labels = sorted({label for c in counts.values() for label in c})
    table.add_column("class")
    for split in [*counts, "total"]:
        table.add_column(split, justify="right")
    for label in [*labels, "total"]:
        row = [
            counts[s].get(label, 0) if label != "total" else sum(counts[s].values()) for s in counts
        ]
        table.add_row(label, *map(str, row), str(sum(row)))
    return table


def _shortcut_cell(shortcuts: dict[str, Any]) -> str:
    if not shortcuts.get("checked"):
        return "not checked"
    cell = f"{shortcuts['balanced_accuracy']:.2f} (chance {shortcuts['chance']:.2f})"
    if "test" in shortcuts:
        cell += f", test {shortcuts['test']['balanced_accuracy']:.2f}"
    return cell


def _findings_table(summary: dict[str, Any], shortcuts: dict[str, Any]) -> Table:
    table = Table(title="Findings")
    table.add_column("check")
    table.add_column("result", justify="right")
    table.add_row("unreadable files", str(summary["unreadable"]))
    for split, w in summary["exact_within_split"].items():
        table.add_row(
            f"exact duplicates within {split}", f"{w['groups']} groups, +{w['extra_copies']}"
        )
    table.add_row("exact duplicate groups across splits", str(summary["exact_across_split_groups"]))
    for pair, n in summary["near_pairs"].items():
        table.add_row(f"near duplicates {pair}", str(n))
    by_t = ", ".join(f"{k} {v}" for k, v in summary["near_by_transform"].items()) or "-"
    table.add_row("near duplicates by transform", by_t)
    conflicts = summary["exact_label_conflicts"] + summary["near_label_conflicts"]
    table.add_row("duplicates with conflicting labels", str(conflicts))
    table.add_row("train files leaking into test", str(summary["leaking_train_files"]))
    within = summary.get("train_images_with_near_copy")
    table.add_row(
        "train images with a near copy in train", "not checked" if within is None else str(within)
    )
    table.add_row(
        "label told from image statistics alone (balanced accuracy)", _shortcut_cell(shortcuts)
    )
    if "patients" in summary:
        table.add_row("patients (IDs from data.patient_regex or the manifest)",
                      str(summary["patients"]))  # fmt: skip
        for pair, n in summary["patients_across_splits"].items():
            table.add_row(f"patients in both {pair}", str(n))
    return table


def _conflicts(report: dict[str, Any]) -> list[str]:
    exact = report["exact_duplicates"]
    groups = [g for gs in exact["within_split"].values() for g in gs] + exact["across_splits"]
    lines = [
        " = ".join(f"{f['path']} ({f['label']}, {f['split']})" for f in g["files"])
        for g in groups
        if g["label_conflict"]
    ]
    lines += [
        f"{p['a_path']} ({p['a_label']}) ~ {p['b_path']} ({p['b_label']}), {p['transform']}"
        for p in report["near_duplicates"]
        if p["label_conflict"]
    ]
    return lines


def print_audit(report: dict[str, Any], console: Console, max_listed: int = 10) -> None:
    """Print the report's counts and findings as rich tables, then the worst offenders."""
    console.print(_counts_table(report["counts"]))
    console.print(_findings_table(report["summary"], report.get("shortcuts", {})))
    for item in report["unreadable"][:max_listed]:
        console.print(f"[red]unreadable[/red] {escape(item['path'])}: {escape(item['error'])}")
    for line in _conflicts(report)[:max_listed]:
        console.print(f"[yellow]label conflict[/yellow] {escape(line)}")
    within = report["summary"].get("train_images_with_near_copy") or 0
    if within and not report["counts"].get("val"):
        console.print(
            f"{within} training images have a near copy in training. A validation split carved "
            "at random holds copies of training images and scores too high: set "
            "data.group_near_duplicates=true to keep each group of copies on one side."
        )
    shortcuts = report.get("shortcuts", {})
    if shortcuts.get("flagged"):
        groups = shortcuts["by_group"]
        strongest = max(groups, key=groups.get)
        console.print(
            f"The label can be told from image statistics alone (balanced accuracy "
            f"{shortcuts['balanced_accuracy']:.2f}, chance {shortcuts['chance']:.2f}; most from "
            f"{strongest}: {groups[strongest]:.2f}). A model may learn that cue instead of the "
            "finding and fail where it differs. Check whether the classes come from different "
            "sources; train with augment.policy=robust, and judge the model on a set from "
            "another source."
        )
    if report["summary"]["leaking_train_files"]:
        console.print(
            "Train files that duplicate test files inflate test scores: "
            "set data.drop_leaks=true to leave them out of training."
        )
