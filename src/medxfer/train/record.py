"""What a run was made from, so that a resume or a reuse is the run it claims to be.

At its start ``fit`` writes ``fingerprint.json`` (hashes of the result-relevant config, of the
dataset's image list, and of the images it trains, validates and tests on with their splits)
and ``samples.csv.gz`` (every listed image: path, label, given split, split used; "" = left
out). A resume checks all three, a reuse of a finished run the config and the image list (no
image decoded); any difference stops with what changed, and the fix: a new run folder.
Runs made before this record existed have none and are not checked.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from medxfer.config import ExperimentConfig, drop_later_defaults
from medxfer.data.prepare import Prepared, list_samples
from medxfer.data.sources import Sample
from medxfer.errors import MedxferError
from medxfer.train.checkpoint import atomic_write_json

FINGERPRINT = "fingerprint.json"
SAMPLES = "samples.csv.gz"
SHOWN = 5  # config keys named in a message
# keys that change how a run is computed, not what it computes (or that fingerprint() already
# leaves out): a resume may change them
EXECUTION_KEYS = ("train.threads", "train.device", "train.eval_batch_size", "data.cache_dir")


def config_values(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as ``ExperimentConfig.fingerprint`` hashes it, flattened to dotted keys,
    without ``EXECUTION_KEYS``."""
    d = cfg.to_dict()
    for key in ("out_dir", "name", "tune", "prune", "structured", "gan"):
        d.pop(key)
    drop_later_defaults(d)
    flat = {f"{sec}.{k}": v for sec, part in d.items() for k, v in part.items()}
    if cfg.data.synthetic and Path(cfg.data.synthetic).is_file():
        flat["data.synthetic_sha256"] = hashlib.sha256(
            Path(cfg.data.synthetic).read_bytes()
        ).hexdigest()
    return {k: v for k, v in sorted(flat.items()) if k not in EXECUTION_KEYS}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _base(root: str | Path) -> Path:
    """The folder the paths of a run are recorded relative to (a manifest's own folder)."""
    root = Path(root)
    return root.parent if root.suffix.lower() == ".csv" else root


def _rel(path: str, base: Path) -> str:
    """``path`` relative to ``base`` when below it: the record does not depend on where the
    dataset (or the demo set's cache) is mounted."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return path if rel.startswith("..") else rel


def _listing_rows(listing: list[Sample], base: Path) -> list[tuple[str, str, str, str]]:
    return sorted((_rel(s.path, base), s.label, s.split, s.patient_id) for s in listing)


def _used(data: Prepared, base: Path) -> dict[str, tuple[str, str]]:
    """relative path -> (label, split) of every image the run trains, validates or tests on."""
    return {_rel(s.path, base): (s.label, s.split) for s in data.samples}


def fingerprint(cfg: ExperimentConfig, data: Prepared) -> dict[str, Any]:
    values = config_values(cfg)
    base = _base(data.info["root"])
    used = sorted((p, *ls) for p, ls in _used(data, base).items())
    return {
        "config": _hash(values),
        "listing": _hash(_listing_rows(data.listing, base)),
        "samples": _hash(used),
        "images": len(used),
        "config_values": values,
    }


def _write_samples(data: Prepared, path: Path) -> None:
    base = _base(data.info["root"])
    used = _used(data, base)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "label", "given_split", "split", "patient_id"])
    for row in _listing_rows(data.listing, base):
        writer.writerow([*row[:3], used.get(row[0], ("", ""))[1], row[3]])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(buf.getvalue().encode(), mtime=0))
    tmp.replace(path)


def _read_samples(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return list(csv.DictReader(io.StringIO(gzip.decompress(path.read_bytes()).decode())))


def record(cfg: ExperimentConfig, data: Prepared, run_dir: Path) -> None:
    """Write the run's fingerprint and sample list (main process, at the start of ``fit``)."""
    _write_samples(data, run_dir / SAMPLES)
    atomic_write_json(fingerprint(cfg, data), run_dir / FINGERPRINT)


def _stored(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / FINGERPRINT
    return json.loads(path.read_text()) if path.exists() else None


def _config_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    named = [f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in keys[:SHOWN]]
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return "config changed: " + ", ".join(named) + more


def _data_change(
    run_dir: Path, listing: list[Sample], base: Path, used: dict[str, tuple[str, str]] | None
) -> str:
    """How the images differ from the run's record: added, removed, relabelled, moved split."""
    old = {r["path"]: r for r in _read_samples(run_dir / SAMPLES)}
    new = {row[0]: row for row in _listing_rows(listing, base)}
    added, removed = len(new.keys() - old.keys()), len(old.keys() - new.keys())
    both = new.keys() & old.keys()
    relabelled = sum(1 for p in both if old[p]["label"] != new[p][1])
    moved = 0
    if used is not None:
        moved = sum(1 for p in both if old[p]["split"] != used.get(p, ("", ""))[1])
    parts = [f"{n} image(s) {what}" for n, what in ((added, "added"), (removed, "removed"),
             (relabelled, "relabelled"), (moved, "moved to another split")) if n]  # fmt: skip
    return "data changed: " + (", ".join(parts) or "the image list or the split assignment")


def _refuse(run_dir: Path, what: str, why: str) -> MedxferError:
    return MedxferError(
        f"{run_dir} was made from other data or another config, so it cannot be {what} ({why})",
        "train into a new run folder (another --run-dir or out_dir), or delete this one",
    )


def check_resume(cfg: ExperimentConfig, data: Prepared, run_dir: Path) -> None:
    """Refuse to continue ``run_dir`` with another config, image list or split assignment."""
    old = _stored(run_dir)
    if old is None:
        return  # made before runs recorded what they were made from
    new = fingerprint(cfg, data)
    if new["config"] != old["config"]:
        why = _config_change(old["config_values"], new["config_values"])
        raise _refuse(run_dir, "resumed", why)
    if new["listing"] != old["listing"] or new["samples"] != old["samples"]:
        base = _base(data.info["root"])
        why = _data_change(run_dir, data.listing, base, _used(data, base))
        raise _refuse(run_dir, "resumed", why)


def check_reuse(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Refuse to report the finished ``run_dir`` as a run of ``cfg`` when its config or the
    dataset's image list differ (the list only: nothing is decoded)."""
    old = _stored(run_dir)
    if old is None:
        return
    values = config_values(cfg)
    if _hash(values) != old["config"]:
        raise _refuse(run_dir, "reused", _config_change(old["config_values"], values))
    listing, root = list_samples(cfg.data)[:2]
    if _hash(_listing_rows(listing, _base(root))) != old["listing"]:
        raise _refuse(run_dir, "reused", _data_change(run_dir, listing, _base(root), None))
