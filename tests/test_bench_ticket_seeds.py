"""bench/ticket_seeds.py --combine: a study grows by seeds only under the protocol it was made
with (a setting added to medxfer since may be set back to the earlier behaviour)."""

from __future__ import annotations

import importlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
LOTTERY = "7 levels to 80% sparsity, rewind lr, no controls, head not pruned"


@pytest.fixture
def ticket_seeds(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The bench module, imported without keeping what _common installs process-wide."""
    hook, term = sys.excepthook, signal.getsignal(signal.SIGTERM)
    monkeypatch.syspath_prepend(str(BENCH))
    yield importlib.import_module("ticket_seeds")
    sys.excepthook = hook
    signal.signal(signal.SIGTERM, term)


def test_combine_keeps_earlier_seeds_of_the_same_protocol_only(
    ticket_seeds: ModuleType, tmp_path: Path
) -> None:
    protocol = ["model.arch=efficientnet_lite0", "train.threads=2"]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({
        "protocol": {"overrides": protocol, "lottery": LOTTERY},
        "runs": [{"seed": s, "difference_points": -s} for s in range(3)],
    }))  # fmt: skip
    rows = ticket_seeds.combined(earlier, protocol, LOTTERY, [2, 5])
    assert [r["seed"] for r in rows] == [0, 1]  # seed 2 is trained again, not read
    # a setting added since, at the value that gives the earlier behaviour, is allowed...
    (added,) = ticket_seeds.ADDED_SINCE
    assert len(ticket_seeds.combined(earlier, [*protocol, added], LOTTERY, [5])) == 3
    # ...any other difference is refused: another override, another lottery
    for other, lottery in (([*protocol, "train.epochs=6"], LOTTERY), (protocol, "4 levels")):
        with pytest.raises(SystemExit, match="used another protocol"):
            ticket_seeds.combined(earlier, other, lottery, [5])
