"""Is CPU inference faster with channels-last (NHWC) tensors, and does it change what structured
pruning buys?

    python studies/inference_layout.py [--runs DIR ...] [--archs resnet18 ...]
        [--sizes 64 224] [--batches 1 32] [--blocks 5] [--onnxruntime] [--fold]
        [--cuts 2.0 2.5 3.0] [--out NAME]

``--runs``: model folders or files any medxfer command loads (a training run, a
``prune-structured`` folder); the first is the baseline of the speed-ups. ``--archs``: registry
architectures with random weights (latency does not depend on the values), for a machine
without runs. Each model is timed in both layouts at every input size and batch (and, with
``--onnxruntime``, exported to ONNX and run by onnxruntime's CPU provider with as many
intra-op threads): median ms per forward over ``--repeats`` calls, every model in both
layouts called round-robin, then every ONNX model, in ``--blocks`` independent blocks (the
spread across blocks is the timing noise of this machine). ``--fold``: every model also as
``<name>+folded``, its BatchNorms folded into the convolutions as ``medxfer predict`` runs it
(``medxfer.models.fuse``). ``--cuts``: every ``--archs`` model also channel-pruned (L1, the
Torch-Pruning call of ``medxfer prune-structured``) to each MACs cut, as
``<arch>@<cut>x``: how deep a cut must go for a given CPU speed-up, before training one.
Writes studies/results/inference-layout/<--out>.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import STUDY_RESULTS, abspath, save

LAYOUTS = ("contiguous", "channels_last")
ONNX = "onnxruntime"


def load(runs: list[Path], archs: list[str]) -> dict[str, Any]:
    from medxfer.evaluate.predict import load_trained
    from medxfer.models import create_model

    models: dict[str, Any] = {}
    for run in runs:
        models[run.name] = load_trained(run)[0]
    for arch in archs:
        models[arch] = create_model(arch, weights="none", num_classes=4).model.eval()
    return models


def add_cuts(base: dict[str, Any], archs: list[str], cuts: list[float], size: int
             ) -> dict[str, dict[str, float]]:  # fmt: skip
    """``<arch>@<cut>x`` beside every random-weight ``arch`` (in place): its channels pruned
    for that MACs cut at ``size``; returns each copy's ratio and measured MACs cut."""
    from medxfer.models.registry import entry
    from medxfer.prune.structured import count, prune_channels, ratio_for_speedup

    info = {}
    for arch in archs:
        head, dense = entry(arch).head, count(base[arch], size)["macs"]
        for cut in cuts:
            ratio = ratio_for_speedup(base[arch], head, size, cut)
            pruned = prune_channels(copy.deepcopy(base[arch]), head, ratio, size).eval()
            name = f"{arch}@{cut:g}x"
            base[name] = pruned
            info[name] = {"ratio": ratio, "macs_cut": dense / count(pruned, size)["macs"]}
    return info


def add_folded(base: dict[str, Any], size: int) -> dict[str, int]:
    """``<name>+folded`` beside every model (in place); returns how many BatchNorms each lost."""
    import torch

    from medxfer.models.fuse import fold_batchnorm

    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    counts = {}
    for name, m in list(base.items()):
        base[f"{name}+folded"], counts[name] = fold_batchnorm(copy.deepcopy(m), example)
    return counts


def _onnx_sessions(base: dict[str, Any], size: int, workdir: Path) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from medxfer.prune.export import export_onnx, ort_options

    opts = ort_options()  # torch's thread count, no spin-waiting between runs
    sessions = {}
    for name, m in base.items():
        path = export_onnx(copy.deepcopy(m).to(memory_format=torch.contiguous_format), size,
                           workdir / f"{name}-{size}.onnx")  # fmt: skip
        sessions[name] = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    return sessions


def time_rows(
    base: dict[str, Any], sizes: list[int], batches: list[int], repeats: list[int],
    blocks: int, onnxruntime: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per model, input size and batch: the median over blocks of each block's median
    ms, per backend (both PyTorch layouts, and onnxruntime if asked), with every block's value,
    the speed-up over the first model in the same backend, and channels-last over contiguous."""
    import torch

    from medxfer.prune.export import round_robin_ms

    backends = [*LAYOUTS, *([ONNX] if onnxruntime else [])]
    formats = {LAYOUTS[0]: torch.contiguous_format, LAYOUTS[1]: torch.channels_last}
    variants = {f"{name}/{layout}": copy.deepcopy(m).to(memory_format=formats[layout])
                for name, m in base.items() for layout in LAYOUTS}  # fmt: skip
    first = next(iter(base))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            sessions = _onnx_sessions(base, size, Path(tmp)) if onnxruntime else {}
            for i, batch in enumerate(batches):
                reps = repeats[min(i, len(repeats) - 1)]
                x = torch.randn(batch, 3, size, size)
                inputs = {layout: x.contiguous(memory_format=f) for layout, f in formats.items()}
                calls = {key: partial(m, inputs[key.rsplit("/", 1)[1]])
                         for key, m in variants.items()}  # fmt: skip
                feed = {"image": x.numpy()}
                # a runtime's calls alternate among themselves only: one runtime's threads
                # waking or winding down must not land in the other's timings
                ort_calls = {f"{name}/{ONNX}": partial(s.run, None, feed)
                             for name, s in sessions.items()}  # fmt: skip
                timed: list[dict[str, float]] = []
                with torch.inference_mode():
                    for _ in range(blocks):
                        block = round_robin_ms(calls, reps)
                        if ort_calls:
                            block |= round_robin_ms(ort_calls, reps)
                        timed.append(block)
                for name in base:
                    row: dict[str, Any] = {"model": name, "image_size": size, "batch": batch,
                                           "threads": torch.get_num_threads()}  # fmt: skip
                    for be in backends:
                        ms = [b[f"{name}/{be}"] for b in timed]
                        row[f"{be}_ms"] = statistics.median(ms)
                        row[f"{be}_ms_blocks"] = [round(v, 2) for v in ms]
                        if name != first:  # speed-up over the baseline, per block, same backend
                            per = [b[f"{first}/{be}"] / b[f"{name}/{be}"] for b in timed]
                            row[f"speedup_over_{first}_{be}"] = statistics.median(per)
                            row[f"speedup_over_{first}_{be}_blocks"] = [round(v, 3) for v in per]
                    per = [b[f"{name}/{LAYOUTS[0]}"] / b[f"{name}/{LAYOUTS[1]}"] for b in timed]
                    row["channels_last_speedup"] = statistics.median(per)
                    row["channels_last_speedup_blocks"] = [round(v, 3) for v in per]
                    rows.append(row)
                    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                           if not k.endswith("_blocks")}, flush=True)  # fmt: skip
    return rows


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=abspath, nargs="*", default=[])
    p.add_argument("--archs", nargs="*", default=[])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, nargs="+", default=[30, 5],
                   help="calls per block at each batch size (one value: all)")  # fmt: skip
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--onnxruntime", action="store_true", help="also time onnxruntime's CPU run")
    p.add_argument("--fold", action="store_true", help="also time BatchNorm-folded copies")
    p.add_argument("--cuts", type=float, nargs="*", default=[],
                   help="MACs cuts: --archs models also channel-pruned to each")  # fmt: skip
    p.add_argument("--out", default="result")
    args = p.parse_args()
    if not args.runs and not args.archs:
        p.error("give --runs or --archs")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load(args.runs, args.archs)
    sources = {name: str(run) for name, run in zip(base, [*args.runs, *args.archs], strict=True)}
    cuts = add_cuts(base, args.archs, args.cuts, min(args.sizes)) if args.cuts else None
    folded = add_folded(base, min(args.sizes)) if args.fold else None
    rows = time_rows(base, args.sizes, args.batches, args.repeats, args.blocks, args.onnxruntime)
    save(f"inference-layout/{args.out}", root=STUDY_RESULTS, payload={
        "models": sources, "cuts": cuts, "batchnorms_folded": folded,
        "baseline": next(iter(base)), "threads": torch.get_num_threads(), "blocks": args.blocks,
        "repeats": args.repeats, "statistic": "median over blocks of each block's median ms",
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
