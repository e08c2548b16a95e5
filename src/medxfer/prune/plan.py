"""What a lottery is asked to do, validated once: settings, the sparsity schedule, and the
binding of an output folder to its settings (a rerun with other settings is refused, so one
folder never mixes two experiments)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from medxfer.config import ExperimentConfig, PruneConfig, lottery_key, with_values
from medxfer.errors import MedxferError
from medxfer.runs import make_run_dir
from medxfer.train.checkpoint import atomic_write_json


@dataclass(frozen=True)
class Settings:
    """What a lottery folder was made with; a rerun with other settings is refused."""

    fingerprint: str
    levels: int
    fraction: float
    target_sparsity: float | None
    rewind: str
    controls: bool
    include_head: bool
    finetune: bool
    finetune_lr_scale: float
    distill: float = 0.0
    distill_temperature: float = 4.0
    weights: str = "last"  # last.pt or best.pt of each finished run is what the next level uses
    ticket_distill: float = 0.0  # > 0: ticket and controls learn from the dense model too

    @property
    def rewind_epoch(self) -> int:
        """K for ``epoch:K`` (retraining starts at epoch K of the schedule), else 0."""
        return int(self.rewind.split(":")[1]) if self.rewind.startswith("epoch:") else 0

    def key(self) -> dict[str, Any]:
        """The settings a folder is bound to. Levels may grow when each round prunes a fraction;
        the fine-tuning baseline only adds runs beside the others (``ADDITIVE``), so switching
        it on for a finished lottery trains just those runs; so do the controls: a lottery run
        without them may have them added later (into its folder, given by ``--out``)."""
        d = asdict(self)
        if self.target_sparsity is None:
            d.pop("levels")
        for k in (*ADDITIVE, "controls"):
            d.pop(k)
        if self.ticket_distill:  # then the temperature shapes every pruned run
            d["distill_temperature"] = self.distill_temperature
        return d


# Settings that add runs to a lottery folder without changing any run already in it (the
# distillation baseline's own run is bound to its weight and temperature: ``check_run``). The
# controls add runs too, but a folder's name keeps them (``folder_key``): folders made without
# them were named so, and renaming would lose them.
ADDITIVE = ("finetune", "distill", "distill_temperature")


def folder_key(p: PruneConfig) -> dict[str, Any]:
    """The prune settings a lottery folder is named by: ``lottery_key`` with the settings that
    only add runs (``ADDITIVE``) at their defaults, so switching one on for a finished lottery
    finds its folder and trains just the added runs."""
    defaults = asdict(PruneConfig())
    additive = [k for k in ADDITIVE if not (p.ticket_distill and k == "distill_temperature")]
    return lottery_key(replace(p, **{k: defaults[k] for k in additive}))


def lottery_folder(cfg: ExperimentConfig, target_sparsity: float | None) -> Path:
    """Where ``medxfer prune`` keeps a lottery: ``<out_dir>/<name>-<fingerprint>-lottery-<tag>``,
    the tag hashing ``folder_key`` (the settings that only add runs, --finetune / --distill, at
    their defaults, so adding one continues the finished lottery). A folder named the earlier
    way (by ``lottery_key``, with them) is still found when it exists and the new one does not.
    """

    def folder(key: dict[str, Any]) -> Path:
        bound = key | {"target_sparsity": target_sparsity}  # more levels continue the same folder
        if target_sparsity is None:
            bound.pop("levels")
        tag = hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()[:8]
        return Path(cfg.out_dir) / f"{cfg.name}-{cfg.fingerprint()}-lottery-{tag}"

    out, older = folder(folder_key(cfg.prune)), folder(lottery_key(cfg.prune))
    return older if not out.exists() and older.exists() else out


def lottery_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config every lottery run trains: ``prune.image_size`` / ``prune.epochs`` (when set)
    replace the data size and the epochs, e.g. a cheaper lottery beside a full-size train."""
    out = cfg
    if cfg.prune.image_size > 0:
        out = with_values(out, {"data.image_size": cfg.prune.image_size})
    if cfg.prune.epochs > 0:
        out = with_values(out, {"train.epochs": cfg.prune.epochs})
    return out


def make_settings(cfg: ExperimentConfig, **kw: Any) -> Settings:
    s = Settings(fingerprint=cfg.fingerprint(), **kw)
    if s.levels < 1:
        raise MedxferError(f"levels={s.levels}: need at least one pruning level", "e.g. --levels 5")
    if s.target_sparsity is not None and not 0.0 < s.target_sparsity < 1.0:
        raise MedxferError(
            f"target sparsity {s.target_sparsity} is not in (0, 1)", "e.g. --target-sparsity 0.9"
        )
    if s.finetune_lr_scale <= 0:
        raise MedxferError("prune.finetune_lr_scale must be positive", "e.g. 0.1")
    from medxfer.train.distill import check

    for weight in (s.distill, s.ticket_distill):
        if weight:
            check(weight, s.distill_temperature)
    if s.weights not in ("last", "best"):
        raise MedxferError(f"prune.weights={s.weights!r} is not understood", "use last or best")
    if not 0.0 < s.fraction < 1.0:
        raise MedxferError(f"pruning fraction {s.fraction} is not in (0, 1)", "e.g. --fraction 0.2")
    ok = s.rewind in ("init", "lr") or (
        s.rewind.startswith("epoch:") and s.rewind[6:].isdigit() and int(s.rewind[6:]) >= 1
    )
    if not ok:
        raise MedxferError(f"rewind={s.rewind!r} is not understood", "use init, epoch:K or lr")
    if s.rewind_epoch >= cfg.train.epochs:
        raise MedxferError(
            f"rewind to epoch {s.rewind_epoch} needs more than {cfg.train.epochs} training epochs",
            "choose a smaller K in --rewind epoch:K or raise train.epochs",
        )
    return s


def kept_schedule(total: int, s: Settings) -> list[int]:
    """Weights kept after each level 0..L: a fraction of the survivors per round, or a
    geometric schedule that ends exactly at the target sparsity."""
    kept = [total]
    for k in range(1, s.levels + 1):
        if s.target_sparsity is None:
            kept.append(kept[-1] - round(kept[-1] * s.fraction))
        else:
            kept.append(round(total * (1.0 - s.target_sparsity) ** (k / s.levels)))
    return kept


def bind_folder(out_dir: Path, s: Settings) -> None:
    """Record ``s`` in ``out_dir/settings.json``; refuse a folder made with other settings."""
    path = out_dir / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        # a setting added after a folder was made: the folder was made at its default
        later = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}
        if {k: old.get(k, later.get(k)) for k in s.key()} != s.key():
            raise MedxferError(
                f"{out_dir} holds a lottery run with other settings ({old})",
                "use another --out folder, or --force to start again",
            )
    make_run_dir(out_dir, "lottery")
    atomic_write_json(asdict(s), path)
