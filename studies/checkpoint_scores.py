"""Which dense weights does a lottery start from, and how do they score?

    python studies/checkpoint_scores.py LOTTERY_DIR [--out NAME]

A lottery prunes the dense level 0's *final* weights (``last.pt``, as open_lth does; with
``prune.weights: best`` its best.pt instead); the learning-rate rewinding ticket, the
fine-tuning and the distillation baselines also start from them, and the distillation teacher
is them. The dense score a results table shows is that of
its *best* checkpoint on validation (``best.pt``, ``metrics.json``). This evaluates the final
weights on validation and test with the run's own config (its splits, its eval settings) and
sets every run of the lottery beside both: scores, recall per class, and how often each
pruned model's test prediction agrees with each dense checkpoint's. Writes
studies/results/checkpoint-scores/<--out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common, pruning

from _common import REPO, STUDY_RESULTS, abspath, save

from medxfer.errors import MedxferError


def _scores(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "recall": {c: v["recall"] for c, v in m["per_class"].items()},
    }


def final_weights(run: Path) -> dict[str, Any]:
    """Validation and test scores, and test predictions, of ``run``'s last.pt: ``medxfer
    evaluate RUN --checkpoint last --out metrics-last.json`` (written into the run folder)."""
    import numpy as np

    from medxfer.evaluate.rerun import evaluate_run

    os.chdir(REPO)  # a relative data.root is read from where medxfer commands run
    out, results = evaluate_run(run, [], "metrics-last.json", checkpoint="last")
    scores: dict[str, Any] = {"epoch": results["epoch"]}
    for split in ("val", "test"):
        m = results[split]
        scores[split] = _scores(m) | {"ci95": m.get("ci95", {})}
        probs = np.load(out.with_name(f"{out.stem}-{split}.npz"))["probs"]
        scores[f"{split}_predicted"] = probs.argmax(1)
    return scores


def main() -> None:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lottery", type=abspath)
    p.add_argument("--out", default="result")
    args = p.parse_args()
    dense = args.lottery / "level_0" / "dense"
    if not (dense / "metrics.json").exists() or not (dense / "last.pt").exists():
        raise MedxferError(
            f"{args.lottery} holds no finished dense level 0",
            "pass a folder of `medxfer prune` (or an experiment's prune-<hash>)",
        )
    settings = json.loads((args.lottery / "settings.json").read_text())
    weights = settings.get("weights", "last")  # folders made before the choice: last
    pruned = "final" if weights == "last" else "best"
    final = final_weights(dense)
    best = json.loads((dense / "metrics.json").read_text())
    best_test = np.load(dense / "test_predictions.npz")["probs"].argmax(1)
    runs: dict[str, Any] = {}
    for metrics in sorted(args.lottery.glob("level_*/*/metrics.json")):
        run = metrics.parent
        m = json.loads(metrics.read_text())
        predicted = np.load(run / "test_predictions.npz")["probs"].argmax(1)
        runs[f"{run.parent.name}/{run.name}"] = {
            "best_epoch": m.get("best_epoch"),
            "val": _scores(m["val"]),
            "test": _scores(m["test"]),
            "test_agreement_with_dense_best": float((predicted == best_test).mean()),
            "test_agreement_with_dense_final": float((predicted == final["test_predicted"]).mean()),
        }
    dense_final = {k: v for k, v in final.items() if not k.endswith("_predicted")}
    save(f"checkpoint-scores/{args.out}", root=STUDY_RESULTS, payload={
        "lottery": str(args.lottery),
        "dense_best": {"epoch": best.get("best_epoch"), "val": _scores(best["val"]),
                       "test": _scores(best["test"])},
        "dense_final": dense_final,
        "runs": runs,
        "pruned_weights": weights,
        "note": "dense_best is what metrics.json reports; the lottery pruned, rewound to (lr "
                f"rewinding), fine-tuned and distilled from dense_{pruned} ({weights}.pt)",
    })  # fmt: skip
    for name, r in runs.items():
        print(f"{name}: test {r['test']['accuracy']:.3f}, agrees with dense best "
              f"{r['test_agreement_with_dense_best']:.3f}, final "
              f"{r['test_agreement_with_dense_final']:.3f}")  # fmt: skip
    print(f"dense final weights (epoch {final['epoch']}): test {final['test']['accuracy']:.3f}")


if __name__ == "__main__":
    main()
