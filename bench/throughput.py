"""Training throughput of `medxfer train` against the plain PyTorch reference loop, side by side.

    python bench/throughput.py [--data ../shared/data/brain-tumor-mri/train] [--steps 30]

Per architecture (efficientnet_lite0, resnet18; 224 px, batch 32, random init for all three so
only the arithmetic differs): the reference loop (`../shared/bench/reference_train.py`), medxfer
training (steps after the first 3 of an epoch are timed; the one-time decode into the cache is
reported separately), and the compute-only ceiling: the same model with the compute settings
medxfer picks (memory format, precision) on random tensors already in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, RESULTS, SHARED_DATA, abspath, medxfer_cmd, run, save


def ceiling(arch: str, size: int, batch: int, steps: int, warmup: int = 3) -> dict[str, Any]:
    import torch

    from medxfer.config import TrainConfig
    from medxfer.models import create_model
    from medxfer.train.compute import resolve

    c = resolve(TrainConfig())
    torch.manual_seed(0)
    model = create_model(arch, weights="none", num_classes=4).model.train()
    fmt = torch.channels_last if c.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with c.autocast():
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    return {
        "images_per_s": round(steps * batch / seconds, 2),
        "channels_last": c.channels_last,
        "precision": str(c.dtype) if c.dtype else "fp32",
        "seconds": round(seconds, 2),
    }


def medxfer(arch: str, data: Path, size: int, batch: int, steps: int, work: Path) -> dict[str, Any]:
    run_dir = work / f"mx-{arch}"
    cmd = [
        *medxfer_cmd(),
        "train",
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--force",
        f"model.arch={arch}",
        "model.weights=none",
        f"data.image_size={size}",
        f"train.batch_size={batch}",
        "train.epochs=1",
        f"train.steps_per_epoch={steps + 3}",
        "train.optimizer=sgd",
        "train.lr=0.01",
        "data.val_fraction=0.02",
        "data.test_fraction=0.02",
        "eval.n_bootstrap=10",
        "train.eval_batch_size=64",
    ]
    _, seconds = run(cmd, work / f"mx-{arch}.log")
    hist = json.loads((run_dir / "history.json").read_text())[0]
    return {
        "images_per_s": round(hist["train_images_per_s"], 2),
        "command": " ".join(cmd),
        "timed_steps": steps,
        "whole_command_seconds": round(seconds, 1),
    }


_ARCH_KEYS = (
    "medxfer_images_per_s", "reference_images_per_s", "ceiling_images_per_s",
    "speedup_vs_reference", "fraction_of_ceiling", "medxfer", "reference", "ceiling",
)  # fmt: skip


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median images/s (all rounds are kept in the JSON too)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return dict(ordered[len(ordered) // 2])


def reference(script: Path, arch: str, args: argparse.Namespace) -> dict[str, Any]:
    common = ["--arch", arch, "--size", str(args.size), "--batch-size", str(args.batch_size)]
    cmd = [sys.executable, str(script), "--data", str(args.data), *common]
    out, _ = run([*cmd, "--steps", str(args.steps)])
    return dict(json.loads(out.strip().splitlines()[-1]))


def ceiling_child(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--ceiling-only", "--archs", arch, "--size", str(args.size)]
    out, _ = run([*cmd, "--batch-size", str(args.batch_size), "--steps", str(args.steps)])
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=abspath, default=SHARED_DATA / "brain-tumor-mri" / "train")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--archs", nargs="+", default=["efficientnet_lite0", "resnet18"])
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians reported")
    p.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ceiling_only:  # child process: keeps each measurement in a fresh interpreter
        print(json.dumps(ceiling(args.archs[0], args.size, args.batch_size, args.steps)))
        return
    ref_script = REPO.parent / "shared" / "bench" / "reference_train.py"
    work = Path(tempfile.mkdtemp(prefix="medxfer-throughput-"))
    # Build the decode cache once, untimed (that is the point: later runs never decode again).
    t0 = time.perf_counter()
    from medxfer.config import DataConfig
    from medxfer.data.prepare import prepare

    prepare(
        DataConfig(root=str(args.data), image_size=args.size, val_fraction=0.02, test_fraction=0.02)
    )
    cache_seconds = time.perf_counter() - t0
    results: dict[str, Any] = {}
    for arch in args.archs:
        refs, mxs, ceils = [], [], []
        for _ in range(args.repeats):  # interleaved rounds: drift hits all three alike
            refs.append(reference(ref_script, arch, args))
            mxs.append(medxfer(arch, args.data, args.size, args.batch_size, args.steps, work))
            ceils.append(ceiling_child(arch, args))
        ref, mx, ceil = _median(refs), _median(mxs), _median(ceils)
        for d, runs in ((ref, refs), (mx, mxs), (ceil, ceils)):
            d["rounds_images_per_s"] = [x["images_per_s"] for x in runs]
        r = {
            "medxfer_images_per_s": mx["images_per_s"],
            "reference_images_per_s": ref["images_per_s"],
            "ceiling_images_per_s": ceil["images_per_s"],
            "speedup_vs_reference": round(mx["images_per_s"] / ref["images_per_s"], 3),
            "fraction_of_ceiling": round(mx["images_per_s"] / ceil["images_per_s"], 3),
            "medxfer": mx,
            "reference": ref,
            "ceiling": ceil,
        }
        results[arch] = r
        print(
            json.dumps({arch: {k: v for k, v in r.items() if not isinstance(v, dict)}}), flush=True
        )
    out_path = RESULTS / "throughput" / "result.json"
    if out_path.exists():  # keep architectures measured by an earlier call (with their dates)
        earlier = json.loads(out_path.read_text())
        if "efficientnet_lite0" not in results and "medxfer" in earlier:
            results["efficientnet_lite0"] = {k: earlier[k] for k in earlier if k in _ARCH_KEYS}
            results["efficientnet_lite0"]["measured"] = earlier.get("date")
        for arch, r in earlier.items():
            if isinstance(r, dict) and "medxfer_images_per_s" in r and arch not in results:
                results[arch] = r | {"measured": r.get("measured", earlier.get("date"))}
    top = results.get("efficientnet_lite0", {})
    payload = {k: v for k, v in top.items()}
    payload |= {a: r for a, r in results.items() if a != "efficientnet_lite0"}
    payload |= {
        "data": str(args.data),
        "size": args.size,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "cache_build_seconds": round(cache_seconds, 1),
        "targets": {
            "efficientnet_lite0_speedup": 1.3,
            "resnet18_speedup": 1.1,
            "fraction_of_ceiling": 0.9,
        },
    }
    save("throughput/result", payload)


if __name__ == "__main__":
    main()
