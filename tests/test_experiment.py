"""``medxfer run``: experiment files, the matrix, the demo end to end, re-runs skip stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from experiment_demo import DEMO, REPO, gan_available, run_demo, tiny_overrides

from medxfer.cli import main
from medxfer.config import load_config
from medxfer.errors import MedxferError
from medxfer.experiment import STAGES, load_experiment


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp() / "demo-experiment"  # one run for both test files
    return run_demo(base / "runs", base / "cache")


def test_experiment_files_are_also_train_configs() -> None:
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        cfg = load_config(path)  # what `medxfer train --config` does: extra keys are ignored
        exp = load_experiment(path)
        assert exp.base.to_dict() == cfg.to_dict() or cfg.data.root != exp.base.data.root
    paper = load_experiment(REPO / "configs" / "paper-brain-tumor.yaml")
    assert [c.cfg.model.arch for c in paper.cells()] == ["googlenet", "resnet50", "efficientnet_b0"]
    assert all(c.cfg.tune.n_trials == 20 and c.cfg.data.image_size == 224 for c in paper.cells())
    cpu = load_experiment(REPO / "configs" / "pneumonia-cpu.yaml")
    assert cpu.base.model.arch == "efficientnet_lite0" and cpu.base.model.weights == "imagenet"


def test_configs_are_the_ones_a_user_chooses_from() -> None:
    """One demo, one CPU-sized file per dataset, the paper files; each says what it costs."""
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert names == ["brain-tumor-cpu.yaml", "demo.yaml", "paper-brain-tumor.yaml",
                     "paper-pneumonia.yaml", "pneumonia-cpu.yaml"]  # fmt: skip
    for name in names:
        header = (REPO / "configs" / name).read_text().split("\nname:")[0]
        assert "Cost" in header or "minutes" in header, name


def test_matrix_cells_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(
        "name: m\nmatrix:\n  model.arch: [resnet18, googlenet]\n  data.root: [/d/brain, /d/chest]\n"
        "stages: {gan: false}\n"
    )
    exp = load_experiment(f, [f"out_dir={tmp_path}", "stages.prune=false", "train.epochs=3"])
    cells = exp.cells()
    assert [c.name for c in cells] == [
        "resnet18-brain",
        "resnet18-chest",
        "googlenet-brain",
        "googlenet-chest",
    ]
    assert cells[3].cfg.model.arch == "googlenet" and cells[3].cfg.data.root == "/d/chest"
    assert all(c.cfg.train.epochs == 3 for c in cells)
    assert len({c.dir for c in cells}) == 4 and all(c.dir.parent == exp.dir for c in cells)
    assert not exp.stages.gan and not exp.stages.prune and exp.stages.tune
    # an override of a matrix key replaces that axis
    one = load_experiment(f, ["model.arch=resnet50"]).cells()
    assert [c.cfg.model.arch for c in one] == ["resnet50", "resnet50"]
    # no matrix: one cell, the experiment folder itself
    plain = load_experiment(DEMO, [f"out_dir={tmp_path}"])
    assert [c.dir for c in plain.cells()] == [tmp_path / "experiments" / "demo"]


def test_a_missing_data_root_fails_before_any_stage(tmp_path: Path) -> None:
    """A typo in the last cell of a matrix must not surface hours into the experiment."""
    from medxfer.experiment import run_experiment

    real = tmp_path / "brain"
    real.mkdir()
    f = tmp_path / "m.yaml"
    f.write_text(f"name: m\nmatrix:\n  data.root: [{real}, {tmp_path / 'chets'}]\n")
    exp = load_experiment(f, [f"out_dir={tmp_path / 'runs'}"])
    with pytest.raises(MedxferError, match="chets does not exist"):
        run_experiment(exp)
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written


@pytest.mark.parametrize(
    ("text", "override", "message"),
    [
        ("matrix: {model.arch: resnet18}\n", None, "non-empty lists"),
        ("matrix: {model.nope: [1]}\n", None, "unknown config key"),
        ("matrix: {model.arch: [resnet18]}\nstages: {gann: true}\n", None, "unknown stages key"),
        ("name: x\n", "stages.tune=maybe", "true or false"),
        ("name: x\n", "stages.gan.x=1", "stages.NAME=value"),
    ],
)
def test_bad_experiment_files(
    tmp_path: Path, text: str, override: str | None, message: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(MedxferError, match=message):
        load_experiment(f, [override] if override else [])


def test_demo_end_to_end(demo: Path) -> None:
    log = json.loads((demo / "experiment.json").read_text())
    on = [s for s in STAGES if s != "gan" or gan_available()]
    assert {s: log["stages"][s]["status"] for s in on} == dict.fromkeys(on, "done")
    if not gan_available():
        assert log["stages"]["gan"]["status"] == "off"
    else:
        gan = json.loads((demo / "stages" / "gan.json").read_text())["outputs"]
        assert gan["gate"]["extractor"].endswith("64 px input")  # gan.gate_size=64
        # four generator steps make noise: the gate keeps it out and the run oversamples
        assert gan["gate"]["failed"] and not gan["admitted"]
        assert gan["fallback"]["overrides"] == ["train.weighted_sampling=true"]
    for stage in on:
        marker = json.loads((demo / "stages" / f"{stage}.json").read_text())
        assert (
            marker["stage"] == stage
            and marker["fingerprint"] == log["stages"][stage]["fingerprint"]
        )
    train = Path(json.loads((demo / "stages" / "train.json").read_text())["outputs"]["run_dir"])
    tune = json.loads((demo / "stages" / "tune.json").read_text())["outputs"]
    assert tune["complete"] + tune["pruned"] == 2
    cfg = load_config(train / "config.yaml")  # trained with the tuned values
    for key, value in tune["best"]["params"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == pytest.approx(value)
    if gan_available():
        assert cfg.train.weighted_sampling and not cfg.data.synthetic  # the gate's fallback
    metrics = json.loads((train / "metrics.json").read_text())
    assert metrics["data"]["synthetic"] is True and "test" in metrics
    evaluation = json.loads(
        Path(
            json.loads((demo / "stages" / "evaluate.json").read_text())["outputs"]["evaluation"]
        ).read_text()
    )
    rows = {r["pruned"]: r for r in evaluation["rows"]}
    assert rows[False]["test_accuracy"] == metrics["test"]["accuracy"]
    assert rows[False]["image_size"] == rows[True]["image_size"] == 32
    lottery = Path(json.loads((demo / "stages" / "prune.json").read_text())["outputs"]["dir"])
    adopted = json.loads((lottery / "level_0" / "dense" / "adopted.json").read_text())
    assert adopted == {"adopted_from": str(train)}  # the train run is level 0: trained once
    assert 0 < rows[True]["sparsity"] < 1 and rows[True]["tuned"]
    for cam in evaluation["gradcam"].values():
        assert Path(cam["png"]).stat().st_size > 0 and cam["layer"] == "bn2"
        assert {i["kind"] for i in cam["images"]} <= {"correct", "wrong"}
    assert (demo / "report.html").stat().st_size > 10_000 and (demo / "report.md").exists()


def test_rerun_skips_completed_stages(
    demo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import medxfer.evaluate.finish

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a completed stage was run again")

    monkeypatch.setattr(medxfer.evaluate.finish, "fit", no_training)
    markers = {p: p.stat().st_mtime_ns for p in (demo / "stages").glob("*.json")}
    assert main(["run", str(DEMO), *tiny_overrides(demo.parents[1])]) == 0
    assert capsys.readouterr().out.strip() == str(demo)
    log = json.loads((demo / "experiment.json").read_text())
    assert {s["status"] for s in log["stages"].values()} <= {"complete", "off"}
    assert markers == {p: p.stat().st_mtime_ns for p in (demo / "stages").glob("*.json")}
    # a stage whose marker is gone (killed before it finished) runs again, alone, and its time
    # counts the killed attempt's part (kept in report.partial.json) as well as the new one
    fp = json.loads((demo / "stages" / "report.json").read_text())["fingerprint"]
    (demo / "stages" / "report.json").unlink()
    (demo / "report.html").unlink()
    partial = demo / "stages" / "report.partial.json"
    partial.write_text(json.dumps({"fingerprint": fp, "parts": [100.0]}))
    assert main(["run", str(DEMO), *tiny_overrides(demo.parents[1])]) == 0
    log = json.loads((demo / "experiment.json").read_text())
    assert log["stages"]["report"]["status"] == "done" and (demo / "report.html").exists()
    marker = json.loads((demo / "stages" / "report.json").read_text())
    assert marker["seconds_parts"][0] == 100.0 and len(marker["seconds_parts"]) == 2
    assert marker["seconds"] == pytest.approx(sum(marker["seconds_parts"]))
    assert log["stages"]["report"]["seconds"] > 100 and not partial.exists()
    assert log["stages"]["train"]["status"] == "complete"


def test_stage_clock_keeps_a_killed_part(tmp_path: Path) -> None:
    import time

    from medxfer.experiment.runner import StageClock

    path = tmp_path / "train.partial.json"
    with pytest.raises(KeyboardInterrupt), StageClock(path, "fp", every=0.02) as clock:
        time.sleep(0.1)
        beat = json.loads(path.read_text())  # rewritten while the stage runs
        assert beat["fingerprint"] == "fp" and beat["parts"][0] > 0
        raise KeyboardInterrupt
    first = json.loads(path.read_text())["parts"]
    assert len(first) == 1 and first[0] >= 0.1 and clock.total == first[0]
    with StageClock(path, "fp", every=0.02) as again:
        time.sleep(0.05)
    assert again.parts[0] == first[0] and again.total > first[0] + 0.04
    assert StageClock(path, "another config").earlier == []  # not the same stage: not counted


def _summary(**val: tuple[float, ...]) -> dict:  # type: ignore[type-arg]
    """A lottery.json with one row per level; ``val``: kind -> val balanced accuracy per level."""
    levels = [{"level": 0, "sparsity": 0.0, "runs": {}}]
    for i in range(len(next(iter(val.values())))):
        runs = {k: {"run_dir": f"{k}{i + 1}", "val": {"balanced_accuracy": v[i]}}
                for k, v in val.items()}  # fmt: skip
        levels.append({"level": i + 1, "sparsity": 0.2 * (i + 1), "runs": runs})
    return {"levels": levels}


def test_select_reports_the_pruned_model_best_on_validation() -> None:
    from medxfer.experiment.stages import select

    s = _summary(ticket=(0.80, 0.85), finetune=(0.90, 0.84), random_mask=(0.99, 0.99))
    assert select(s)["run_dir"] == "ticket2"  # finetune off: tickets only, never a control
    best = select(s, finetune=True)
    assert (best["kind"], best["level"], best["val_balanced_accuracy"]) == ("finetune", 1, 0.90)
    assert "pruned + fine-tuned" in best["rule"] and "lottery ticket" in best["rule"]
    tie = select(_summary(ticket=(0.85, 0.85), finetune=(0.85, 0.85)), finetune=True)
    assert (tie["kind"], tie["level"]) == ("ticket", 2)  # the sparser, then the ticket
    with pytest.raises(MedxferError, match="without a ticket"):
        select(_summary(random_reinit=(0.9,)))
    s = _summary(ticket=(0.80, 0.85), finetune=(0.90, 0.84), distill=(0.88, 0.91))
    assert select(s, finetune=True)["run_dir"] == "finetune1"  # distill off: not a candidate
    best = select(s, finetune=True, distill=True)
    assert (best["kind"], best["level"]) == ("distill", 2)
    assert "pruned + distilled from the dense model" in best["rule"]
    assert "distilled" not in best and "retrained distilled" not in select(s)["rule"]
    for level in s["levels"][1:]:  # a distilled lottery (prune.ticket_distill) says so
        level["runs"]["ticket"]["distilled"] = {"weight": 0.7, "temperature": 4.0}
    taught = select(s)
    assert taught["distilled"] == {"weight": 0.7, "temperature": 4.0}
    assert "lottery ticket (retrained distilled from the dense model)" in taught["rule"]


def test_finetune_baseline_keeps_the_lottery_folder(tmp_path: Path) -> None:
    """``prune.finetune`` reruns the prune stage (its fingerprint) in the same lottery folder,
    so the finished ticket and controls are reused."""
    import copy

    from medxfer.experiment.stages import Context, fingerprint, lottery_dir

    prints = {}
    for on in (False, True):
        exp = load_experiment(DEMO, [f"out_dir={tmp_path}", f"prune.finetune={on}"])
        cell = exp.cells()[0]
        ctx = Context(exp, cell, copy.deepcopy(cell.cfg), "medxfer run")
        prints[on] = fingerprint("prune", ctx), lottery_dir(ctx).name
    # old folder names kept: without the baseline the folder is named by the stage fingerprint
    assert f"prune-{prints[False][0]}" == prints[False][1] == prints[True][1]
    assert prints[True][0] != prints[False][0]


def test_lottery_folder_names_survive_keys_added_later() -> None:
    """A prune key added by a later medxfer (``LATER_KEYS``), at its default, leaves the
    lottery folder and the prune stage's fingerprint as they were, so a finished experiment is
    not pruned again after an upgrade; ``prune-structured``'s keys never touch them. Pinned:
    the name of a folder made before the distillation keys existed (``medxfer run
    configs/cpu-pneumonia-192.yaml prune.rewind=init prune.controls=false``, results table; that
    file is configs/pneumonia-cpu.yaml under another name)."""
    import copy

    from medxfer.experiment.stages import Context, fingerprint, lottery_dir

    over = [
        "prune.rewind=init",
        "prune.controls=false",
        "prune.finetune=false",
        "augment.policy=standard",
        "data.patient_regex=",
    ]  # the file's augmentation and image-wise validation when the folder was made
    names = {}
    extras = ([], ["prune.distill=0.7"], ["structured.distill=0.7"],
              ["prune.structured_distill=0.7"], ["prune.weights=last"],
              ["prune.weights=best"])  # fmt: skip
    for extra in extras:
        exp = load_experiment(REPO / "configs" / "pneumonia-cpu.yaml", [*over, *extra])
        cell = exp.cells()[0]
        ctx = Context(exp, cell, copy.deepcopy(cell.cfg), "medxfer run")
        names[len(extra) and extra[0]] = lottery_dir(ctx).name, fingerprint("prune", ctx)
    assert names[0] == names["structured.distill=0.7"] == ("prune-9b08eee9ff", "9b08eee9ff")
    assert names["prune.structured_distill=0.7"] == names[0]  # the old name of that key
    assert names["prune.distill=0.7"][0] == "prune-9b08eee9ff"  # adds a run, same folder
    assert names["prune.distill=0.7"][1] != "9b08eee9ff"  # the stage itself reruns
    assert names["prune.weights=last"] == names[0]  # the default, as before the key existed
    assert "9b08eee9ff" not in names["prune.weights=best"][0]  # another lottery, its own folder


def test_gan_folder_name_survives_the_quality_size_key() -> None:
    """``gan.quality_size`` (added later) at its default leaves the gan stage's fingerprint, so
    a finished experiment's GAN is not trained again after an upgrade. Pinned: the value since
    the quality gate and DiffAugment keys (which change what the stage makes, so a stage
    finished without the gate is redone), for ``configs/cpu-pneumonia.yaml`` (since merged
    into ``configs/pneumonia-cpu.yaml``: its GAN study is that file at 160 px, 5 epochs)."""
    import copy

    from medxfer.experiment.stages import Context, fingerprint

    prints = {}
    for extra in ([], ["gan.quality_size=64"]):
        old = ["data.image_size=160", "train.epochs=5", "augment.policy=standard",
               "data.patient_regex="]  # fmt: skip
        exp = load_experiment(REPO / "configs" / "pneumonia-cpu.yaml", [*old, *extra])
        cell = exp.cells()[0]
        prints[len(extra)] = fingerprint("gan", Context(exp, cell, copy.deepcopy(cell.cfg), "x"))
    assert prints[0] == "525c0b6b29" and prints[1] != prints[0]
