"""Collect finished experiment folders into the paper's results table.

    python bench/paper_table.py runs/experiments/cpu-brain-tumor runs/experiments/cpu-pneumonia

writes bench/results/paper-table.json (``rows``: dataset, arch, weights, tuned, pruned, sparsity,
test accuracy and balanced accuracy with 95% intervals, the command) and paper-table.md; the
same as ``medxfer paper-table``. Without arguments: every folder under runs/experiments/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medxfer.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    dirs = sys.argv[1:] or [str(p) for p in sorted((ROOT / "runs" / "experiments").glob("*"))]
    out = ROOT / "bench" / "results" / "paper-table.json"
    sys.exit(main(["paper-table", *dirs, "--out", str(out)]))
