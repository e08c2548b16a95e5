"""Decode every image once, resize it, and keep the uint8 pixels in one memory-mapped ``.npy``.

The cache key covers each file's path, size and modification time plus the target size, colour
mode and resize rule, so a changed file or setting builds a new cache and a later epoch or run
never decodes a JPEG again.

The build decodes a chunk of images at a time straight into ``images-<key>.partial.npy`` (an
``np.lib.format.open_memmap``), so its memory is bounded by the chunk, not the dataset. After
each chunk, ``images-<key>.partial.json`` records how far it got: a killed build continues from
there. Only when every image is in does the sidecar ``images-<key>.json`` appear and the
partial file get renamed to ``images-<key>.npy``; both must exist for a run to trust the cache.
Readers open it with ``mmap_mode="r"``, so every process on a machine (DDP ranks, tuning
workers) shares one copy of the pixels in the page cache. A lock file serialises builders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from medxfer.data.io import read_image, resize
from medxfer.errors import MedxferError

CHUNK_BYTES = 32 << 20  # pixels decoded per chunk (668 images at 224 px grey)
FORMAT = "medxfer-image-cache"  # marks a sidecar as ours (`medxfer cache` trusts no other)

Job = tuple[str, int, str, str]
Decode = Callable[[Job], tuple[np.ndarray | None, str]]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDXFER_CACHE", Path.home() / ".cache" / "medxfer"))


def cache_key(paths: Sequence[str], size: int, color: str, mode: str) -> str:
    h = hashlib.sha256(f"v1|{size}|{color}|{mode}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.abspath(p)}|missing\n".encode())
    return h.hexdigest()[:20]


def cache_files(folder: Path, key: str) -> dict[str, Path]:
    """The files of one cache entry: the pixels, their sidecar, a build's partial pixels and
    progress, and the builders' lock."""
    stem = folder / f"images-{key}"
    return {
        "npy": stem.with_suffix(".npy"),
        "meta": stem.with_suffix(".json"),
        "partial": stem.with_suffix(".partial.npy"),
        "progress": stem.with_suffix(".partial.json"),
        "lock": stem.with_suffix(".lock"),
    }


def _decode(args: Job) -> tuple[np.ndarray | None, str]:
    path, size, color, mode = args
    try:
        return resize(read_image(path, color), size, mode), ""
    except MedxferError as err:
        return None, err.message
    except Exception as err:  # a broken file must not kill the whole build
        return None, f"{err.__class__.__name__}: {err}"


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _chunks(
    paths: Sequence[str], job: tuple[int, str, str], start: int, chunk: int, workers: int,
    decode: Decode,
) -> Iterator[tuple[int, np.ndarray, dict[str, str]]]:  # fmt: skip
    """``(first row, pixels, {path: error})`` per chunk of ``paths`` from row ``start`` on."""
    size, color, mode = job
    shape = (size, size) + ((3,) if color == "rgb" else ())
    with ExitStack() as stack:
        progress = stack.enter_context(Progress(transient=True))
        task = progress.add_task(f"decoding {len(paths)} images to {size}px", total=len(paths))
        progress.advance(task, start)
        # threads, not processes: Pillow decodes and resizes without the GIL (1.7-2.2x on
        # 2 cores, measured), and nothing forks this multi-threaded process (src/medxfer/
        # parallel.py says why that can hang)
        pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers > 1 else None
        for lo in range(start, len(paths), chunk):
            jobs = [(p, size, color, mode) for p in paths[lo : lo + chunk]]
            results = pool.map(decode, jobs) if pool and len(paths) > 64 else map(decode, jobs)
            out = np.zeros((len(jobs), *shape), dtype=np.uint8)
            errors: dict[str, str] = {}
            for i, (arr, err) in enumerate(results):
                if arr is None:
                    errors[jobs[i][0]] = err
                else:
                    out[i] = arr
            progress.advance(task, len(jobs))
            yield lo, out, errors


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, re-taken if the file was replaced meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                yield
                return
        finally:
            os.close(fd)  # also releases the lock


def _resume_point(
    files: dict[str, Path], shape: tuple[int, ...], chunk: int
) -> tuple[int, dict[str, str]]:
    """Rows already decoded by a killed build of this entry, and their errors; 0 if none."""
    try:
        done = json.loads(files["progress"].read_text())
        part = np.load(files["partial"], mmap_mode="r")
        if tuple(part.shape) == shape and part.dtype == np.uint8 and done["chunk"] == chunk:
            return int(done["rows"]), dict(done["unreadable"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 0, {}


def _build(
    paths: Sequence[str], job: tuple[int, str, str], files: dict[str, Path], info: dict[str, Any],
    chunk: int, workers: int, decode: Decode,
) -> dict[str, str]:  # fmt: skip
    """Decode into the partial memory map chunk by chunk, then publish sidecar and pixels."""
    size, color, _ = job
    shape = (len(paths), size, size) + ((3,) if color == "rgb" else ())
    start, errors = _resume_point(files, shape, chunk)
    if start == 0:  # a fresh start: no earlier progress may ever vouch for these rows
        files["progress"].unlink(missing_ok=True)
        np.lib.format.open_memmap(files["partial"], mode="w+", dtype=np.uint8, shape=shape).flush()
    for lo, pixels, errs in _chunks(paths, job, start, chunk, workers, decode):
        # a fresh map per chunk: unmapping it drops the written pages from this process's
        # resident set (they stay in the page cache), so memory stays bounded by the chunk
        part = np.lib.format.open_memmap(files["partial"], mode="r+")
        part[lo : lo + len(pixels)] = pixels
        part.flush()
        del part
        errors |= errs
        done = {"rows": lo + len(pixels), "chunk": chunk, "unreadable": errors}
        _write_json(done, files["progress"])
    nbytes = files["partial"].stat().st_size
    info = info | {"unreadable": errors, "created": time.time(), "bytes": nbytes}
    _write_json(info, files["meta"])
    os.replace(files["partial"], files["npy"])  # the pixels appear last: the commit point
    files["progress"].unlink(missing_ok=True)
    return errors


def _open(
    files: dict[str, Path], shape: tuple[int, ...]
) -> tuple[np.ndarray, dict[str, str]] | None:
    """The published entry as a read-only memory map, or None if absent or not what was asked."""
    try:
        errors = dict(json.loads(files["meta"].read_text())["unreadable"])
        images = np.load(files["npy"], mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if tuple(images.shape) != shape or images.dtype != np.uint8:
        return None
    with suppress(OSError):  # a read-only cache folder
        os.utime(files["meta"])  # the sidecar's mtime is the entry's last use
    return images, errors


def load_images(
    paths: Sequence[str],
    size: int,
    color: str = "gray",
    mode: str = "pad",
    cache_dir: str | Path = "",
    workers: int = 2,
    *,
    source: str = "",
    chunk: int = 0,
    decode: Decode = _decode,
) -> tuple[np.ndarray, dict[str, str]]:
    """Pixels as a read-only ``(N, size, size[, 3]) uint8`` memory map and ``{path: error}`` for
    unreadable files (zeros in the array; the caller decides whether that is an error).

    ``source`` names the dataset in ``medxfer cache list``; ``chunk`` images are decoded at a
    time (0: ``CHUNK_BYTES`` of pixels). A cache folder that cannot be written only costs
    speed (and memory): the pixels are then decoded into RAM on every call.
    """
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    files = cache_files(folder, cache_key(paths, size, color, mode))
    shape = (len(paths), size, size) + ((3,) if color == "rgb" else ())
    chunk = chunk or max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:]))))
    job = (size, color, mode)
    if not paths:
        return np.zeros(shape, dtype=np.uint8), {}
    if (opened := _open(files, shape)) is not None:
        return opened
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(files["lock"]):
            if (opened := _open(files, shape)) is not None:  # built while we waited
                return opened
            info = {
                "format": FORMAT, "n": len(paths), "size": size, "color": color, "resize": mode,
                "source": source or os.path.commonpath([os.path.abspath(p) for p in paths]),
            }  # fmt: skip
            _build(paths, job, files, info, chunk, workers, decode)
        opened = _open(files, shape)
        if opened is not None:
            return opened
    except OSError:
        pass  # a read-only cache folder: decode into memory below
    images = np.zeros(shape, dtype=np.uint8)
    errors: dict[str, str] = {}
    for lo, pixels, errs in _chunks(paths, job, 0, chunk, workers, decode):
        images[lo : lo + len(pixels)] = pixels
        errors |= errs
    return images, errors
