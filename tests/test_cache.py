from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

import medxfer.data.cache as cache


def _write(tmp: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp / f"{i}.png"
        Image.fromarray(np.full((20, 30), i * 10, np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_second_load_does_not_decode(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    paths = _write(tmp_path, 5)
    first, err = cache.load_images(paths, 16, cache_dir=tmp_path / "c", workers=1)
    assert first.shape == (5, 16, 16) and not err
    calls = []
    monkeypatch.setattr(cache, "_decode", lambda a: calls.append(a) or (None, "x"))
    again, _ = cache.load_images(paths, 16, cache_dir=tmp_path / "c", workers=1)
    assert not calls and np.array_equal(first, again)


def test_key_changes_with_file_and_size(tmp_path: Path) -> None:
    paths = _write(tmp_path, 3)
    k1 = cache.cache_key(paths, 16, "gray", "pad")
    assert k1 != cache.cache_key(paths, 32, "gray", "pad")
    assert k1 != cache.cache_key(paths, 16, "rgb", "pad")
    os.utime(paths[0], ns=(1, 1))
    assert k1 != cache.cache_key(paths, 16, "gray", "pad")


def test_unreadable_reported_not_cached_as_image(tmp_path: Path) -> None:
    paths = _write(tmp_path, 2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    arr, err = cache.load_images([*paths, str(bad)], 16, cache_dir=tmp_path / "c", workers=1)
    assert list(err) == [str(bad)] and arr.shape[0] == 3
