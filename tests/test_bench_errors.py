"""The benchmarks end bad input the way the command line does: the message and its fix."""

from __future__ import annotations

import sys
from pathlib import Path

from subproc import run as run_diagnosed

BENCH = Path(__file__).resolve().parents[1] / "bench"
STUDIES = BENCH.parent / "studies"


def test_bench_bad_input_is_one_clear_message(tmp_path: Path) -> None:
    cmd = [sys.executable, "inference_layout.py", "--runs", str(tmp_path / "no-run")]
    r = run_diagnosed(cmd, cwd=STUDIES, timeout=300)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: no checkpoint at {tmp_path / 'no-run'}")
    assert "fix: pass a run folder" in r.stderr and "Traceback" not in r.stderr


def test_audit_check_without_its_reference_list(tmp_path: Path) -> None:
    cmd = [sys.executable, "audit_check.py", "--data", str(tmp_path)]
    r = run_diagnosed(cmd, cwd=BENCH, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {tmp_path} has no train_test_near_duplicates.csv")


def test_ort_spin_bench_runs_and_records_every_block(tmp_path: Path) -> None:
    """studies/ort_spin.py on a tiny budget: both onnxruntime sessions and the PyTorch calls timed
    beside each, one median per block, the JSON where MEDXFER_BENCH_RESULTS points."""
    import json
    import os

    env = {**os.environ, "MEDXFER_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "ort_spin.py", "--size", "32", "--threads", "1", "--blocks", "2",
           "--repeats", "1"]  # fmt: skip
    r = run_diagnosed(cmd, cwd=STUDIES, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "ort-spin" / "result.json").read_text())
    keys = {"torch_alone", "ort_spinning", "torch_after_ort_spinning", "ort_no_spin",
            "torch_after_ort_no_spin"}  # fmt: skip
    assert len(out["blocks_ms"]) == 2 and all(set(b) == keys for b in out["blocks_ms"])
    assert set(out["median_ms"]) == keys and all(v > 0 for v in out["median_ms"].values())
    assert (out["image_size"], out["threads"]) == (32, 1)


def test_every_bench_and_study_script_imports() -> None:
    """Each script of bench/ and studies/ loads (its imports resolve: a helper renamed in the
    package breaks no study unnoticed); one process, ``main`` not called."""
    code = (
        "import importlib.util, pathlib, sys\n"
        f"sys.path[:0] = [{str(BENCH)!r}, {str(STUDIES)!r}]\n"
        "bad = []\n"
        f"for f in sorted([*pathlib.Path({str(BENCH)!r}).glob('*.py'), "
        f"*pathlib.Path({str(STUDIES)!r}).glob('*.py')]):\n"
        "    spec = importlib.util.spec_from_file_location('script_' + f.stem, f)\n"
        "    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "    try:\n"
        "        spec.loader.exec_module(module)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{f.name}: {e!r}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = run_diagnosed([sys.executable, "-c", code], cwd=BENCH, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
