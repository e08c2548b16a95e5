"""Generator steps per second of medxfer's WGAN-GP trainer (5 critic steps each) on this machine.

    python bench/gan_speed.py                          # 64 and 128 px, widths 24 and 64
    python bench/gan_speed.py --sizes 64 --widths 24 --batch 32 --steps 5

Random uint8 images stand in for data (the step cost does not depend on the pixels). The
device is the trainer's own choice (gan.device=auto: CUDA when present). Use it to size
`gan.steps` / `gan.max_minutes` before a real `medxfer gan train`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import save

from medxfer.config import GanConfig
from medxfer.gan.data import GanData, resolve_device
from medxfer.gan.loop import GanLoop


def steps_per_second(size: int, width: int, batch: int, steps: int) -> dict[str, Any]:
    device = resolve_device("auto")
    images = torch.randint(0, 256, (2048, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 3, (2048,))
    gc = GanConfig(image_size=size, width=width, batch_size=batch)
    data = GanData(images, labels, ["a", "b", "c"], {}, "gray", "pad")
    loop = GanLoop(gc, data, images, labels, 3, device, hflip=False)
    loop.train_step()  # warm-up (cuDNN autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {"image_size": size, "width": width, "batch_size": batch, "device": str(device),
            "seconds_per_generator_step": round(seconds, 4),
            "generator_steps_per_minute": round(60 / seconds, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--widths", type=int, nargs="+", default=[24, 64])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--name", default="result", help="bench/results/gan-speed/<name>.json")
    args = p.parse_args()
    rows = []
    for size in args.sizes:
        for width in args.widths:
            rows.append(steps_per_second(size, width, args.batch, args.steps))
            print(rows[-1], flush=True)
    save(f"gan-speed/{args.name}", {"rows": rows, "n_critic": 5, "timed_steps": args.steps})


if __name__ == "__main__":
    main()
