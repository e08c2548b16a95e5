"""What a training refuses in a sample list: one image listed with two labels or in two
splits, and manifest rows that point outside the manifest's folder.

``data audit`` reports such rows; training stops on them unless told what to do:
``data.drop_conflicts=true`` leaves every row of a contradicted image out, and
``data.allow_outside_root=true`` accepts paths that leave the manifest's folder.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from medxfer.data.sources import Sample
from medxfer.errors import MedxferError

SHOWN = 3  # rows named in a message; the rest are counted


def _norm(path: str | Path) -> str:
    """An absolute, normalised path (``..`` folded, links not followed)."""
    return os.path.normpath(os.path.abspath(Path(path).expanduser()))


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + more


def conflicts(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Images listed more than once with another label or split: path -> its rows."""
    rows: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        rows[_norm(s.path)].append(s)
    return {p: group for p, group in rows.items() if len({(s.label, s.split) for s in group}) > 1}


def drop_duplicate_rows(samples: list[Sample]) -> list[Sample]:
    """One row per image where the rows agree on label and split (a repeated line)."""
    seen: set[str] = set()
    out: list[Sample] = []
    for s in samples:
        key = _norm(s.path)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def outside_root(samples: list[Sample], root: Path) -> list[Sample]:
    """Rows whose path leaves ``root`` (``../``, or an absolute path elsewhere)."""
    base = _norm(root)
    return [s for s in samples if os.path.commonpath([base, _norm(s.path)]) != base]


def check_samples(
    samples: list[Sample], root: Path, *, drop_conflicts: bool, allow_outside_root: bool
) -> tuple[list[Sample], list[str]]:
    """``samples`` as training may use them, and the paths left out (``drop_conflicts``); one
    error naming the rows otherwise. ``root``: the data folder or the CSV manifest."""
    manifest = root.suffix.lower() == ".csv"
    if manifest and not allow_outside_root:
        away = outside_root(samples, root.parent)
        if away:
            raise MedxferError(
                f"{len(away)} row(s) of {root} point outside its folder {root.parent}: "
                + _listed([s.path for s in away]),
                "keep the images below the manifest's folder, or set "
                "data.allow_outside_root=true if these paths are meant",
            )
    bad = conflicts(samples)
    if bad and not drop_conflicts:
        named = [
            f"{p} as " + ", ".join(f"{s.label}/{s.split or 'unassigned'}" for s in group)
            for p, group in bad.items()
        ]
        raise MedxferError(
            f"{len(bad)} image(s) are listed with two labels or in two splits in {root}: "
            + _listed(named),
            "correct those rows, or set data.drop_conflicts=true to leave these images out",
        )
    kept = [s for s in samples if _norm(s.path) not in bad]
    return drop_duplicate_rows(kept), sorted(bad)
