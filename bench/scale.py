"""Memory and speed of the decode cache as the dataset grows: the build, training, DDP ranks.

    python bench/scale.py [--work /work/scale-data] [--sizes 6000 20000 60000] [--steps 6]

Generates a synthetic two-class set of 224 px grey PNGs (discs and rings on a shaded, noisy
background) under --work, one CSV manifest per size (the first 64 images are the test split),
and measures, each step in its own process:

* the cache build (``prepare`` of the manifest into an empty cache folder);
* one epoch of ``medxfer train`` capped at --steps steps (Lite0, 224 px, batch 32, 1 thread);
* ``torchrun`` with 1 and with 2 ranks (gloo) at the largest size;
* a full pass of reads: every image gathered once in random batches, by 1 process and by 2 at
  once, which shows the page cache shared instead of copied.

Peak RSS is ``ru_maxrss`` (``VmHWM``) of the process (of each rank under torchrun, sampled from
/proc). It counts the pages of the memory-mapped cache a process has touched, which live once
in the page cache whichever number of processes map them; ``RssAnon`` (sampled) is the memory
private to the process. Writes bench/results/scale/synthetic.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from _common import REPO, save
from _memory import measure

SIZE, TEST_IMAGES, BATCH = 224, 64, 32


def _shapes(rng: Any, ring: bool, count: int = 128) -> list[Any]:
    """``count`` discs or rings at random places and sizes, on a shaded background."""
    import numpy as np

    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    shade = ((yy // 8 + xx // 8) % 16).astype(np.uint8)
    out = []
    for _ in range(count):
        cy, cx = (float(v) for v in rng.uniform(50, SIZE - 50, 2))
        r = float(rng.uniform(18, 45))
        d = np.hypot(yy - cy, xx - cx)
        mask = np.abs(d - r) < r / 5 if ring else d < r
        out.append(50 + 110 * mask.astype(np.uint8) + shade)
    return out


def _png(img: Any) -> bytes:
    """A grey 8-bit PNG of ``img`` with no row filter and zlib level 1: about 3x quicker to
    write than Pillow's (which tries every filter on every row), and read by Pillow as usual."""
    import numpy as np

    h, w = img.shape
    raw = np.zeros((h, w + 1), np.uint8)
    raw[:, 1:] = img  # a leading 0 per row: filter type None

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bit, grey, no interlace
    idat = zlib.compress(raw.tobytes(), 1)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def generate(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` PNGs, even indices discs, odd rings: one of 128 shapes per class plus a noise
    pattern of its own, so every image differs (deterministic per index; resumable: files
    already there are kept)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bank = {"disc": _shapes(rng, ring=False), "ring": _shapes(rng, ring=True)}
    noise = rng.integers(0, 6, 2 * SIZE * SIZE, dtype=np.uint8)
    paths = [folder / ("disc" if i % 2 == 0 else "ring") / f"{i:06d}.png" for i in range(n)]
    for sub in bank:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        if path.exists():
            continue
        off = (i * 7919) % (SIZE * SIZE)
        shape = bank[path.parent.name][(i // 2 * 37) % 128]
        img = shape + noise[off : off + SIZE * SIZE].reshape(SIZE, SIZE)
        tmp = path.with_suffix(".tmp.png")
        tmp.write_bytes(_png(img))
        os.replace(tmp, path)
    return paths


def manifest(work: Path, paths: list[Path], n: int) -> Path:
    out = work / f"manifest-{n}.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for i, p in enumerate(paths[:n]):
            w.writerow([p, p.parent.name, "test" if i < TEST_IMAGES else "train"])
    return out


def _child_build(manifest_path: str, n: int) -> None:
    """Child: ``prepare`` the manifest (builds the cache), print the build's numbers."""
    import json

    from medxfer.config import DataConfig
    from medxfer.data.cache import load_images
    from medxfer.data.prepare import prepare
    from medxfer.data.sources import discover

    cfg = DataConfig(root=manifest_path, image_size=SIZE, val_fraction=_val_fraction(n))
    t0 = time.perf_counter()
    data = prepare(cfg)
    seconds = time.perf_counter() - t0
    assert len(data.samples) == n
    arr, _ = load_images([s.path for s in discover(manifest_path)], SIZE)  # opens, no decoding
    cache = str(getattr(arr, "filename", ""))  # a np.memmap of the decode cache
    print(json.dumps({"prepare_seconds": seconds, "cache_file": cache,
                      "cache_bytes": os.path.getsize(cache)}))  # fmt: skip


def _rollup() -> dict[str, float]:
    keys = ("Rss", "Pss", "Pss_File", "Pss_Anon", "Shared_Clean", "Private_Clean", "Anonymous")
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _wait_all(barrier: Path, tag: str, peers: int) -> None:
    (barrier / f"{tag}-{os.getpid()}").touch()
    deadline = time.time() + 300
    while len(list(barrier.glob(f"{tag}-*"))) < peers and time.time() < deadline:
        time.sleep(0.05)


def _child_read(cache_file: str, barrier_dir: str) -> None:
    """Child: gather every image of the cache once, in random batches, through ``ImageStore``;
    then, while every reader still maps the file, print its ``smaps_rollup`` (the Pss of pages
    shared with another reader is half their Rss)."""
    import json

    import numpy as np

    from medxfer.data.store import ImageStore

    store = ImageStore([np.load(cache_file, mmap_mode="r")])
    order = np.random.default_rng(os.getpid()).permutation(len(store))
    t0, total = time.perf_counter(), 0
    for lo in range(0, len(order), BATCH):
        total += int(store[order[lo : lo + BATCH]][:, 0, 0].sum())
    seconds = time.perf_counter() - t0
    barrier = Path(barrier_dir)
    peers = 2 if barrier.name.endswith("-2") else 1
    _wait_all(barrier, "read", peers)
    print(json.dumps({"read_seconds": round(seconds, 2), **_rollup()}), flush=True)
    _wait_all(barrier, "done", peers)


def _val_fraction(n: int) -> float:
    return round(TEST_IMAGES / (n - TEST_IMAGES), 5)  # about 64 validation images at any size


def train_cmd(
    manifest_path: Path, n: int, run_dir: Path, steps: int, ranks: int, batch: int = BATCH
) -> list[str]:
    launch = [sys.executable, "-m", "medxfer"]
    if ranks:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={ranks}", "-m", "medxfer"]  # fmt: skip
    return [
        *launch, "train", "--data", str(manifest_path), "--run-dir", str(run_dir), "--force",
        "model.arch=efficientnet_lite0", "model.weights=none", f"data.image_size={SIZE}",
        f"data.val_fraction={_val_fraction(n)}", f"train.batch_size={batch}", "train.epochs=1",
        f"train.steps_per_epoch={steps}", "train.threads=1", "train.optimizer=sgd",
        "train.lr=0.01", "train.bn_recalibrate=false", "eval.n_bootstrap=10",
    ]  # fmt: skip


def _images_per_s(run_dir: Path) -> float:
    import json

    return round(json.loads((run_dir / "history.json").read_text())[0]["train_images_per_s"], 2)


def _ranks(m: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((p for p in m["processes"] if p["rank"] >= 0), key=lambda p: p["rank"])


def _anon(m: dict[str, Any]) -> float:
    """The largest sampled RssAnon of the measured process tree."""
    return max((p.get("RssAnon_mb", 0.0) for p in m["processes"]), default=0.0)


def one_size(
    work: Path, paths: list[Path], n: int, steps: int, env: dict[str, str]
) -> dict[str, Any]:
    import json

    mf = manifest(work, paths, n)
    build = measure([sys.executable, __file__, "--child-build", str(mf), str(n)], env,
                    work / "logs" / f"build-{n}.log", work / "cache")  # fmt: skip
    out = json.loads((work / "logs" / f"build-{n}.log").read_text().strip().splitlines()[-1])
    run_dir = work / "runs" / f"train-{n}"
    train = measure(train_cmd(mf, n, run_dir, steps, 0), env, work / "logs" / f"train-{n}.log",
                    work / "cache")  # fmt: skip
    return {
        "images": n, "cache_bytes": out["cache_bytes"], "cache_file": out["cache_file"],
        "build_seconds": round(out["prepare_seconds"], 1),
        "build_peak_rss_mb": build["peak_rss_mb"], "build_peak_anon_mb": _anon(build),
        "train_peak_rss_mb": train["peak_rss_mb"], "train_peak_anon_mb": _anon(train),
        "images_per_s": _images_per_s(run_dir), "train_command_seconds": train["seconds"],
    }  # fmt: skip


def ddp(
    work: Path, paths: list[Path], n: int, steps: int, env: dict[str, str], batch: int
) -> dict[str, Any]:
    """torchrun with 1 rank, then 2 ranks, at ``n`` images (gloo on CPU), ``batch`` per rank."""
    mf, runs = manifest(work, paths, n), {}
    for ranks in (1, 2):
        run_dir = work / "runs" / f"ddp{ranks}-{n}"
        m = measure(train_cmd(mf, n, run_dir, steps, ranks, batch), env,
                    work / "logs" / f"ddp{ranks}-{n}.log", work / "cache")  # fmt: skip
        procs = _ranks(m)
        runs[ranks] = {
            "peak_rss_mb_per_rank": [p.get("VmHWM_mb", 0.0) for p in procs],
            "peak_anon_mb_per_rank": [p.get("RssAnon_mb", 0.0) for p in procs],
            "cache_files_mapped_per_rank": [p["maps_cache"] for p in procs],
            "images_per_s": _images_per_s(run_dir), "command_seconds": m["seconds"],
        }  # fmt: skip
    mapped = [set(f) for f in runs[2]["cache_files_mapped_per_rank"]]
    return {
        "images": n, "ranks": 2, "batch_size_per_rank": batch, **runs[2],
        "shared_cache": len(mapped) == 2 and bool(mapped[0] & mapped[1]),
        "single_rank": runs[1],
    }  # fmt: skip


def _child_read_pair(cache_file: str, barrier: str) -> None:
    procs = [subprocess.Popen([sys.executable, __file__, "--child-read", cache_file, barrier])
             for _ in range(2)]  # fmt: skip
    if any([p.wait() for p in procs]):
        raise SystemExit("a reader failed")


def reads(work: Path, cache_file: str, env: dict[str, str]) -> dict[str, Any]:
    """Every image gathered once by 1 process, then by 2 at once (each its own random order)."""
    import json
    import shutil

    out: dict[str, Any] = {"cache_file": cache_file}
    for n, mode in ((1, "--child-read"), (2, "--child-read-pair")):
        barrier = work / f"barrier-{n}"
        shutil.rmtree(barrier, ignore_errors=True)
        barrier.mkdir()
        log = work / "logs" / f"read{n}.log"
        m = measure([sys.executable, __file__, mode, cache_file, str(barrier)], env, log,
                    work / "cache")  # fmt: skip
        rollups = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
        readers = [p for p in m["processes"] if "--child-read " in p["command"] + " "]
        out[f"{n}_process"] = {"seconds": m["seconds"], "smaps_rollup_mb": rollups,
                               "processes": readers}  # fmt: skip
    return out


def targets(sizes: list[dict[str, Any]], dd: dict[str, Any] | None) -> dict[str, Any]:
    small, large = sizes[0], sizes[-1]
    t: dict[str, Any] = {
        "train_peak_rss_largest_minus_smallest_mb": {
            "value": round(large["train_peak_rss_mb"] - small["train_peak_rss_mb"], 1),
            "anon_value": round(large["train_peak_anon_mb"] - small["train_peak_anon_mb"], 1),
            "limit": 300, "sizes": [small["images"], large["images"]],
        },
        "build_peak_rss_mb": {"value": max(s["build_peak_rss_mb"] for s in sizes),
                              "anon_value": max(s["build_peak_anon_mb"] for s in sizes),
                              "limit": 1024},
    }  # fmt: skip
    if dd is not None:
        one = dd["single_rank"]
        rss = max(dd["peak_rss_mb_per_rank"]) - max(one["peak_rss_mb_per_rank"])
        anon = max(dd["peak_anon_mb_per_rank"]) - max(one["peak_anon_mb_per_rank"])
        t["ddp_rank_minus_single_rank_mb"] = {
            "value": round(rss, 1), "anon_value": round(anon, 1), "limit": 300,
        }  # fmt: skip
    for v in t.values():
        v["met"] = v["value"] <= v["limit"]
        v["measure"] = "value: peak RSS (VmHWM, mapped cache pages included); anon_value: RssAnon"
    # the target is stated for 6,000 against 60,000 images: not met at other sizes
    at = (small["images"], large["images"]) == (6000, 60000)
    t["train_peak_rss_largest_minus_smallest_mb"]["met"] &= at
    t["train_peak_rss_largest_minus_smallest_mb"]["at_the_sizes_of_the_target"] = at
    t["brain_tumor_throughput"] = {"met": None, "note": "not measured here: bench/throughput.py"}
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/work/scale-data"),
                   help="images, manifests, cache and runs (outside the repository)")  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="+", default=[6000, 20000, 60000])
    p.add_argument("--steps", type=int, default=6, help="train.steps_per_epoch (3 are warm-up)")
    p.add_argument("--no-ddp", action="store_true", help="skip the torchrun comparison")
    p.add_argument("--ddp-batch-size", type=int, default=16,
                   help="per rank; each rank's training memory grows with it")  # fmt: skip
    p.add_argument("--child-build", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-read", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-read-pair", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_build:
        return _child_build(args.child_build[0], int(args.child_build[1]))
    if args.child_read:
        return _child_read(*args.child_read)
    if args.child_read_pair:
        return _child_read_pair(*args.child_read_pair)
    from medxfer.data.cache_admin import clear

    work, sizes = args.work.resolve(), sorted(args.sizes)
    if REPO in (work, *work.parents):
        raise SystemExit(f"--work {work} is inside the repository; pick a folder outside it")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    paths = generate(work / "images", sizes[-1])
    generate_seconds = round(time.perf_counter() - t0, 1)
    clear(work / "cache", everything=True)  # every build below starts from nothing
    env = {
        **os.environ,
        "MEDXFER_CACHE": str(work / "cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    results = [one_size(work, paths, n, args.steps, env) for n in sizes]
    for r in results:
        print({k: v for k, v in r.items() if k != "cache_file"}, flush=True)
    dd = None if args.no_ddp else ddp(work, paths, sizes[-1], args.steps, env, args.ddp_batch_size)
    payload = {
        "sizes": results, "ddp": dd, "reads": reads(work, results[-1]["cache_file"], env),
        "targets": targets(results, dd), "generate_seconds": generate_seconds,
        "setup": {"image_size": SIZE, "color": "gray", "batch_size": BATCH,
                  "steps_per_epoch": args.steps, "arch": "efficientnet_lite0",
                  "test_images": TEST_IMAGES, "validation_images": "about 64",
                  "nice": os.nice(0), "work": str(work)},
        # the machine is shared: its load average (1, 5, 15 min) when this started and ended
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }  # fmt: skip
    save("scale/synthetic", payload)


if __name__ == "__main__":
    main()
