"""The images of a prepared dataset: rows of the decode cache's memory maps, chosen by index.

``Prepared.images[idx]`` gathers just those images into a fresh uint8 tensor, so a batch, a
split or a class costs memory for what it holds and the cache itself stays in the page cache,
shared by every process that maps it. No code writes to the cache through this view.

After each gather the map's pages are released from the process (``MADV_DONTNEED``): they stay
in the shared page cache for the next read and for other processes, but stop counting in this
process's resident memory. Without it, a kernel that maps whole page-cache folios around each
fault left about 230 KB resident per 50 KB image read (5,000 random images of a 3 GB cache:
1.16 GB resident), so a process's RSS grew with the dataset it sampled from.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from contextlib import suppress

import numpy as np
import torch

Index = torch.Tensor | np.ndarray | Sequence[int] | slice | int
CHUNK = 256  # images gathered between two releases of the map's pages


class ImageStore:
    """uint8 images ``(N, S, S[, 3])``: row ``i`` is row ``rows[i]`` of the concatenation of
    ``parts`` (memory maps or arrays), which are never copied whole."""

    def __init__(self, parts: Sequence[np.ndarray], rows: np.ndarray | None = None) -> None:
        if not parts:
            raise ValueError("an ImageStore needs at least one array")
        if len({p.shape[1:] for p in parts}) != 1:
            raise ValueError(f"arrays of different image shapes: {[p.shape for p in parts]}")
        self.parts = [np.asarray(p) for p in parts]  # still backed by the memory map
        self.maps = [_mapping(p) for p in parts]
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        total = int(self.offsets[-1])
        self.rows = np.arange(total, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= total):
            raise IndexError(f"rows outside the {total} stored images")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        return len(self.shape)

    def extend(self, part: np.ndarray) -> ImageStore:
        """This store with every image of ``part`` appended after its rows."""
        new = np.arange(len(part), dtype=np.int64) + int(self.offsets[-1])
        return ImageStore([*self.parts, part], np.concatenate([self.rows, new]))

    def _positions(self, idx: Index) -> np.ndarray:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        if isinstance(idx, slice | int):
            return self.rows[idx]
        pos = np.asarray(idx)
        if pos.dtype == np.bool_:
            if pos.shape != self.rows.shape:
                raise IndexError(f"a mask of {pos.shape} for {len(self.rows)} images")
            return self.rows[pos]
        return self.rows[pos.astype(np.int64, copy=False)]

    def __getitem__(self, idx: Index) -> torch.Tensor:
        rows = self._positions(idx)
        if np.ndim(rows) == 0 or len(rows) <= CHUNK or all(m is None for m in self.maps):
            try:
                return self._gather(rows)
            finally:
                self._release()
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8)
        for start in range(0, len(rows), CHUNK):  # a large gather releases as it goes
            out[start : start + CHUNK] = self._gather(rows[start : start + CHUNK])
            self._release()
        return out

    def _release(self) -> None:
        for m in self.maps:
            if m is not None:
                _release(m)

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        if len(self.parts) == 1:
            return torch.from_numpy(np.take(self.parts[0], rows, axis=0))
        flat = np.atleast_1d(rows)
        out = np.empty((len(flat), *self.parts[0].shape[1:]), dtype=np.uint8)
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        for k, part in enumerate(self.parts):
            sel = which == k
            if sel.any():
                out[sel] = np.take(part, flat[sel] - self.offsets[k], axis=0)
        return torch.from_numpy(out if np.ndim(rows) else out[0])


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The ``mmap`` behind ``array`` when it is a read-only ``np.memmap`` (or a view of one),
    else None: releasing the pages of a copy-on-write map would drop its changes."""
    obj: object = array
    while obj is not None:
        if isinstance(obj, np.memmap):
            m = getattr(obj, "_mmap", None)
            return m if obj.mode == "r" and isinstance(m, mmap.mmap) else None
        obj = getattr(obj, "base", None)
    return None


def _release(m: mmap.mmap) -> None:
    """Unmap ``m``'s pages from this process; the page cache keeps them (read-only map)."""
    if hasattr(mmap, "MADV_DONTNEED"):
        with suppress(OSError, ValueError):  # a closed map, or a platform without madvise
            m.madvise(mmap.MADV_DONTNEED)
