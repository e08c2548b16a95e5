"""medxfer tune on the synthetic set: per-epoch reports, checks before any trial, resume after a
kill, two workers on one journal (and on PostgreSQL when a server is given), the best config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from medxfer.cli import main
from medxfer.config import ExperimentConfig, load_config
from medxfer.errors import MedxferError
from medxfer.evaluate.finish import evaluate_trained
from medxfer.tune import Objective, StudyOptions, parse_space, run_study
from medxfer.tune.objective import Report
from medxfer.tune.storage import open_storage
from medxfer.tune.workers import FINISHED

SPACE = ("tune.space={train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}, "
         "train.weight_decay: {type: float, low: 1.0e-5, high: 0.1, log: true}}")  # fmt: skip
FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=32", "train.batch_size=16",
    "train.epochs=3", "tune.epochs=2", "train.steps_per_epoch=2", "train.eval_batch_size=256",
    "eval.n_bootstrap=10", "train.threads=1", SPACE,
]  # fmt: skip


def _cfg(root: Path, out: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"data.root={root}", f"out_dir={out}", *FAST, *extra])


def _study(summary: dict[str, Any], storage: str | None = None) -> optuna.Study:
    return optuna.load_study(
        study_name=summary["study_name"],
        storage=open_storage(storage, Path(summary["study_dir"])),
    )


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=FINISHED)


class RecordingTrial(optuna.trial.FixedTrial):
    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self.reports: list[tuple[float, int]] = []

    def report(self, value: float, step: int) -> None:
        self.reports.append((value, step))


def test_objective_reports_every_epoch_and_never_tests(synth_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_root, tmp_path)
    trial = RecordingTrial({"train.lr": 1e-3, "train.weight_decay": 1e-3})
    objective = Objective(
        cfg, parse_space(cfg.tune.space, cfg), tmp_path / "s", evaluate=evaluate_trained
    )
    value = objective(trial)  # type: ignore[arg-type]
    assert [step for _, step in trial.reports] == [0, 1]  # tune.epochs=2, not train.epochs=3
    assert value == max(v for v, _ in trial.reports)
    run = tmp_path / "s" / "trials" / "0"
    history = json.loads((run / "history.json").read_text())
    assert [h["val_balanced_accuracy"] for h in history] == [v for v, _ in trial.reports]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val" in metrics and "test" not in metrics  # the test split is never evaluated
    assert not (run / "test_predictions.npz").exists() and not (run / "last.pt").exists()
    assert load_config(run / "config.yaml").train.lr == pytest.approx(1e-3)


def test_trial_budget_and_low_resolution_search() -> None:
    """``tune.epochs`` / ``train_subset`` / ``image_size`` shape each trial; the best config
    (what ``medxfer train`` gets) keeps the full budget and size."""
    from medxfer.tune.objective import best_config, trial_config

    base = load_config(None, ["data.image_size=224", "train.epochs=10", "tune.epochs=2",
                              "tune.train_subset=0.25", "tune.image_size=96"])  # fmt: skip
    trial = trial_config(base, {"train.lr": 2e-3})
    assert (trial.data.image_size, trial.train.epochs, trial.data.train_subset) == (96, 2, 0.25)
    best = best_config(base, {"train.lr": 2e-3})
    assert (best.data.image_size, best.train.epochs, best.train.lr) == (224, 10, 2e-3)
    assert trial_config(load_config(None, ["data.image_size=128"]), {}).data.image_size == 128
    with pytest.raises(MedxferError, match=r"tune\.image_size"):
        load_config(None, ["tune.image_size=16"])


def test_report_prunes() -> None:
    class Stub:
        def report(self, value: float, step: int) -> None:
            self.last = (value, step)

        def should_prune(self) -> bool:
            return True

        def set_user_attr(self, key: str, value: Any) -> None:
            pass

    stub = Stub()
    report = Report(stub, "val_loss")  # type: ignore[arg-type]
    with pytest.raises(optuna.TrialPruned):
        report.on_epoch_end(2, {"val_loss": 0.5})
    assert stub.last == (0.5, 2) and report.seen == [0.5]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("tune.space={train.lr: {type: float, low: 0.1, high: 0.01}}", "inverted"),
        ("tune.space={train.lr: {type: float, low: 0.1, high: 0.1}}", "empty"),
        ("tune.space={}", "tune.space is empty"),
        ("tune.space={train.lrr: {type: float, low: 0.1, high: 1}}", "unknown config key"),
        ("tune.space={train.lr: {type: float, low: 0, high: 1, log: true}}", "low > 0"),
        ("tune.space={train.lr: {type: normal, low: 0, high: 1}}", "type must be"),
        ("tune.space={train.lr: {type: float, low: 0, hi: 1}}", "unknown field"),
        ("tune.space={model.freeze: {type: categorical, choices: [none, bogus]}}", "freeze"),
        ("tune.space={model.arch: {type: categorical, choices: [resnet18, vgg77]}}", "vgg77"),
        ("tune.space={train.epochs: {type: int, low: 1.5, high: 4}}", "integer"),
        ("tune.pruner=fast", "tune.pruner"),
        ("tune.metric=auc", "tune.metric"),
    ],
)
def test_bad_settings_fail_before_any_trial(
    synth_root: Path, tmp_path: Path, override: str, needle: str
) -> None:
    with pytest.raises(MedxferError, match=needle):
        run_study(
            _cfg(synth_root, tmp_path, override),
            StudyOptions(n_trials=1),
            evaluate=evaluate_trained,
        )
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize(
    "url", ["sqlite:////no/such/folder/study.db", "postgresql://u:secret@127.0.0.1:1/nodb"]
)
def test_unreachable_storage_is_one_clear_message(
    synth_root: Path, tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["tune", "--data", str(synth_root), "--storage", url, f"out_dir={tmp_path}", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("cannot reach the study storage" in err or "driver" in err) and "Traceback" not in err
    assert "secret" not in err  # the password is not printed
    assert not list(tmp_path.rglob("trials"))


def _orphan(summary: dict[str, Any], cfg: ExperimentConfig) -> tuple[int, dict[str, Any]]:
    """A trial left RUNNING by a worker process that was killed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = _study(summary)
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    params = {p.key: p.suggest(trial) for p in parse_space(cfg.tune.space, cfg)}
    return trial.number, params


def test_killed_study_resumes_to_exactly_n_trials(synth_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_root, tmp_path)
    first = run_study(cfg, StudyOptions(n_trials=1), evaluate=evaluate_trained)
    assert (first["complete"] + first["pruned"], first["failed"]) == (1, 0)
    number, params = _orphan(first, cfg)
    summary = run_study(cfg, StudyOptions(n_trials=3, retrain=True), evaluate=evaluate_trained)
    assert summary["study_dir"] == first["study_dir"]  # the same study, resumed
    assert summary["retried_trials"] == [number]
    study = _study(summary)
    done = _finished(study)
    assert len(done) == 3 and summary["complete"] + summary["pruned"] == 3
    assert study.trials[number].state == TrialState.FAIL
    retry = study.trials[number + 1]
    assert retry.system_attrs["failed_trial"] == number and retry.params == params
    assert len({tuple(sorted(t.params.items())) for t in done}) == 3
    # the reports: trials.csv, summary.json, figures, and a best.yaml that `train` accepts
    study_dir = Path(summary["study_dir"])
    rows = (study_dir / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(study.trials) and "params_train.lr" in rows[0]
    assert json.loads((study_dir / "summary.json").read_text())["best"] == summary["best"]
    assert "optimization_history.png" in summary["figures"]
    assert all((study_dir / "figures" / f).exists() for f in summary["figures"])
    best = load_config(study_dir / "best.yaml")
    assert best.train.lr == pytest.approx(summary["best"]["params"]["train.lr"])
    assert best.train.epochs == 3 and best.model.arch == "resnet18"  # the full budget
    assert summary["retrain"]["test"]["balanced_accuracy"] >= 0  # evaluated once on test
    again = run_study(
        cfg, StudyOptions(n_trials=3), evaluate=evaluate_trained
    )  # complete: runs no trial
    assert len(_study(again).trials) == len(study.trials)


def test_sigkill_mid_trial_then_resume(synth_root: Path, tmp_path: Path) -> None:
    """A real kill -9 of `medxfer tune` in the middle of its first trial, then the same study."""
    cfg = _cfg(synth_root, tmp_path, "tune.epochs=3")
    args = ["--data", str(synth_root), f"out_dir={tmp_path}", *FAST, "tune.epochs=3"]
    proc = subprocess.Popen([sys.executable, "-m", "medxfer", "tune", "--n-trials", "2", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob("tune/*/trials/0/history.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = run_study(cfg, StudyOptions(n_trials=2), evaluate=evaluate_trained)
    study = _study(summary)
    assert study.trials[0].state == TrialState.FAIL and summary["retried_trials"] == [0]
    assert study.trials[1].params == study.trials[0].params  # the killed trial, run again
    assert len(_finished(study)) == 2 and summary["failed"] == 1


def _two_workers(root: Path, tmp_path: Path, storage: str | None, n: int) -> optuna.Study:
    cfg = _cfg(root, tmp_path, "tune.pruner=none", f"name=w{uuid.uuid4().hex[:8]}")
    summary = run_study(
        cfg, StudyOptions(n_trials=n, workers=2, storage=storage), evaluate=evaluate_trained
    )
    assert summary["worker_exit_codes"] == [0, 0]
    study = _study(summary, storage)
    done = _finished(study)
    assert len(done) == n and summary["complete"] == n and summary["failed"] == 0
    assert len({t.number for t in done}) == n
    assert len({tuple(sorted(t.params.items())) for t in done}) == n  # no trial run twice
    assert len({t.user_attrs["trial_dir"] for t in done}) == n
    assert all(t.user_attrs["worker"].split(":")[1] != str(os.getpid()) for t in done)
    return study


def test_two_workers_share_one_journal(synth_root: Path, tmp_path: Path) -> None:
    _two_workers(synth_root, tmp_path, None, 4)


def test_two_workers_on_postgresql(synth_root: Path, tmp_path: Path) -> None:
    url = os.environ.get("MEDXFER_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set MEDXFER_TEST_POSTGRES_URL=postgresql://user:pw@host/db to run (CI does)")
    try:
        open_storage(url, tmp_path)
    except MedxferError as err:
        pytest.skip(f"PostgreSQL at MEDXFER_TEST_POSTGRES_URL is not usable: {err.message}")
    _two_workers(synth_root, tmp_path, url, 3)
