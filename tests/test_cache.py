from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from subproc import run

import medxfer.data.cache as cache
from medxfer.cli import main
from medxfer.data import cache_admin
from medxfer.data.store import ImageStore


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


def _pngs(tmp: Path, n: int) -> list[str]:
    """``n`` distinct small grey PNGs (varied content, so every row of the cache differs)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (20 + i % 7, 24), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _only(folder: Path, suffix: str) -> Path:
    (found,) = [p for p in folder.iterdir() if p.name.endswith(suffix)]
    return found


def test_chunked_build_equals_one_shot_byte_for_byte(tmp_path: Path) -> None:
    paths = _pngs(tmp_path, 23)
    cache.load_images(paths, 16, cache_dir=tmp_path / "one", workers=1, chunk=1000)
    chunked, _ = cache.load_images(paths, 16, cache_dir=tmp_path / "chunk", workers=1, chunk=4)
    a, b = _only(tmp_path / "one", ".npy"), _only(tmp_path / "chunk", ".npy")
    assert a.read_bytes() == b.read_bytes()
    saved = tmp_path / "saved.npy"  # and equal to what np.save makes of the decoded pixels
    np.save(saved, np.stack([cache.resize(cache.read_image(p, "gray"), 16, "pad") for p in paths]))
    assert saved.read_bytes() == a.read_bytes()
    assert isinstance(chunked, np.memmap) and not chunked.flags.writeable


def test_killed_build_is_not_trusted_and_the_next_call_completes_it(tmp_path: Path) -> None:
    paths, folder = _pngs(tmp_path, 20), tmp_path / "c"
    decoded: list[str] = []

    def dies_in_chunk_2(job: cache.Job) -> tuple[np.ndarray | None, str]:
        if paths.index(job[0]) >= 8:  # the third chunk of 4
            raise RuntimeError("killed")
        decoded.append(job[0])
        return cache._decode(job)

    with pytest.raises(RuntimeError, match="killed"):
        cache.load_images(paths, 16, cache_dir=folder, workers=1, chunk=4, decode=dies_in_chunk_2)
    assert decoded == paths[:8]
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".npy") and ".partial" not in n]
    assert not [n for n in names if n.endswith(".json") and ".partial" not in n]
    decoded.clear()

    def counts(job: cache.Job) -> tuple[np.ndarray | None, str]:
        decoded.append(job[0])
        return cache._decode(job)

    resumed, _ = cache.load_images(paths, 16, cache_dir=folder, workers=1, chunk=4, decode=counts)
    assert decoded == paths[8:]  # continued where it stopped
    fresh, _ = cache.load_images(paths, 16, cache_dir=tmp_path / "fresh", workers=1)
    assert np.array_equal(resumed, fresh)
    assert sorted(p.name for p in folder.iterdir() if "partial" in p.name) == []


def test_progress_of_another_chunk_size_restarts(tmp_path: Path) -> None:
    """Progress recorded with another chunk size is not resumed, and once a fresh start has
    begun, that old progress can no longer vouch for the (now zeroed) rows."""
    paths, folder = _pngs(tmp_path, 12), tmp_path / "c"

    def dies_at(row: int) -> cache.Decode:
        def decode(job: cache.Job) -> tuple[np.ndarray | None, str]:
            if paths.index(job[0]) >= row:
                raise RuntimeError("killed")
            return cache._decode(job)

        return decode

    with pytest.raises(RuntimeError):  # 8 rows done with chunks of 4
        cache.load_images(paths, 16, cache_dir=folder, workers=1, chunk=4, decode=dies_at(8))
    with pytest.raises(RuntimeError):  # a fresh start with chunks of 5, killed in its first
        cache.load_images(paths, 16, cache_dir=folder, workers=1, chunk=5, decode=dies_at(2))
    seen: list[str] = []
    arr, _ = cache.load_images(
        paths, 16, cache_dir=folder, workers=1, chunk=4,
        decode=lambda j: seen.append(j[0]) or cache._decode(j),
    )  # fmt: skip
    assert seen == paths
    fresh, _ = cache.load_images(paths, 16, cache_dir=tmp_path / "fresh", workers=1)
    assert np.array_equal(arr, fresh)


_READER = """
import hashlib, sys
import numpy as np
from medxfer.data.cache import load_images
paths = sys.argv[2:]
arr, _ = load_images(paths, 16, cache_dir=sys.argv[1], workers=1,
                     decode=lambda j: (_ for _ in ()).throw(AssertionError("decoded again")))
mapped = sys.argv[1] in open("/proc/self/maps").read()
digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
print(digest, isinstance(arr, np.memmap), mapped)
"""


def test_two_processes_read_one_cache_file(tmp_path: Path) -> None:
    paths, folder = _pngs(tmp_path, 30), tmp_path / "c"
    mine, _ = cache.load_images(paths, 16, cache_dir=folder, workers=1)
    digest = hashlib.sha256(np.ascontiguousarray(mine).tobytes()).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = run([sys.executable, "-c", _READER, str(folder), *paths], timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [digest, "True", "True"]  # same pixels, mapped, not decoded


def _entry(folder: Path, key: str, n: int, last_use: float) -> None:
    folder.mkdir(exist_ok=True)
    np.save(folder / f"images-{key}.npy", np.zeros((n, 4, 4), np.uint8))
    meta = {"format": cache.FORMAT, "n": n, "size": 4, "color": "gray", "resize": "pad",
            "unreadable": {}, "source": "/data/x"}  # fmt: skip
    (folder / f"images-{key}.json").write_text(json.dumps(meta))
    for f in folder.glob(f"images-{key}.*"):
        os.utime(f, (last_use, last_use))


def test_cache_clear_removes_only_medxfer_cache_files(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, now = tmp_path / "c", time.time()
    _entry(folder, "a" * 20, 100, now - 10 * 86400)
    _entry(folder, "b" * 20, 100, now - 3600)
    foreign = [folder / "notes.txt", folder / "images-mine.npy", folder / "weights.npy"]
    for f in foreign:
        f.write_text("keep me")
    (folder / f"images-{'c' * 20}.json").write_text('{"something": "else"}')  # not our sidecar
    (folder / f"images-{'c' * 20}.npy").write_text("not ours either")
    foreign += [folder / f"images-{'c' * 20}.json", folder / f"images-{'c' * 20}.npy"]
    assert main(["cache", "list", "--dir", str(folder)]) == 0
    listed = capsys.readouterr().out
    assert "a" * 20 in listed and "b" * 20 in listed and "c" * 20 not in listed
    assert main(["cache", "clear", "--dir", str(folder), "--older-than", "5"]) == 0
    assert not (folder / f"images-{'a' * 20}.npy").exists()
    assert (folder / f"images-{'b' * 20}.npy").exists()
    assert main(["cache", "clear", "--dir", str(folder), "--all"]) == 0
    assert sorted(folder.iterdir()) == sorted(foreign)
    assert main(["cache", "clear", "--dir", str(folder)]) == 2  # says what to pass


def test_cache_clear_max_bytes_evicts_least_recently_used(tmp_path: Path) -> None:
    folder, now = tmp_path / "c", time.time()
    for i, key in enumerate(("d" * 20, "e" * 20, "f" * 20)):
        _entry(folder, key, 1000, now - 100 * (3 - i))  # d oldest, f newest
    one = sum(f.stat().st_size for f in folder.glob(f"images-{'f' * 20}.*"))
    gone = cache_admin.clear(folder, max_bytes=2 * one)
    assert [e.key for e in gone] == ["d" * 20]
    assert [e.key for e in cache_admin.entries(folder)] == ["e" * 20, "f" * 20]
    assert cache_admin.parse_bytes("1.5K") == 1536 and cache_admin.parse_bytes("20G") == 20 << 30


def test_cache_clear_leaves_a_running_build_alone(tmp_path: Path) -> None:
    paths, folder = _pngs(tmp_path, 8), tmp_path / "c"

    def dies(job: cache.Job) -> tuple[np.ndarray | None, str]:
        if paths.index(job[0]) >= 4:
            raise RuntimeError("killed")
        return cache._decode(job)

    with pytest.raises(RuntimeError):
        cache.load_images(paths, 16, cache_dir=folder, workers=1, chunk=4, decode=dies)
    (entry,) = cache_admin.entries(folder)
    assert entry.state == "partial"
    lock = os.open(_only(folder, ".lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a build in progress holds it
        assert cache_admin.clear(folder, everything=True) == []
    finally:
        os.close(lock)
    assert [e.key for e in cache_admin.clear(folder, everything=True)] == [entry.key]
    assert list(folder.iterdir()) == []


def test_prepared_images_index_the_memory_map(synth_root: Path) -> None:
    from medxfer.config import DataConfig
    from medxfer.data.prepare import prepare

    data = prepare(DataConfig(root=str(synth_root), image_size=32))
    (part,) = data.images.parts
    base = part
    while isinstance(base, np.ndarray):  # no copy of the pixels: a view of the file's map
        base = base.base
    assert isinstance(base, mmap.mmap)
    idx = data.split_index["val"]
    rows = data.images.rows[idx.numpy()]
    assert torch.equal(data.images[idx], torch.from_numpy(np.asarray(part)[rows]))


def test_image_store_gathers_across_parts() -> None:
    a = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    b = 100 + np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    store = ImageStore([a], np.array([4, 0, 2])).extend(b)
    assert store.shape == (6, 2, 2) and len(store) == 6 and store.dim() == 3
    whole = np.concatenate([a[[4, 0, 2]], b])
    for idx in (torch.tensor([5, 0, 3, 1]), np.array([2, 2]), slice(1, 5), [0]):
        assert np.array_equal(store[idx].numpy(), whole[idx])
    mask = torch.tensor([True, False, False, True, True, False])
    assert np.array_equal(store[mask].numpy(), whole[mask.numpy()])
    assert np.array_equal(store[4].numpy(), whole[4])
    with pytest.raises(IndexError):
        ImageStore([a], np.array([5]))


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_gathers_leave_the_map_out_of_resident_memory(tmp_path: Path) -> None:
    """Reading every image of a memory-mapped cache, in batches and in one large gather, gives
    the stored pixels and leaves the process's file-backed resident memory about where it was:
    the pages stay in the shared page cache, not in this process."""
    data = np.random.default_rng(0).integers(0, 256, (1500, 128, 128), dtype=np.uint8)
    np.save(tmp_path / "c.npy", data)  # 24 MB
    store = ImageStore([np.load(tmp_path / "c.npy", mmap_mode="r")])
    before = _rss_file_mb()
    for start in range(0, 1500, 32):
        batch = store[np.arange(start, min(start + 32, 1500))]
    assert torch.equal(batch, torch.from_numpy(data[-(1500 % 32) :]))
    rows = np.random.default_rng(1).permutation(1500)
    assert torch.equal(store[rows], torch.from_numpy(data[rows]))  # chunked, in order
    assert _rss_file_mb() - before < 8


def test_only_read_only_maps_are_released(tmp_path: Path) -> None:
    """A copy-on-write map keeps the changes made to it: the store releases only maps opened
    read-only (the decode cache's)."""
    np.save(tmp_path / "c.npy", np.zeros((4, 8, 8), np.uint8))
    cow = np.load(tmp_path / "c.npy", mmap_mode="c")
    cow[0] = 7
    store = ImageStore([cow])
    assert store.maps == [None]
    assert int(store[0].max()) == 7 and int(store[np.arange(4)][0].max()) == 7
    ro = ImageStore([np.load(tmp_path / "c.npy", mmap_mode="r")])
    assert ro.maps[0] is not None
