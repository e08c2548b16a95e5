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


def test_controls_are_compared_with_the_ticket_of_the_same_seed(
    bench_module: Callable[[str], ModuleType],
) -> None:
    ticket_seeds = bench_module("ticket_seeds")

    def run(acc: float) -> dict[str, dict[str, float]]:
        return {"test": {"accuracy": acc}, "val": {"accuracy": acc - 0.1}}

    # a lottery.json's levels: the controls are read at the last level only
    levels = [
        {"runs": {"dense": run(0.8)}},
        {"runs": {"ticket": run(0.79), "random_reinit": run(0.7), "random_mask": run(0.81)}},
    ]
    got = ticket_seeds.control_accuracies(levels)
    assert got["random_reinit_test_accuracy"] == 0.7
    assert got["random_mask_val_accuracy"] == pytest.approx(0.71)
    assert ticket_seeds.control_accuracies([{"runs": {"ticket": run(0.8)}}]) == {}  # none trained

    def row(seed: int, ticket: float, reinit: float, mask: float) -> dict[str, object]:
        return {"seed": seed} | {
            f"{kind}_{split}_accuracy": acc - (0.1 if split == "val" else 0.0)
            for kind, acc in (("ticket", ticket), ("random_reinit", reinit), ("random_mask", mask))
            for split in ("test", "val")
        }

    rows = [row(0, 0.80, 0.70, 0.82), row(1, 0.84, 0.74, 0.80), row(2, 0.82, 0.72, 0.82)]
    rows.append({"seed": 3, "ticket_test_accuracy": 0.5, "ticket_val_accuracy": 0.5})  # no controls
    versus = ticket_seeds.versus_controls(rows)
    assert versus["random_reinit"]["seeds"] == [0, 1, 2]
    assert versus["random_reinit"]["test"]["mean"] == pytest.approx(0.10)
    assert versus["random_reinit"]["test"]["ci95"] == pytest.approx([0.10, 0.10])  # no scatter
    mask = versus["random_mask"]["test"]  # -0.02, +0.04, 0: paired by seed
    assert mask["mean"] == pytest.approx(0.02 / 3) and mask["n"] == 3
    assert mask["ci95"][0] < 0 < mask["ci95"][1]
    with pytest.raises(MedxferError, match="have the random_reinit control"):
        ticket_seeds.versus_controls(rows[:1])
