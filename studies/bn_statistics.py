"""BatchNorm statistics after training and at a new site, measured on finished runs.

    python studies/bn_statistics.py NAME RUN [RUN ...] [--extra train.threads=2]

For each trained run (a `medxfer train` folder, or a lottery level's `dense`/`ticket` folder),
rebuilt from its own config.yaml and best.pt, without training anything:

1. **Recalibration** (`train.bn_recalibrate`, what every training run now ends with): the
   BatchNorm statistics re-estimated on the un-augmented training images. Recorded: validation
   and test accuracy before and after, and what the rule (keep when validation balanced accuracy
   does not drop) chose. Validation decides; test is recorded, never used.
2. **Adaptation to the test split** (`medxfer adapt`, AdaBN) from the model as trained and from
   the rule's model: 2-fold cross-fitted (statistics from one half of the test images, scored on
   the other), so no image is scored by statistics it shaped.

Writes studies/results/bn-statistics/NAME.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import STUDY_RESULTS, abspath, save

from medxfer.config import load_config
from medxfer.evaluate.adapt import cross_fitted_check
from medxfer.prune.magnitude import fold_reparam
from medxfer.train import compute as compute_mod
from medxfer.train.batchnorm import recompute_batchnorm
from medxfer.train.checkpoint import load_checkpoint
from medxfer.train.epoch import predict_probs
from medxfer.train.loop import checkpoint_meta, plain_train_loader, recalibrate_batchnorm
from medxfer.train.setup import build


def scores(s: Any, c: Any) -> dict[str, Any]:
    out = {}
    for split, loader in (("val", s.val_loader), ("test", s.test_loader)):
        probs, labels = predict_probs(s.model, loader, c, tta=[], desc=f"  {split}")
        pred = probs.argmax(1)
        recall = [float((pred[labels == j] == j).mean()) for j in range(probs.shape[1])]
        out[split] = {"accuracy": float((pred == labels).mean()),
                      "balanced_accuracy": statistics.fmean(recall),
                      "recall": dict(zip(s.data.classes, recall, strict=True))}  # fmt: skip
    return out


def measure(run_dir: Path, extra: list[str]) -> dict[str, Any]:
    cfg = load_config(run_dir / "config.yaml", extra)
    c = compute_mod.resolve(cfg.train)
    s = build(cfg, c)
    s.model.load_state_dict(fold_reparam(load_checkpoint(run_dir / "best.pt")["model"]))
    s.model.eval()
    meta = checkpoint_meta(cfg, s)
    test_idx = s.data.split_index["test"]
    test_images, test_labels = s.data.images[test_idx].numpy(), s.data.labels[test_idx].numpy()
    trained = scores(s, c)
    adapt_trained = cross_fitted_check(s.model, meta, test_images, test_labels)
    t0 = time.perf_counter()
    rule = recalibrate_batchnorm(s, c, cfg)
    assert rule is not None
    seconds = time.perf_counter() - t0
    chosen = scores(s, c)
    adapt_chosen = cross_fitted_check(s.model, meta, test_images, test_labels)
    if rule["kept"]:
        recalibrated = chosen
    else:  # the rule restored the trained statistics: measure the recalibrated ones anyway
        recompute_batchnorm(s.model, (x for x, _ in plain_train_loader(s, c, cfg)))
        recalibrated = scores(s, c)

    def short(check: dict[str, Any]) -> dict[str, Any]:
        return {k: check[k] for k in ("accuracy_difference", "accuracy_difference_ci95",
                                      "balanced_accuracy_difference")} | {
            "unadapted_accuracy": check["unadapted"]["accuracy"],
            "adapted_accuracy": check["adapted"]["accuracy"],
            "adapted_recall": check["adapted"]["recall"]}  # fmt: skip

    row = {
        "run_dir": str(run_dir),
        "arch": cfg.model.arch,
        "image_size": cfg.data.image_size,
        "recalibration": rule | {"seconds_with_two_validations": seconds},
        "trained": trained,
        "recalibrated": recalibrated,
        "rule": chosen,
        "adapted_to_test_from_trained": short(adapt_trained),
        "adapted_to_test_from_rule": short(adapt_chosen),
    }
    val0, val1 = trained["val"]["accuracy"], recalibrated["val"]["accuracy"]
    print(f"{run_dir}: val {val0:.3f} -> {val1:.3f}"
          f" ({'kept' if rule['kept'] else 'not kept'}); test {trained['test']['accuracy']:.3f} -> "
          f"{recalibrated['test']['accuracy']:.3f}; rule test {chosen['test']['accuracy']:.3f}; "
          f"adapted to test: {adapt_trained['adapted']['accuracy']:.3f} from trained, "
          f"{adapt_chosen['adapted']['accuracy']:.3f} from rule", flush=True)  # fmt: skip
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_diff(a: str, b: str, split: str, metric: str = "accuracy") -> dict[str, Any]:
        d = [r[b][split][metric] - r[a][split][metric] for r in rows]
        m = statistics.fmean(d)
        half = 0.0
        if len(d) > 1:
            from scipy import stats

            half = float(stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / np.sqrt(len(d)))
        return {"mean": m, "ci95": [m - half, m + half], "n": len(d), "values": d}

    return {
        "kept": f"{sum(r['recalibration']['kept'] for r in rows)} of {len(rows)}",
        "recalibrated_minus_trained": {
            f"{split}_{metric}": mean_diff("trained", "recalibrated", split, metric)
            for split in ("val", "test") for metric in ("accuracy", "balanced_accuracy")
        },
        "rule_minus_trained": {
            f"{split}_{metric}": mean_diff("trained", "rule", split, metric)
            for split in ("val", "test") for metric in ("accuracy", "balanced_accuracy")
        },
        "trained_test_accuracy_mean": statistics.fmean(r["trained"]["test"]["accuracy"]
                                                       for r in rows),
        "rule_test_accuracy_mean": statistics.fmean(r["rule"]["test"]["accuracy"] for r in rows),
        "adapted_to_test_from_trained_accuracy_difference_mean": statistics.fmean(
            r["adapted_to_test_from_trained"]["accuracy_difference"] for r in rows),
        "adapted_to_test_from_rule_accuracy_difference_mean": statistics.fmean(
            r["adapted_to_test_from_rule"]["accuracy_difference"] for r in rows),
        "adapted_to_test_from_rule_accuracy_mean": statistics.fmean(
            r["adapted_to_test_from_rule"]["adapted_accuracy"] for r in rows),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="results go to studies/results/bn-statistics/NAME.json")
    p.add_argument("runs", type=abspath, nargs="+")
    p.add_argument("--extra", nargs="*", default=[], help="overrides, e.g. train.threads=2")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = [measure(r, args.extra) for r in args.runs]
    save(f"bn-statistics/{args.name}", root=STUDY_RESULTS, payload={
        "runs": rows,
        "protocol": "each run rebuilt from its config.yaml and best.pt (pruning masks folded in); "
                    "recalibration on the un-augmented training split (eval batch size, seeded "
                    "shuffle); adaptation 2-fold cross-fitted on the test split, seed 0",
        "summary": summary(rows),
    })  # fmt: skip


if __name__ == "__main__":
    main()
