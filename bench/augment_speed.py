"""Images per second of the batch augmentation, standard against robust policy.

    python bench/augment_speed.py [--size 224] [--batch 32] [--repeats 7] [--threads 1]

``medxfer.data.loader.augment_batch`` on a batch of random float images (B x 3 x size x size),
each call with a fresh epoch generator; the median of ``--repeats`` calls per policy, the
policies interleaved. Timed in CPU seconds of this process (``time.process_time``: with one
thread, the work itself, whatever else loads the machine) and in wall seconds. Writes
bench/results/augment-speed/cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, cast

import torch
from _common import machine, save

from medxfer.config import AugmentConfig
from medxfer.data.loader import augment_batch, epoch_generator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    policies = ("standard", "robust")
    cpu: dict[str, list[float]] = {p: [] for p in policies}
    wall: dict[str, list[float]] = {p: [] for p in policies}
    for r in range(args.repeats + 1):
        for p in policies:
            c0, t0 = time.process_time(), time.perf_counter()
            augment_batch(x, AugmentConfig(policy=cast(Any, p)), epoch_generator(0, r))
            if r:  # the first round warms up
                cpu[p].append(time.process_time() - c0)
                wall[p].append(time.perf_counter() - t0)
    out = {p: {"median_cpu_seconds": statistics.median(cpu[p]),
               "median_wall_seconds": statistics.median(wall[p]),
               "images_per_cpu_second": args.batch / statistics.median(cpu[p]),
               "images_per_wall_second": args.batch / statistics.median(wall[p])}
           for p in policies}  # fmt: skip
    for p, v in out.items():
        print(
            f"{p}: {v['images_per_cpu_second']:.0f} images per CPU second "
            f"({v['images_per_wall_second']:.0f} per wall second)"
        )
    save("augment-speed/cpu", {"machine": machine(), "batch": args.batch, "size": args.size,
                           "threads": args.threads, "repeats": args.repeats,
                           "policies": out})  # fmt: skip


if __name__ == "__main__":
    main()
