"""Save + load time of medxfer's model files, pickled (before) against weights-only (now).

    python bench/model_file_io.py [--arch efficientnet_lite0] [--repeats 10] [--structured]

best.pt and last.pt (AdamW state after one step, 30 history rows) are written and read the old
way (``torch.save`` + ``torch.load(weights_only=False)``) and the new way (``atomic_save`` +
``load_checkpoint``, weights only); with ``--structured`` also a channel-pruned model.pt, old: a
pickled module, new: weights + the recipe, rebuilt on load. Median milliseconds of ``repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medxfer.models import create_model
from medxfer.train.checkpoint import atomic_save, load_checkpoint


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def _payloads(arch: str, size: int) -> dict[str, dict[str, Any]]:
    model = create_model(arch, weights="none", num_classes=4).model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, size, size)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    meta = {"arch": arch, "classes": ["a", "b", "c", "d"], "image_size": size, "color": "rgb",
            "resize": "pad", "mean": [0.5] * 3, "std": [0.5] * 3,
            "config": {"train": {"lr": 1e-3}}}  # fmt: skip
    history = [{"epoch": e, "lr": 1e-3, "train_loss": 0.5, "val_accuracy": 0.7} for e in range(30)]
    best = {"model": model.state_dict(), "meta": meta, "epoch": 3}
    last = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "scaler": None, "epoch": 29, "history": history, "best": 0.7, "stale": 0}  # fmt: skip
    return {"best.pt": best, "last.pt": last}


def _pair(obj: Any, folder: Path, name: str, repeats: int) -> dict[str, float]:
    path = folder / name
    return {
        "old_save_ms": _median_ms(lambda: torch.save(obj, path), repeats),
        "old_load_ms": _median_ms(lambda: torch.load(path, weights_only=False), repeats),
        "new_save_ms": _median_ms(lambda: atomic_save(obj, path), repeats),
        "new_load_ms": _median_ms(lambda: load_checkpoint(path), repeats),
        "bytes": path.stat().st_size,
    }


def _structured(arch: str, size: int, folder: Path, repeats: int) -> dict[str, float]:
    from medxfer.prune.structured import (
        LEGACY_FORMAT,
        load_structured,
        pruned_model,
        save_structured,
        structure_meta,
    )

    dense = create_model(arch, weights="none", num_classes=4).model.state_dict()
    model = pruned_model(arch, dense, 4, 0.4, size)
    meta = structure_meta(_payloads(arch, size)["best.pt"]["meta"], 0.4, 1)
    old, new = folder / "old.pt", folder / "model.pt"
    legacy = {"format": LEGACY_FORMAT, "module": model, "meta": meta}
    return {
        "old_save_ms": _median_ms(lambda: torch.save(legacy, old), repeats),
        "old_load_ms": _median_ms(lambda: torch.load(old, weights_only=False), repeats),
        "new_save_ms": _median_ms(lambda: save_structured(new, model, meta), repeats),
        "new_load_ms": _median_ms(lambda: load_structured(new), repeats),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--structured", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    out: dict[str, Any] = {"arch": args.arch, "repeats": args.repeats,
                           "torch": torch.__version__}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in _payloads(args.arch, args.size).items():
            out[name] = _pair(obj, Path(tmp), name, args.repeats)
        if args.structured:
            out["model.pt (structured)"] = _structured(args.arch, args.size, Path(tmp), 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
