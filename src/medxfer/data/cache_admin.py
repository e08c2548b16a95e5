"""``medxfer cache list`` and ``medxfer cache clear``: what the decode cache holds, and room.

An entry is recognised by its name (``images-<20 hex digits>.npy``, as ``cache.py`` writes it)
and its sidecar (``images-<key>.json`` holding the cache's fields); any other file in the
folder is never listed or removed. A build in progress holds its lock and is left alone.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medxfer.data.cache import cache_files, default_cache_dir
from medxfer.errors import MedxferError

NAME = re.compile(r"^images-([0-9a-f]{20})\.(?:npy|json|partial\.npy|partial\.json|lock)$")
SIDECAR_KEYS = {"n", "size", "color", "resize", "unreadable"}


@dataclass
class Entry:
    key: str
    dataset: str  # the dataset root the images came from ("" for caches built before it was kept)
    images: int
    size: int
    color: str
    bytes: int  # every file of the entry
    last_use: float  # epoch seconds: the sidecar's mtime, touched whenever a run opens the cache
    state: str  # complete | partial (a build that was killed, or is running)


def _sidecar(path: Path) -> dict[str, object] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and set(info) >= SIDECAR_KEYS else None


def _busy(lock: Path) -> bool:
    """Whether a build holds the entry's lock right now."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def entries(folder: Path) -> list[Entry]:
    """medxfer's cache entries in ``folder``, least recently used first."""
    if not folder.is_dir():
        return []
    keys = sorted({m.group(1) for p in folder.iterdir() if (m := NAME.match(p.name))})
    out = []
    for key in keys:
        files = cache_files(folder, key)
        info = _sidecar(files["meta"])
        progress = files["progress"].exists() and files["partial"].exists()
        if info is None and not progress:
            continue  # not recognisably ours
        present = [f for f in files.values() if f.exists()]
        state = "complete" if info is not None and files["npy"].exists() else "partial"
        meta = info or {}
        out.append(Entry(
            key, str(meta.get("source", "")), int(str(meta.get("n", 0))),
            int(str(meta.get("size", 0))), str(meta.get("color", "")),
            sum(f.stat().st_size for f in present), max(f.stat().st_mtime for f in present), state,
        ))  # fmt: skip
    return sorted(out, key=lambda e: e.last_use)


def remove(folder: Path, entry: Entry) -> bool:
    """Delete one entry's files; False (nothing deleted) while a build holds it."""
    files = cache_files(folder, entry.key)
    if _busy(files["lock"]):
        return False
    # the pixels first: without them no run trusts what is left, and a process that has the
    # file mapped keeps reading it until it exits
    for name in ("npy", "partial", "progress", "meta", "lock"):
        files[name].unlink(missing_ok=True)
    for tmp in folder.glob(f"images-{entry.key}.*json.tmp*"):  # a sidecar write cut short
        tmp.unlink(missing_ok=True)
    return True


def clear(
    folder: Path, *, everything: bool = False, older_than_days: float | None = None,
    max_bytes: int | None = None,
) -> list[Entry]:  # fmt: skip
    """Remove entries not used for ``older_than_days``, or all of them, then the least recently
    used ones until the rest fit in ``max_bytes``; returns the removed entries."""
    if not everything and older_than_days is None and max_bytes is None:
        raise MedxferError("nothing to clear", "pass --all, --older-than DAYS or --max-bytes N")
    now, removed = time.time(), []
    left = entries(folder)
    for e in list(left):
        old = older_than_days is not None and now - e.last_use > older_than_days * 86400
        if (everything or old) and remove(folder, e):
            removed.append(e)
            left.remove(e)
    total = sum(e.bytes for e in left)
    for e in list(left):  # least recently used first
        if max_bytes is None or total <= max_bytes:
            break
        if remove(folder, e):
            removed.append(e)
            total -= e.bytes
    return removed


def parse_bytes(text: str) -> int:
    """``"500M"``, ``"20G"``, ``"1.5T"`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 20G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def cmd_cache(args: argparse.Namespace) -> int:
    folder = Path(args.dir).expanduser() if args.dir else default_cache_dir()
    if args.cache_cmd == "clear":
        gone = clear(folder, everything=args.all, older_than_days=args.older_than,
                     max_bytes=args.max_bytes)  # fmt: skip
        print(f"removed {len(gone)} cache file(s), {human(sum(e.bytes for e in gone))}, "
              f"from {folder}")  # fmt: skip
        return 0
    found = entries(folder)
    if args.json:
        print(json.dumps([asdict(e) for e in found], indent=2))
        return 0
    print(f"{folder}: {len(found)} cache file(s), {human(sum(e.bytes for e in found))}")
    for e in reversed(found):  # most recently used first
        print(f"  {e.key}  {e.images:>7} x {e.size}px {e.color:<4}  {human(e.bytes):>10}  "
              f"last use {_when(e.last_use)}  {e.state:<8}  {e.dataset or '?'}")  # fmt: skip
    return 0


def add_cache_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("cache", help="list or clear the decoded-image cache ($MEDXFER_CACHE)")
    csub = c.add_subparsers(dest="cache_cmd", required=True)
    folder_help = "cache folder (default: $MEDXFER_CACHE, else ~/.cache/medxfer)"
    ls = csub.add_parser("list", help="cache files: dataset, size, colour, bytes, last use")
    ls.add_argument("--dir", help=folder_help)
    ls.add_argument("--json", action="store_true")
    cl = csub.add_parser("clear", help="remove medxfer's cache files (never any other file)")
    cl.add_argument("--dir", help=folder_help)
    cl.add_argument("--all", action="store_true", help="every cache file")
    cl.add_argument("--older-than", type=float, metavar="DAYS", help="those unused for DAYS")
    cl.add_argument(
        "--max-bytes",
        type=parse_bytes,
        metavar="N",
        help="then the least recently used until the rest fit in N, e.g. 20G",
    )
    for p in (ls, cl):
        p.set_defaults(func=cmd_cache)
