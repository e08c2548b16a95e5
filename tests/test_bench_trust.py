"""bench/trust.py end to end on a tiny demo-trained run: every case is scored with the run's
validation thresholds, the summary keys and targets are at the top of the result, figures are
drawn, a later call reuses the scored cases, and the held-out-class run is trained from a
manifest without that class."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml
from PIL import Image
from subproc import run as run_diagnosed

from medxfer.cli import main
from medxfer.evaluate.shifts import SEVERITIES, SHIFTS
from medxfer.evaluate.trust_detectors import DETECTORS

pytest.importorskip("medxfer.evaluate.trust")  # the trust library this bench measures

BENCH = Path(__file__).resolve().parents[1] / "bench"
FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.epochs=2",
    "train.batch_size=16", "train.steps_per_epoch=3", "eval.n_bootstrap=20", "train.threads=1",
]  # fmt: skip
SUMMARY = (
    "far_ood_auroc", "held_out_class_auroc", "severity3_accepted_accuracy_gap",
    "severity3_errors_flagged", "test_ok_fraction", "augrc_reduction_vs_msp",
    "conformal_nominal", "conformal_coverage", "conformal_mean_set_size",
    "robust_covariate_gain", "robust_id_cost",
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny run on the synthetic shapes (its trust statistics are fitted by the bench)."""
    run_dir = tmp_path_factory.mktemp("trust-run") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module scope: set what conftest sets per test
        mp.setenv("MEDXFER_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        assert main(["train", "--data", str(synth_root), "--run-dir", str(run_dir), *FAST]) == 0
        yield run_dir


def _other_dataset(root: Path) -> Path:
    """A second 'modality': smooth gradients and checkerboards, nothing like the shapes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    for split, n in (("train", 3), ("test", 6)):
        for kind in ("gradient", "checker"):
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(n):
                phase = rng.uniform(0, 255)
                img = (
                    (xx * 5 + phase) % 256
                    if kind == "gradient"
                    else ((xx // 6 + yy // 6) % 2) * 255
                )
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{kind}{i}.png")
    return root


def _bench(args: list[str], results: Path, cache: Path, name: str = "demo") -> tuple[dict, str]:
    env = {**os.environ, "MEDXFER_BENCH_RESULTS": str(results), "MEDXFER_CACHE": str(cache)}
    proc = run_diagnosed([sys.executable, str(BENCH / "trust.py"), *args], timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((results / "trust" / f"{name}.json").read_text()), proc.stdout


@pytest.mark.slow
def test_bench_trust_end_to_end(trained: Path, tmp_path: Path) -> None:
    other = _other_dataset(tmp_path / "other")
    results, work, cache = tmp_path / "results", tmp_path / "work", tmp_path / "cache"
    common = [str(trained), "--other-data", str(other), "--limit", "32", "--work-dir", str(work),
              "--threads", "1"]  # fmt: skip
    # 1. no run without the class yet: its manifest and the command that trains it; a result
    # name of its own (the targets and the default other dataset still follow the data)
    out, stdout = _bench([*common, "--held-out-class", "bars", "--name", "demo-named"], results,
                         cache, name="demo-named")  # fmt: skip
    assert (out["dataset"], out["trained_on"]) == ("demo-named", "demo")
    assert (results / "trust" / "demo-named" / "flags.png").is_file()
    assert "near-OOD skipped" in stdout and "medxfer train --config" in stdout
    assert (work / "held-out-bars" / "manifest.csv").is_file()
    assert out["near_ood"] is None and out["held_out_class_auroc"] is None
    assert out["targets"]["held_out_class_auroc"]["met"] is None
    assert out["robust_covariate_gain"] is None
    # 2. trained here; as the other policy's run, a copy of the run whose config says robust
    # (the same weights: a zero gain, the plumbing only)
    other_policy = tmp_path / "robust-copy"
    shutil.copytree(trained, other_policy)
    cfg = yaml.safe_load((other_policy / "config.yaml").read_text())
    assert cfg["augment"]["policy"] == "standard"
    cfg["augment"]["policy"] = "robust"
    (other_policy / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = [*common, "--held-out-class", "ring", "--train-held-out", *FAST,
            "--policy-run", str(other_policy)]  # fmt: skip
    out, _ = _bench(args, results, cache)
    assert set(SUMMARY) <= set(out) and out["dataset"] == "demo"
    assert out["conformal_nominal"] == 0.9 and out["trust"]["coverage"] == 0.9
    assert (trained / "trust.json").is_file()  # thresholds: the run's own validation fit
    test = out["test"]
    assert test["n"] == 32 and test["ok_fraction"] == out["test_ok_fraction"]
    assert 0 <= test["accuracy"] <= 1
    assert set(test["conformal"]["coverage_per_class"]) <= {"disc", "ring", "bars", "cross"}
    covariate = [r for r in out["covariate"] if r["kind"] == "covariate"]
    assert {(r["shift"], r["severity"]) for r in covariate} == {
        (s, v) for s in SHIFTS for v in SEVERITIES
    }
    for r in covariate:
        assert sum(r["flags"].values()) == pytest.approx(1.0, abs=1e-3)
        assert set(r["detectors"]) == {*DETECTORS, "chosen"}
    # far-OOD: the other dataset only (the synthetic set is this run's own data)
    assert [r["case"] for r in out["far_ood"]] == ["other-dataset"]
    assert out["far_ood_auroc"] == out["far_ood"][0]["detectors"]["chosen"]["auroc"]
    assert out["targets"]["far_ood_auroc"]["met"] == (out["far_ood_auroc"] >= 0.99)
    # near-OOD: a run trained without `ring`, from a manifest without it
    near = out["near_ood"]
    manifest = (work / "held-out-ring" / "manifest.csv").read_text()
    assert ",ring," not in manifest and ",disc," in manifest
    assert near["class"] == "ring" and near["n"] == 32
    assert out["held_out_class_auroc"] == near["detectors"]["chosen"]["auroc"]
    assert out["robust_covariate_gain"] == 0.0 and out["robust_id_cost"] == 0.0
    assert out["targets"]["conformal_mean_set_size"]["met"] is None  # no target for the demo
    for fig in out["figures"]:
        assert (results / "trust" / "demo" / Path(fig).name).stat().st_size > 1000
    # the base cases (and so an interrupted call's) are read back from the work folder: only
    # the held-out run's cases were scored in this call
    assert set(out["seconds"]["cases"]) == {"held-out/test", "held-out/class-ring"}


def test_summary_takes_the_worst_case_and_marks_targets(
    bench_module: Callable[[str], ModuleType],
) -> None:
    tables = bench_module("_trust_tables")
    test = {"accuracy": 0.95, "ok_fraction": 0.92, "augrc": {"msp": 0.02, "failure": 0.012},
            "conformal": {"coverage": 0.905, "mean_set_size": 1.1}}  # fmt: skip

    def shifted(sev: int, accepted: float | None, flagged: float | None) -> dict[str, object]:
        return {"severity": sev, "accepted_accuracy": accepted, "errors_flagged": flagged}

    covariate = [
        shifted(3, 0.93, 0.9),
        shifted(3, 0.90, 0.85),
        shifted(2, 0.5, 0.1),
        shifted(3, None, None),
    ]  # the last: no image accepted, so no gap and no error let through
    far = [{"detectors": {"chosen": {"auroc": a}}} for a in (0.999, 0.995)]
    robust = {"covariate_gain_points": 12.0, "id_cost_points": 1.5}
    s = tables.summary(test, covariate, far, None, robust, 0.9)
    assert s["far_ood_auroc"] == 0.995 and s["held_out_class_auroc"] is None
    assert s["severity3_accepted_accuracy_gap"] == pytest.approx(5.0)  # severity 2 not counted
    assert s["severity3_errors_flagged"] == 0.85
    assert s["augrc_reduction_vs_msp"] == pytest.approx(0.4)
    t = tables.targets(s, "brain-tumor-mri")
    assert t["far_ood_auroc"]["met"] and not t["severity3_accepted_accuracy_gap"]["met"]
    assert t["conformal_coverage_gap_points"] == {"value": 0.5, "target": "<= 2.0", "met": True}
    assert t["conformal_mean_set_size"]["met"] and t["robust_covariate_gain"]["met"]
    assert not t["robust_id_cost"]["met"] and t["held_out_class_auroc"]["met"] is None
    chest = tables.targets(s | {"conformal_mean_set_size": 1.5}, "chest-xray-pneumonia")
    assert chest["conformal_mean_set_size"]["met"]  # 1.6 for chest, 1.2 for brain
    assert tables.targets(s, "demo")["conformal_mean_set_size"]["met"] is None
