"""``medxfer evaluate``: evaluate a finished run's best checkpoint again with other eval settings.

The run's own ``config.yaml`` rebuilds exactly its data splits and model; only ``eval.*`` keys
may be overridden (anything else would describe another experiment). Results go to a separate
file, never over the run's ``metrics.json``. A run made before runs stored their validation
outputs gets ``val_predictions.npz`` (what ``medxfer shift`` reads) from an evaluation without
test-time flips, never replacing one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medxfer.config import load_config
from medxfer.errors import MedxferError
from medxfer.evaluate.metrics import compute_metrics
from medxfer.evaluate.unlabelled import STORED
from medxfer.train import compute as compute_mod
from medxfer.train.checkpoint import atomic_write_json, load_checkpoint
from medxfer.train.epoch import predict_probs
from medxfer.train.loop import save_predictions, tta_flips
from medxfer.train.setup import build


def evaluate_run(run_dir: Path, overrides: list[str], out_name: str) -> tuple[Path, dict[str, Any]]:
    if not (run_dir / "best.pt").exists() or not (run_dir / "config.yaml").exists():
        raise MedxferError(f"{run_dir} is not a trained run", "pass a folder of `medxfer train`")
    bad = [o for o in overrides if not o.startswith("eval.")]
    if bad:
        raise MedxferError(f"only eval.* settings can change here, not {bad}", "train a new run")
    cfg = load_config(run_dir / "config.yaml", overrides)
    c = compute_mod.resolve(cfg.train)
    s = build(cfg, c)
    best = load_checkpoint(run_dir / "best.pt")
    s.built.model.load_state_dict(best["model"])
    results: dict[str, Any] = {"run_dir": str(run_dir), "overrides": overrides}
    results |= {"best_epoch": best["epoch"] + 1, "tta_flips": tta_flips(cfg)}
    for split, loader in (("val", s.val_loader), ("test", s.test_loader)):
        if len(loader.indices):
            probs, labels = predict_probs(s.model, loader, c, tta=tta_flips(cfg), desc=split)
            results[split] = compute_metrics(
                labels, probs, s.data.classes, n_bootstrap=cfg.eval.n_bootstrap, seed=cfg.train.seed
            )
            # only a file `medxfer shift` can use (no test-time flips): never one it would skip
            if split == "val" and not tta_flips(cfg) and not (run_dir / STORED).exists():
                save_predictions(run_dir / STORED, probs, labels, cfg, c)
    out = run_dir / out_name
    atomic_write_json(results, out)
    return out, results
