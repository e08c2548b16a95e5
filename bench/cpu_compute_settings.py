"""Which compute settings are fastest for training on this CPU: memory format x precision.

    python bench/cpu_compute_settings.py [--archs resnet18 efficientnet_lite0] [--steps 10]

Random tensors already in memory, SGD, 224 px, batch 32; each setting in a fresh process.
medxfer's CPU defaults (channels-last, fp32) in src/medxfer/train/compute.py follow this table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from _common import run, save


def measure(arch: str, channels_last: bool, bf16: bool, steps: int, warmup: int = 3) -> float:
    import contextlib

    import torch

    from medxfer.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, weights="none", num_classes=4).model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * 32 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "efficientnet_lite0"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        arch, cl, bf = args.child
        print(json.dumps(measure(arch, cl == "1", bf == "1", args.steps)))
        return
    table: dict[str, Any] = {}
    for arch in args.archs:
        row = {}
        for cl in ("0", "1"):
            for bf in ("0", "1"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    arch,
                    cl,
                    bf,
                    "--steps",
                    str(args.steps),
                ]
                out, _ = run(cmd)
                fmt = "channels_last" if cl == "1" else "contiguous"
                key = f"{fmt}_{'bf16' if bf == '1' else 'fp32'}"
                row[key] = round(float(out.strip().splitlines()[-1]), 2)
        row["channels_last_gain"] = round(row["channels_last_fp32"] / row["contiguous_fp32"] - 1, 3)
        row["bf16_gain"] = round(row["channels_last_bf16"] / row["channels_last_fp32"] - 1, 3)
        table[arch] = row
        print(json.dumps({arch: row}), flush=True)
    save(
        "cpu-compute-settings/result",
        {"images_per_s": table, "size": 224, "batch_size": 32, "steps": args.steps},
    )


if __name__ == "__main__":
    main()
