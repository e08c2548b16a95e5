"""Experiment files: a plain config plus ``stages``, ``matrix`` and ``report``; cells.

    exp = load_experiment("configs/demo.yaml", ["train.epochs=1", "stages.gan=false"])
    for cell in exp.cells(): ...

An experiment file is a superset of a ``medxfer train`` config (``load_config`` ignores the
three extra keys), so the same file also trains, tunes or prunes on its own. ``matrix`` maps
dotted config keys to lists of values; every combination is one cell with its own folder. A
command-line override of a matrix key replaces that axis (``model.arch=resnet18`` runs just it).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medxfer.config import (
    ExperimentConfig,
    apply_override,
    apply_overrides,
    load_config,
    renamed_key,
    validate,
    with_values,
)
from medxfer.errors import MedxferError

STAGES = ("audit", "gan", "tune", "train", "prune", "evaluate", "report")


@dataclass
class Stages:
    """Which stages run (all by default); ``medxfer run ... stages.gan=false`` turns one off."""

    audit: bool = True  # duplicates and train/test leaks
    gan: bool = True  # WGAN-GP images for the minority classes
    tune: bool = True  # Optuna search on validation
    train: bool = True  # fine-tune with the best values
    prune: bool = True  # lottery tickets and their controls
    evaluate: bool = True  # test metrics, Grad-CAM
    report: bool = True  # report.html and report.md

    def on(self, stage: str) -> bool:
        return bool(getattr(self, stage))


@dataclass
class ReportOptions:
    gradcam_per_class: int = 2  # Grad-CAM: this many correct and this many wrong test images
    gan_samples_per_class: int = 6  # real and synthetic images shown per class


@dataclass
class Cell:
    """One combination of the matrix: its config and its folder."""

    name: str
    cfg: ExperimentConfig
    dir: Path
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    path: Path | None
    base: ExperimentConfig
    stages: Stages
    report: ReportOptions
    matrix: dict[str, list[Any]]
    overrides: list[str]

    @property
    def dir(self) -> Path:
        return Path(self.base.out_dir) / "experiments" / self.base.name

    def cells(self) -> list[Cell]:
        """Every matrix combination (one cell, the experiment folder itself, without a matrix)."""
        if not self.matrix:
            return [Cell("main", self.base, self.dir)]
        keys = list(self.matrix)
        out = []
        for combo in itertools.product(*(self.matrix[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            cfg = apply_overrides(self.base, [f"{k}={_yaml_scalar(v)}" for k, v in values.items()])
            validate(cfg)
            name = cell_name(values)
            out.append(Cell(name, cfg, self.dir / name, values))
        return out


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def cell_name(values: dict[str, Any]) -> str:
    """A folder name from the cell's values: ``efficientnet_lite0-brain-tumor-mri``."""
    parts = []
    for key, value in values.items():
        text = Path(str(value)).name if key == "data.root" else str(value)
        parts.append(re.sub(r"[^A-Za-z0-9_.]+", "-", text or "synthetic").strip("-"))
    return "-".join(parts) or "main"


def _section(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise MedxferError(f"{key!r} in an experiment file must be a mapping")
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise MedxferError(
            f"unknown {key} key(s) {', '.join(unknown)}", f"valid names: {', '.join(valid)}"
        )
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for k, v in raw.items():
        want = bool if types[k] in (bool, "bool") else int
        if want is bool and not isinstance(v, bool):
            raise MedxferError(f"{key}.{k} must be true or false, not {v!r}")
        if want is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise MedxferError(f"{key}.{k} must be a non-negative integer, not {v!r}")
        out[k] = v
    return cls(**out)


def _split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Dotted overrides for the config, and those for ``stages.*`` / ``report.*``."""
    plain, extra = [], {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] in ("stages", "report"):
            if "=" not in item or key.count(".") != 1:
                raise MedxferError(f"override {item!r} is not of the form stages.NAME=value")
            extra[key] = item.split("=", 1)[1]
        else:
            plain.append(item)
    return plain, extra


def _resolve_root(cfg: ExperimentConfig, path: Path | None) -> ExperimentConfig:
    """A relative data.root that is absent from here is looked up beside the repository, so
    ``configs/cpu-*.yaml`` work from any folder (``../shared/data/<name>`` from the repo)."""
    root = cfg.data.root
    if not root or Path(root).is_absolute() or Path(root).exists() or path is None:
        return cfg
    repo = path.resolve().parent.parent
    if (repo / root).exists():
        return with_values(cfg, {"data.root": str((repo / root).resolve())})
    return cfg


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> Experiment:
    """Read an experiment file, apply overrides; matrix keys are checked against the config."""
    p = Path(path) if path else None
    raw: dict[str, Any] = {}
    if p is not None:
        if not p.exists():
            raise MedxferError(f"experiment file {p} does not exist", "e.g. configs/demo.yaml")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise MedxferError(f"experiment file {p} must hold a mapping at the top level")
    plain, extra = _split_overrides(list(overrides or []))
    stages_raw = dict(raw.get("stages") or {})
    report_raw = dict(raw.get("report") or {})
    for key, value in extra.items():
        section, name = key.split(".")
        (stages_raw if section == "stages" else report_raw)[name] = yaml.safe_load(value)
    stages = _section(Stages, stages_raw, "stages")
    report = _section(ReportOptions, report_raw, "report")
    matrix = raw.get("matrix") or {}
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise MedxferError(
            "matrix must map config keys to non-empty lists",
            "e.g. matrix: {model.arch: [googlenet, resnet50]}",
        )
    overridden = {renamed_key(o.split("=", 1)[0].strip()) for o in plain}  # old names too
    matrix = {k: list(v) for k, v in matrix.items() if renamed_key(k) not in overridden}
    base = load_config(p, plain)
    base = _resolve_root(base, p)
    for key, values in matrix.items():  # every value must be a valid override of the base
        for value in values:
            apply_override(base, f"{key}={_yaml_scalar(value)}")
    if "data.root" in matrix:
        matrix["data.root"] = [_rooted(v, p) for v in matrix["data.root"]]
    return Experiment(p, base, stages, report, matrix, list(overrides or []))


def _rooted(value: Any, path: Path | None) -> Any:
    probe = with_values(ExperimentConfig(), {"data.root": str(value)})
    return _resolve_root(probe, path).data.root
