"""Which fine-tuning learning rate should `medxfer prune-structured` default to?

    python studies/structured_lr.py <dense run> [<dense run> ...] [--scales 0.3 1.0]
        [--speedup 2.5] [--epochs 8] [--out-dir DIR]

The default `structured.lr_scale` (then `prune.structured_lr_scale`; 0.3x the dense run's
learning rate) was set before the pruning benchmark measured 1.0x better, but that comparison
also changed the epochs (3 -> 8). This runs `medxfer prune-structured` on the same dense runs
with the same ratio and epochs and only the scale changed (no latency: accuracy is the
question), and records val and test accuracy of each. Writes
studies/results/structured-lr/result.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import REPO, STUDY_RESULTS, abspath, medxfer_cmd, run, save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=abspath, nargs="+", help="finished dense run folders")
    p.add_argument("--scales", type=float, nargs="+", default=[0.3, 1.0])
    p.add_argument("--speedup", type=float, default=2.5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out-dir", type=abspath, default=REPO / "runs" / "bench" / "structured-lr")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. train.threads=2")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for dense in args.runs:
        for scale in args.scales:
            out = args.out_dir / f"{dense.parent.name}-{dense.name}-lr{scale:g}"
            cmd = [*medxfer_cmd(), "prune-structured", str(dense),
                   f"structured.lr_scale={scale}", *args.extra, "--speedup",
                   str(args.speedup), "--epochs", str(args.epochs), "--out", str(out),
                   "--no-latency"]  # fmt: skip
            _, seconds = run(cmd)
            report = json.loads((out / "structured.json").read_text())
            metrics = json.loads((out / "metrics.json").read_text())
            rows.append({
                "dense_run": str(dense),
                "lr_scale": scale,
                "finetune": report["finetune"],
                "macs_speedup": report["macs_speedup"],
                "dense_test_accuracy": report["dense"]["test_accuracy"],
                "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
                "test_accuracy": metrics["test"]["accuracy"],
                "test_balanced_accuracy": metrics["test"]["balanced_accuracy"],
                "seconds": round(seconds, 1),
                "command": " ".join(cmd),
            })  # fmt: skip
            print({k: rows[-1][k] for k in ("dense_run", "lr_scale", "val_balanced_accuracy",
                                             "test_accuracy", "seconds")})  # fmt: skip
    save(
        "structured-lr/result",
        {"speedup": args.speedup, "epochs": args.epochs, "rows": rows},
        STUDY_RESULTS,
    )


if __name__ == "__main__":
    main()
