"""Collect the GPU runs of bench/gpu/brain_224.sh into bench/results/<name>.json.

    python bench/gpu/collect.py runs/bench/gpu/brain224-s* --name accuracy-brain-tumor-mri-gpu224 \
        --log /work/.device/4/log.txt --command 'bash bench/gpu/brain_224.sh $OUT 30 0 1 2'

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

from medxfer.evaluate.metrics import run_summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--data", default="../shared/data/brain-tumor-mri (packed by bench/gpu/pack.py)")
    args = p.parse_args()
    rows = {}
    for run in sorted(args.runs):
        m = json.loads((run / "metrics.json").read_text())
        rows[run.name] = run_summary(m) | {
            "compute": m["compute"],
            "config": (run / "config.yaml").read_text(),
        }
    accs = [r["test_accuracy"] for r in rows.values()]
    log = args.log.read_text().splitlines()
    save(
        args.name,
        {
            "runs": rows,
            "test_accuracy_mean": statistics.mean(accs),
            "test_accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "gpu_machine": log[:2],
            "gpu_command": args.command,
            "data": args.data,
            "note": "run on a lent GPU machine; 'machine' below is where this JSON was written",
        },
    )


if __name__ == "__main__":
    main()
