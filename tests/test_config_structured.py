"""The `structured` section (the channel-pruning keys that were ``prune.structured_*``): old
names still read, from files, overrides and stored configs, and old run folders resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from medxfer.config import (
    ExperimentConfig,
    PruneConfig,
    config_from_dict,
    config_text,
    legacy_override,
    load_config,
    lottery_key,
    with_values,
)
from medxfer.errors import MedxferError

FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=2",
    "train.batch_size=16", "eval.n_bootstrap=50", "train.eval_batch_size=64",
    "train.steps_per_epoch=2", "trust.enabled=false",
]  # fmt: skip


def legacy_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg.to_dict()`` as medxfer wrote it before the `structured` section: the keys inside
    ``prune`` as ``structured_*``, after ``prune.epochs``."""
    d = cfg.to_dict()
    structured = d.pop("structured")
    d["prune"] |= {f"structured_{k}": v for k, v in structured.items()}
    return d


def test_old_and_new_names_read_the_same() -> None:
    new = load_config(None, ["structured.distill=0.7", "structured.steps=2", "train.lr=0.01"])
    old = load_config(None, ["prune.structured_distill=0.7", "prune.structured_steps=2",
                             "train.lr=0.01"])  # fmt: skip
    assert old == new and (new.structured.distill, new.structured.steps) == (0.7, 2)
    assert config_from_dict(legacy_dict(new)) == new  # a stored config (settings, model files)
    # the fingerprint of this config before the section existed (a run folder's name)
    assert new.fingerprint() == "cbfa579e4f46"
    assert "structured:\n  ratio: 0.0\n" in config_text(new)  # written in the new section
    assert "structured_" not in config_text(new)


def test_old_names_in_a_config_file(tmp_path: Path) -> None:
    cfg = with_values(ExperimentConfig(), {"structured.ratio": 0.4, "structured.warmup": 1.0})
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(legacy_dict(cfg), sort_keys=False))
    assert load_config(f) == cfg
    # given under both names, the new one wins
    f.write_text("prune:\n  structured_ratio: 0.4\nstructured:\n  ratio: 0.5\n")
    assert load_config(f).structured.ratio == 0.5
    f.write_text("prune:\n  structured_bogus: 1\n")
    with pytest.raises(MedxferError, match=r"unknown config key\(s\) prune\.structured_bogus"):
        load_config(f)


def test_override_errors_name_the_key_as_given() -> None:
    with pytest.raises(MedxferError, match=r"'prune\.structured_steps': 'x' is not a valid int"):
        load_config(None, ["prune.structured_steps=x"])
    with pytest.raises(MedxferError, match=r"structured\.steps must be in 1\.\.64"):
        load_config(None, ["prune.structured_steps=0"])
    with pytest.raises(MedxferError, match=r"unknown config key 'prune\.structured_nope'"):
        load_config(None, ["prune.structured_nope=1"])


def test_legacy_override_spelling_keeps_folder_names() -> None:
    assert legacy_override("structured.ratio=0.5") == "prune.structured_ratio=0.5"
    assert legacy_override("prune.structured_ratio=0.5") == "prune.structured_ratio=0.5"
    assert legacy_override("train.lr=0.1") == "train.lr=0.1"


def test_a_command_line_key_replaces_a_matrix_axis_under_its_old_name(tmp_path: Path) -> None:
    from medxfer.experiment.spec import load_experiment

    f = tmp_path / "exp.yaml"
    f.write_text("matrix:\n  prune.structured_ratio: [0.2, 0.3]\n")
    exp = load_experiment(f, ["structured.ratio=0.5"])
    assert exp.matrix == {} and exp.base.structured.ratio == 0.5


def _digest(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def test_lottery_hashes_are_unchanged() -> None:
    """Lottery folder and stage hashes as they were with ``prune.structured_*`` keys."""
    from medxfer.prune.plan import folder_key

    assert _digest(lottery_key(PruneConfig())) == "97ee920b8c0c"
    p = load_config(None, ["prune.distill=0.5", "structured.ratio=0.3", "prune.weights=best"])
    assert (_digest(lottery_key(p.prune)), _digest(folder_key(p.prune))) == (
        "0ddb84b5b035", "9417d5f77173")  # fmt: skip


@pytest.mark.slow
def test_old_run_folder_with_old_keys_resumes(synth_root: Path, tmp_path: Path) -> None:
    """A run interrupted under a medxfer that wrote ``prune.structured_*`` into its config.yaml
    resumes from that file with no "config changed" refusal."""
    from stopping import StopAfterOneEpoch, Stopped

    from medxfer.cli import main
    from medxfer.train.loop import fit

    run = tmp_path / "run"
    cfg = load_config(None, [f"data.root={synth_root}", *FAST, "structured.distill=0.7"])
    with pytest.raises(Stopped):
        fit(cfg, run, callbacks=(StopAfterOneEpoch(),))
    # the folder as the older medxfer left it: its config.yaml names the old keys
    (run / "config.yaml").write_text(yaml.safe_dump(legacy_dict(cfg), sort_keys=False))
    stored = json.loads((run / "fingerprint.json").read_text())
    assert not any(k.startswith(("prune.", "structured.")) for k in stored["config_values"])
    args = ["train", "--config", str(run / "config.yaml"), "--run-dir", str(run), "--resume"]
    assert main(args) == 0
    assert (run / "metrics.json").exists()
