"""bench/ticket_seeds.py --combine: a study grows by seeds only under the protocol it was made
with (a setting added to medxfer since may be set back to the earlier behaviour)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from medxfer.errors import MedxferError

LOTTERY = "7 levels to 80% sparsity, rewind lr, no controls, head not pruned"


def test_combine_keeps_earlier_seeds_of_the_same_protocol_only(
    bench_module: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    ticket_seeds = bench_module("ticket_seeds")
    protocol = ["model.arch=efficientnet_lite0", "train.threads=2"]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({
        "protocol": {"overrides": protocol, "lottery": LOTTERY},
        "runs": [{"seed": s, "difference_points": -s} for s in range(3)],
    }))  # fmt: skip
    rows, restored = ticket_seeds.combined(earlier, protocol, LOTTERY, [2, 5])
    assert [r["seed"] for r in rows] == [0, 1] and restored == []  # seed 2 is trained again
    # a setting added since, at the value that gives the earlier behaviour, is allowed...
    (added,) = ticket_seeds.ADDED_SINCE
    rows, restored = ticket_seeds.combined(earlier, [*protocol, added], LOTTERY, [5])
    assert len(rows) == 3 and restored == [added]
    # ...any other difference is refused: another override, another lottery
    for other, lottery in (([*protocol, "train.epochs=6"], LOTTERY), (protocol, "4 levels")):
        with pytest.raises(MedxferError, match="used another protocol"):
            ticket_seeds.combined(earlier, other, lottery, [5])
    # so is a file that is not such a result
    with pytest.raises(MedxferError, match="cannot read a ticket-seeds result"):
        ticket_seeds.combined(tmp_path / "missing.json", protocol, LOTTERY, [5])
