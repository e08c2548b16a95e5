"""Lottery-ticket pruning: masks as data, pure pruning functions, rewinding on top of ``fit``.

from medxfer.prune import run_lottery
run_lottery(cfg, Path("runs/lottery"), levels=5, fraction=0.2, rewind="epoch:1")
"""

from __future__ import annotations

from medxfer.prune.export import export_run, load_compact, load_compact_model, save_compact
from medxfer.prune.lottery import run_lottery
from medxfer.prune.magnitude import (
    attach,
    global_magnitude_prune,
    make_permanent,
    plain_state_dict,
    prune_count,
)
from medxfer.prune.mask import Mask, check_fits, random_like

__all__ = [
    "Mask",
    "attach",
    "check_fits",
    "export_run",
    "global_magnitude_prune",
    "load_compact",
    "load_compact_model",
    "make_permanent",
    "plain_state_dict",
    "prune_count",
    "random_like",
    "run_lottery",
    "save_compact",
]
