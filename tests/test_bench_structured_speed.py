"""bench/structured_speed.py: the paired accuracy difference, the target verdicts, and the timing
rows it builds on (bench/inference_layout.py, with onnxruntime)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from subproc import run as run_diagnosed

BENCH = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture
def bench(bench_module: Callable[[str], ModuleType]) -> dict[str, ModuleType]:
    """The bench modules (conftest's bench_module undoes what _common installs)."""
    return {n: bench_module(n) for n in ("structured_speed", "inference_layout")}


def _predictions(path: Path, labels: np.ndarray, pred: np.ndarray) -> None:
    path.mkdir()
    probs = np.eye(4)[pred]
    np.savez(path / "test_predictions.npz", probs=probs, labels=labels)


def test_paired_difference(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    ss = bench["structured_speed"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    dense = y.copy()
    dense[:40] = (y[:40] + 1) % 4  # 90% right
    structured = y.copy()
    structured[:60] = (y[:60] + 1) % 4  # 85% right, wrong on a superset of dense's errors
    _predictions(tmp_path / "d", y, dense)
    _predictions(tmp_path / "s", y, structured)
    d = ss.paired_difference(tmp_path / "d", tmp_path / "s")
    assert d["points"] == pytest.approx(-5.0)
    lo, hi = d["ci95_points"]
    assert lo < -5.0 < hi and hi < 0  # the 20 extra errors are the only differences
    _predictions(tmp_path / "other", rng.permutation(y), structured)
    with pytest.raises(ss.MedxferError, match="different images"):
        ss.paired_difference(tmp_path / "d", tmp_path / "other")


def test_targets_need_every_batch_and_the_accuracy(bench: dict[str, ModuleType]) -> None:
    ss = bench["structured_speed"]
    rows = [
        {"model": "s", "image_size": 224, "batch": 1, "threads": 1,
         "speedup_over_d_contiguous": 1.6, "speedup_over_d_channels_last": 1.4},
        {"model": "s", "image_size": 224, "batch": 32, "threads": 1,
         "speedup_over_d_contiguous": 2.0, "speedup_over_d_channels_last": 2.2},
        {"model": "d", "image_size": 224, "batch": 1, "threads": 1},
    ]  # fmt: skip
    t = ss.targets(rows, "d", "s", diff=-1.0, speedup=1.5, points=1.5)
    by = {c["backend"]: c for c in t["cases"]}
    assert by["contiguous"]["met"] and not by["channels_last"]["met"]  # 1.4x at batch 1
    assert by["channels_last"]["speedup"] == {"batch_1": 1.4, "batch_32": 2.2}
    assert t["met_in"] == ["contiguous, 224 px, 1 thread(s)"]
    worse = ss.targets(rows, "d", "s", diff=-1.6, speedup=1.5, points=1.5)
    assert not worse["accuracy_met"] and worse["met_in"] == []
    worse_by = {c["backend"]: c for c in worse["cases"]}
    assert worse_by["contiguous"]["speed_met"]  # fast enough, but not accurate enough


def test_time_rows_all_backends(bench: dict[str, ModuleType]) -> None:
    pytest.importorskip("onnxruntime")
    il = bench["inference_layout"]
    models = il.load([], ["resnet18", "efficientnet_lite0"])
    rows = il.time_rows(models, [32], [1, 2], [1], blocks=2, onnxruntime=True)
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("resnet18", 1),
        ("efficientnet_lite0", 1),
        ("resnet18", 2),
        ("efficientnet_lite0", 2),
    ]
    for r in rows:
        for be in ("contiguous", "channels_last", "onnxruntime"):
            assert len(r[f"{be}_ms_blocks"]) == 2 and r[f"{be}_ms"] > 0
        if r["model"] == "efficientnet_lite0":
            assert r["speedup_over_resnet18_onnxruntime"] > 0


def test_folded_copies_are_timed_beside_the_models(bench: dict[str, ModuleType]) -> None:
    il = bench["inference_layout"]
    models = il.load([], ["resnet18"])
    assert il.add_folded(models, 32) == {"resnet18": 20}  # every BatchNorm of ResNet-18
    rows = il.time_rows(models, [32], [1], [1], blocks=1)
    assert [r["model"] for r in rows] == ["resnet18", "resnet18+folded"]
    assert rows[1]["speedup_over_resnet18_channels_last"] > 0


def test_channel_cuts_of_random_weight_models_are_timed(bench: dict[str, ModuleType]) -> None:
    """``--cuts``: each --archs model channel-pruned to the MACs cut asked for, timed beside it."""
    il = bench["inference_layout"]
    models = il.load([], ["resnet18"])
    info = il.add_cuts(models, ["resnet18"], [2.0], 32)
    assert list(models) == ["resnet18", "resnet18@2x"]
    assert info["resnet18@2x"]["macs_cut"] >= 2.0 and 0 < info["resnet18@2x"]["ratio"] < 1
    dense_params = sum(p.numel() for p in models["resnet18"].parameters())
    assert sum(p.numel() for p in models["resnet18@2x"].parameters()) < dense_params
    rows = il.time_rows(models, [32], [1], [1], blocks=1)
    assert rows[1]["model"] == "resnet18@2x" and rows[1]["speedup_over_resnet18_channels_last"] > 0


def test_wrong_dense_run_is_one_clear_message(tmp_path: Path) -> None:
    s = tmp_path / "structured"
    s.mkdir()
    (s / "structured.json").write_text('{"source_run": "/somewhere/else"}')
    r = run_diagnosed([sys.executable, "structured_speed.py", str(tmp_path / "d"), str(s)],
                       cwd=BENCH, timeout=300)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {s} was pruned from /somewhere/else")
