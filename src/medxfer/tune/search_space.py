"""The search space: ``tune.space`` (dotted config key -> distribution), checked before any trial.

    tune:
      space:
        train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        train.batch_size: {type: categorical, choices: [16, 32, 64]}
        model.freeze: {type: categorical, choices: [none, head]}

Every key must be a config key that ``medxfer train`` accepts, and every value the space can
produce must pass the same checks a config file does, so a typo fails at once with one message
instead of after hours of trials.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import optuna

from medxfer.config import ExperimentConfig, apply_overrides, validate
from medxfer.errors import MedxferError

TYPES = ("float", "int", "categorical")
SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}
FIX = "see tune.space in the README: {type: float|int|categorical, low, high, log, choices}"


@dataclass(frozen=True)
class Param:
    """One dimension of the search space."""

    key: str  # dotted config key, also the Optuna parameter name
    type: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def values_to_check(self) -> list[Any]:
        """The values that must all be valid config values (the bounds or every choice)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            step = 1 if self.step is None else int(self.step)
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def _error(key: str, problem: str) -> MedxferError:
    return MedxferError(f"tune.space[{key!r}]: {problem}", FIX)


def _number(key: str, spec: dict[str, Any], name: str, integer: bool) -> float:
    value = spec.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(key, f"{name} must be a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise _error(key, f"{name} must be an integer for type int, got {value!r}")
    if not math.isfinite(value):
        raise _error(key, f"{name} must be finite")
    return float(value)


def _range(key: str, typ: str, spec: dict[str, Any]) -> Param:
    low = _number(key, spec, "low", typ == "int")
    high = _number(key, spec, "high", typ == "int")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _error(key, f"log must be true or false, got {log!r}")
    if low > high:
        raise _error(key, f"the range is inverted (low {low:g} > high {high:g})")
    if low == high:
        raise _error(key, f"the range is empty (low = high = {low:g}); use a fixed config value")
    if log and low <= 0:
        raise _error(key, f"a log range needs low > 0, got {low:g}")
    step = None
    if spec.get("step") is not None:
        step = _number(key, spec, "step", typ == "int")
        if step <= 0:
            raise _error(key, "step must be positive")
        if log and (typ == "float" or step != 1):
            raise _error(key, "step and log cannot be combined")
    return Param(key, typ, low=low, high=high, log=log, step=step)


def _categorical(key: str, spec: dict[str, Any]) -> Param:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _error(key, "a categorical parameter needs a non-empty list of choices")
    for c in choices:
        if c is not None and not isinstance(c, bool | int | float | str):
            raise _error(key, f"choice {c!r} is not a number, string, boolean or null")
    if len(set(map(repr, choices))) != len(choices):
        raise _error(key, "the choices repeat a value")
    return Param(key, "categorical", choices=tuple(choices))


def parse_param(key: str, spec: Any) -> Param:
    if not isinstance(spec, dict):
        raise _error(key, "must be a mapping such as {type: float, low: ..., high: ...}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise _error(key, f"unknown field(s) {', '.join(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    typ = spec.get("type")
    if typ not in TYPES:
        raise _error(key, f"type must be one of {list(TYPES)}, got {typ!r}")
    if typ == "categorical":
        extra = sorted({"low", "high", "log", "step"} & set(spec))
        if extra:
            raise _error(key, f"{', '.join(extra)} do(es) not apply to a categorical parameter")
        return _categorical(key, spec)
    if "choices" in spec:
        raise _error(key, f"choices do not apply to type {typ}")
    return _range(key, typ, spec)


def assignment(key: str, value: Any) -> str:
    """A ``key=value`` override for ``config.apply_override`` (JSON is valid YAML)."""
    return f"{key}={json.dumps(value)}"


def apply_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """A copy of ``cfg`` with the sampled values set; checked like a config file."""
    out = apply_overrides(cfg, [assignment(key, value) for key, value in params.items()])
    validate(out)
    return out


def _check_value(cfg: ExperimentConfig, p: Param, value: Any) -> None:
    try:
        apply_params(cfg, {p.key: value})
    except MedxferError as err:
        raise MedxferError(f"tune.space[{p.key!r}] = {value!r}: {err.message}", err.fix) from None
    if p.key == "model.arch":
        from medxfer.models import list_models

        if value not in list_models():
            raise _error(p.key, f"unknown architecture {value!r}; known: {list_models()}")


def parse_space(space: Any, cfg: ExperimentConfig) -> list[Param]:
    """Parse and check ``tune.space`` against ``cfg``; raise one ``MedxferError`` if wrong."""
    if not isinstance(space, dict) or not space:
        raise MedxferError("tune.space is empty: nothing to search", FIX)
    params = []
    for key, spec in space.items():
        if not isinstance(key, str) or key.split(".")[0] in ("tune", "name", "out_dir"):
            raise _error(str(key), "cannot be searched (tune.*, name and out_dir are not)")
        p = parse_param(key, spec)
        for value in p.values_to_check():
            _check_value(cfg, p, value)
        params.append(p)
    return params


def suggest(trial: optuna.Trial, params: list[Param]) -> dict[str, Any]:
    return {p.key: p.suggest(trial) for p in params}
