from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medxfer.config import (
    LATER_KEYS,
    ExperimentConfig,
    apply_override,
    apply_overrides,
    choices,
    drop_later_defaults,
    load_config,
    save_config,
    with_values,
)
from medxfer.errors import MedxferError


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.lr=3e-4", "augment.hflip=false", "train.epochs=3"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.augment.hflip is False
    assert cfg.train.epochs == 3


def test_unknown_key_lists_valid_names() -> None:
    with pytest.raises(MedxferError) as err:
        load_config(None, ["train.lrr=1"])
    assert "train.lrr" in str(err.value) and "weight_decay" in str(err.value)


def test_unknown_yaml_key_rejected(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("train:\n  epochs: 2\n  bogus: 1\n")
    with pytest.raises(MedxferError, match=r"train\.bogus"):
        load_config(f)


def test_bad_value_and_choice() -> None:
    with pytest.raises(MedxferError, match="not a valid int"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(MedxferError, match="optimizer"):
        load_config(None, ["train.optimizer=adam9"])


def test_yaml_then_overrides_roundtrip(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("name: demo\nmodel:\n  arch: resnet18\ntrain:\n  lr: 0.01\n")
    cfg = load_config(f, ["train.lr=0.02"])
    assert (cfg.name, cfg.model.arch, cfg.train.lr) == ("demo", "resnet18", 0.02)
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and again.fingerprint() == cfg.fingerprint()


def test_fingerprint_ignores_output_location() -> None:
    a, b = ExperimentConfig(), ExperimentConfig(out_dir="elsewhere", name="other")
    assert a.fingerprint() == b.fingerprint()
    b = with_values(b, {"train.lr": 0.5})
    assert a.fingerprint() != b.fingerprint()


def test_config_is_frozen_and_with_values_replaces_nested_sections() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 0.5  # type: ignore[misc]
    out = with_values(cfg, {"train.threads": 1, "data.root": "x", "name": "n"})
    assert (out.train.threads, out.data.root, out.name) == (1, "x", "n")
    assert (cfg.train.threads, cfg.data.root, cfg.name) == (0, "", "run")  # unchanged
    assert out.model is cfg.model  # untouched sections are shared (they are frozen)


def test_apply_overrides_returns_a_new_config_and_keeps_its_messages() -> None:
    cfg = ExperimentConfig()
    out = apply_overrides(cfg, ["train.lr=0.5", "augment.hflip=off"])
    assert (out.train.lr, out.augment.hflip, cfg.train.lr) == (0.5, False, 1e-3)
    with pytest.raises(MedxferError, match=r"unknown config key 'train\.nope'"):
        apply_override(cfg, "train.nope=1")
    with pytest.raises(MedxferError, match="not of the form key=value"):
        apply_override(cfg, "train.lr")
    with pytest.raises(MedxferError, match="has no sub-keys"):
        apply_override(cfg, "name.x=1")


def test_shipped_configs_load() -> None:
    for f in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(f)


def test_later_keys_are_hashed_only_away_from_their_defaults() -> None:
    from medxfer.tune.study import study_fingerprint

    base = ExperimentConfig()
    assert "synthetic_ratio" not in drop_later_defaults(base.to_dict())["data"]
    for section, keys in LATER_KEYS.items():
        for key in keys:
            d = base.to_dict()
            d[section].pop(key)  # a config written before the key existed
            assert drop_later_defaults(d) == drop_later_defaults(base.to_dict())
    # set away from the default, each key changes what it identifies
    ratio = load_config(None, ["data.synthetic_ratio=0.5"])
    assert ratio.fingerprint() != base.fingerprint()
    by_patient = load_config(None, [r"data.patient_regex=^(person\d+)"])
    assert by_patient.fingerprint() != base.fingerprint()  # another split, another run
    low = load_config(None, ["tune.image_size=96"])
    assert low.fingerprint() == base.fingerprint()  # a trained run does not depend on tune
    assert study_fingerprint(low) != study_fingerprint(base)


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("data.color=cmyk", "['gray', 'rgb']"),
        ("train.precision=fp8", "['auto', 'bf16', 'fp16', 'fp32']"),
        ("gan.recipe=tpu", "['', 'cpu-64', 'cpu-64-projected', 'gpu-128']"),
        ("tune.pruner=fast", "['halving', 'hyperband', 'median', 'none']"),
    ],
)
def test_literal_keys_are_checked_from_their_type_hints(override: str, allowed: str) -> None:
    key, value = override.split("=")
    with pytest.raises(MedxferError) as err:
        load_config(None, [override])
    assert err.value.message == f"{key}={value!r} is not allowed"
    assert err.value.fix == f"use one of {allowed}"


def test_choices_come_from_the_literal_type_hints() -> None:
    allowed = choices()
    assert allowed["data.color"] == ("gray", "rgb")
    assert allowed["prune.weights"] == ("last", "best")
    assert "prune.rewind" not in allowed  # epoch:K is not a fixed set
    assert load_config(None, ["model.freeze=head"]).model.freeze == "head"
