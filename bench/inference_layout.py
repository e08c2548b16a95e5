"""Is CPU inference faster with channels-last (NHWC) tensors, and does it change what structured
pruning buys?

    python bench/inference_layout.py [--runs DIR ...] [--archs resnet18 ...]
        [--sizes 64 224] [--batches 1 32] [--blocks 5] [--out NAME]

``--runs``: model folders or files any medxfer command loads (a training run, a
``prune-structured`` folder); the first is the baseline of the speed-ups. ``--archs``: registry
architectures with random weights (latency does not depend on the values), for a machine
without runs. Each model is timed in both layouts at every input size and batch: median ms per
forward over ``--repeats`` calls, every model and layout called round-robin, in ``--blocks``
independent blocks (the spread across blocks is the timing noise of this machine). Writes
bench/results/<--out>.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from functools import partial
from typing import Any

from _common import abspath, save

LAYOUTS = ("contiguous", "channels_last")


def load(args: argparse.Namespace) -> dict[str, Any]:
    from medxfer.evaluate.predict import load_trained
    from medxfer.models import create_model

    models: dict[str, Any] = {}
    for run in args.runs:
        models[run.name] = load_trained(run)[0]
    for arch in args.archs:
        models[arch] = create_model(arch, weights="none", num_classes=4).model.eval()
    return models


def main() -> None:
    import torch

    from medxfer.prune.export import round_robin_ms

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=abspath, nargs="*", default=[])
    p.add_argument("--archs", nargs="*", default=[])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, nargs="+", default=[30, 5],
                   help="calls per block at each batch size (one value: all)")  # fmt: skip
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", default="inference-layout")
    args = p.parse_args()
    if not args.runs and not args.archs:
        p.error("give --runs or --archs")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load(args)
    formats = {LAYOUTS[0]: torch.contiguous_format, LAYOUTS[1]: torch.channels_last}
    variants = {f"{name}/{layout}": copy.deepcopy(m).to(memory_format=formats[layout])
                for name, m in base.items() for layout in LAYOUTS}  # fmt: skip
    first = next(iter(base))
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        for i, batch in enumerate(args.batches):
            repeats = args.repeats[min(i, len(args.repeats) - 1)]
            x = torch.randn(batch, 3, size, size)
            inputs = {layout: x.contiguous(memory_format=f) for layout, f in formats.items()}
            blocks: list[dict[str, float]] = []
            with torch.inference_mode():
                for _ in range(args.blocks):
                    calls = {key: partial(m, inputs[key.rsplit("/", 1)[1]])
                             for key, m in variants.items()}  # fmt: skip
                    blocks.append(round_robin_ms(calls, repeats))
            for name in base:
                row: dict[str, Any] = {"model": name, "image_size": size, "batch": batch}
                for layout in LAYOUTS:
                    ms = [b[f"{name}/{layout}"] for b in blocks]
                    row[f"{layout}_ms"] = statistics.median(ms)
                    row[f"{layout}_ms_blocks"] = [round(v, 2) for v in ms]
                    if name != first:  # speed-up over the baseline, per block, same layout
                        per = [b[f"{first}/{layout}"] / b[f"{name}/{layout}"] for b in blocks]
                        row[f"speedup_over_{first}_{layout}"] = statistics.median(per)
                        row[f"speedup_over_{first}_{layout}_blocks"] = [round(v, 3) for v in per]
                per = [b[f"{name}/{LAYOUTS[0]}"] / b[f"{name}/{LAYOUTS[1]}"] for b in blocks]
                row["channels_last_speedup"] = statistics.median(per)
                row["channels_last_speedup_blocks"] = [round(v, 3) for v in per]
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                       if not k.endswith("_blocks")})  # fmt: skip
    save(args.out, {
        "models": {name: str(run) for name, run in zip(base, [*args.runs, *args.archs],
                                                        strict=True)},
        "baseline": first, "threads": torch.get_num_threads(), "blocks": args.blocks,
        "repeats": args.repeats, "statistic": "median over blocks of each block's median ms",
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
