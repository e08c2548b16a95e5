"""``medxfer evaluate``: evaluate a finished run's best checkpoint (or, with ``checkpoint="last"``,
its final epoch) again with other eval settings.

The run's own ``config.yaml`` rebuilds exactly its data splits and model; only ``eval.*`` keys
may be overridden (anything else would describe another experiment). Results go to a separate
file, never over the run's ``metrics.json``, with each split's probabilities beside it
(``<file stem>-<split>.npz``). A run made before runs stored their validation
outputs gets ``val_predictions.npz`` (what ``medxfer shift`` reads) from an evaluation without
test-time flips, never replacing one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medxfer.config import ExperimentConfig, load_config, with_values
from medxfer.errors import MedxferError
from medxfer.evaluate.metrics import compute_metrics
from medxfer.evaluate.unlabelled import STORED
from medxfer.train import compute as compute_mod
from medxfer.train.checkpoint import atomic_write_json, load_checkpoint, shipped_weights
from medxfer.train.epoch import predict_probs
from medxfer.train.loop import save_predictions, tta_flips
from medxfer.train.setup import build

CHECKPOINTS = ("best", "last")


def evaluate_run(
    run_dir: Path,
    overrides: list[str],
    out_name: str,
    checkpoint: str = "best",
    data: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Evaluate ``run_dir``'s ``<checkpoint>.pt`` on its validation and test splits into
    ``run_dir/out_name``; returns that path and the results. ``data``: where the run's dataset
    is now (default: where it was when the run trained)."""
    from medxfer.prune.magnitude import fold_reparam

    if checkpoint not in CHECKPOINTS:
        raise MedxferError(f"checkpoint {checkpoint!r} is not understood", "use best or last")
    if not (run_dir / "best.pt").exists() or not (run_dir / "config.yaml").exists():
        raise MedxferError(f"{run_dir} is not a trained run", "pass a folder of `medxfer train`")
    if not (run_dir / f"{checkpoint}.pt").exists():
        raise MedxferError(f"{run_dir} has no {checkpoint}.pt", "use --checkpoint best")
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise MedxferError(f"only eval.* settings can change here, not {bad}", "train a new run")
    cfg = load_config(run_dir / "config.yaml", overrides)
    cfg = locate_data(cfg, run_dir, data)
    c = compute_mod.resolve(cfg.train)
    s = build(cfg, c)
    ckpt = load_checkpoint(run_dir / f"{checkpoint}.pt")
    # a pruned run's last.pt: masked; a run with train.ema: its average is the model
    s.built.model.load_state_dict(fold_reparam(shipped_weights(ckpt)))
    out = run_dir / out_name
    results: dict[str, Any] = {"run_dir": str(run_dir), "overrides": overrides}
    results |= {"checkpoint": checkpoint, "epoch": ckpt["epoch"] + 1, "tta_flips": tta_flips(cfg)}
    if checkpoint == "best":
        results["best_epoch"] = results["epoch"]
    for split, loader in (("val", s.val_loader), ("test", s.test_loader)):
        if len(loader.indices):
            probs, labels = predict_probs(s.model, loader, c, tta=tta_flips(cfg), desc=split)
            results[split] = compute_metrics(
                labels, probs, s.data.classes, n_bootstrap=cfg.eval.n_bootstrap, seed=cfg.train.seed
            )
            save_predictions(out.with_name(f"{out.stem}-{split}.npz"), probs, labels, cfg, c)
            # only a file `medxfer shift` can use (no test-time flips): never one it would skip
            stored = run_dir / STORED
            usable = checkpoint == "best" and not tta_flips(cfg)
            if split == "val" and usable and not stored.exists():
                save_predictions(stored, probs, labels, cfg, c)
    atomic_write_json(results, out)
    return out, results


def locate_data(cfg: ExperimentConfig, run_dir: Path, data: Path | None) -> ExperimentConfig:
    """``cfg`` with ``data.root`` pointed at the run's dataset: ``data`` when given, else the
    root as written if it exists from here, else the absolute path the run recorded in
    data.json (a relative root was relative to where training ran)."""
    if data is not None:
        if not data.exists():
            raise MedxferError(f"--data {data} does not exist", "pass the run's dataset folder")
        return with_values(cfg, {"data.root": str(data.resolve())})
    root = cfg.data.root
    if not root or Path(root).expanduser().exists():
        return cfg
    info = run_dir / "data.json"
    recorded = json.loads(info.read_text()).get("root_absolute") if info.exists() else None
    if recorded and Path(recorded).exists():
        return with_values(cfg, {"data.root": recorded})
    raise MedxferError(
        f"the run's dataset {root} is not found from {Path.cwd()}",
        "pass --data with the dataset folder (or CSV manifest) it was trained on",
    )
