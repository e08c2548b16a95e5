"""Collect the GPU runs of bench/gpu/brain_224.sh into bench/results/<benchmark>/<variant>.json.

    python bench/gpu/collect.py runs/bench/gpu/brain224-s* --name accuracy/brain-tumor-mri-gpu224 \
        --log /work/.device/4/log.txt --command 'bash bench/gpu/brain_224.sh $OUT 30 0 1 2'

Runs that share a folder name (the tickets of a lottery: ``prune-*/level_*/ticket``) are keyed
by their last two path parts, in level order, with the sparsity of their level in the
lottery's ``lottery.json`` (None outside a lottery).

Each run folder is what the GPU machine sent back (checkpoints excluded): config.yaml,
metrics.json, history, figures. The machine line is the script's nvidia-smi/torch output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import save

from medxfer.evaluate.metrics import run_summary, split_shift


def sparsity(run: Path) -> float | None:
    lottery = run.parent.parent / "lottery.json"
    if not lottery.exists():
        return None
    for level in json.loads(lottery.read_text())["levels"]:
        if f"level_{level['level']}" == run.parent.name:
            return float(level["sparsity"])
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--data", default="../shared/data/brain-tumor-mri (packed by bench/gpu/pack.py)")
    p.add_argument("--note", default="")
    args = p.parse_args()
    names = [run.name for run in args.runs]
    rows = {}
    for run in sorted(args.runs, key=lambda r: (str(r.parent), r.name)):
        m = json.loads((run / "metrics.json").read_text())
        key = run.name if names.count(run.name) == 1 else f"{run.parent.name}/{run.name}"
        rows[key] = run_summary(m) | {
            "sparsity": sparsity(run),
            "val_accuracy": m["val"]["accuracy"],
            "val_test_shifted_classes": [
                c["class"] for c in split_shift(m["val"], m["test"]) if c["shifted"]
            ],
            "compute": m["compute"],
            "config": (run / "config.yaml").read_text(),
        }
    # the mean over repeated runs (seeds), not over a lottery's levels
    accs = [r["test_accuracy"] for r in rows.values() if r["sparsity"] is None]
    log = [line for line in args.log.read_text().splitlines() if "───" not in line]
    save(
        args.name,
        {
            "runs": rows,
            "test_accuracy_mean": statistics.mean(accs),
            "test_accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "gpu_machine": log[:2],
            "gpu_command": args.command,
            "data": args.data,
            "note": "run on a lent GPU machine; 'machine' below is where this JSON was written"
            + (f"; {args.note}" if args.note else ""),
        },
    )


if __name__ == "__main__":
    main()
