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


def test_worker_processes_decode_like_one_process(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Over 64 images two worker threads decode them (relative paths) into exactly what one
    thread decodes, in order, errors included."""
    for i in range(70):
        Image.fromarray(np.full((20, 30), i * 3, np.uint8)).save(tmp_path / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    relative = [f"{i}.png" for i in range(70)] + ["missing.png"]
    two, err2 = cache.load_images(relative, 16, cache_dir=tmp_path / "c2", workers=2)
    one, err1 = cache.load_images(relative, 16, cache_dir=tmp_path / "c1", workers=1)
    assert np.array_equal(one, two) and err1 == err2 and list(err2) == ["missing.png"]
    assert [int(two[i, 8, 8]) for i in range(70)] == [3 * i for i in range(70)]  # in order
