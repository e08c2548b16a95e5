"""Does a larger backbone give a better trust signal? Two trainings of one recipe, compared on
validation.

    python studies/backbone_trust.py --runs RUN_A RUN_B --posthoc JSON_A JSON_B --name N

RUN_A and RUN_B are the same configuration trained with two backbones (``model.arch``); JSON_A
and JSON_B are ``studies/trust_posthoc.py``'s results for each (its validation stand-ins: shifted
copies of validation images, and a run trained without one class scored on that class's
validation images). Compared: validation accuracy (the run's ``metrics.json``), training time,
and, for ``layers`` (the default detector) and ``mahalanobis``, the shift proxies' mean AUROC
and the new class's AUROC.

The rule, stated before the first larger-backbone run finished: the dataset's configuration
would move to RUN_B's backbone only if, on validation, its accuracy is not lower, its ``layers``
new-class AUROC is at least 0.03 higher and its shift-proxy mean AUROC at most 0.01 lower.
With one training each this can at most ask for a second seed; it cannot by itself change a
configuration. The test split is not read here.

Writes studies/results/backbone-trust/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # _common

from _common import STUDY_RESULTS, abspath, save

GAIN, SHIFT_LOSS = 0.03, 0.01
DETECTORS = ("layers", "mahalanobis")


def summary(run: Path, posthoc: Path) -> dict[str, Any]:
    for path in (run / "metrics.json", run / "config.yaml", posthoc):
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing\nfix: pass a finished run and its "
                             "studies/trust_posthoc.py JSON")  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    table = json.loads(posthoc.read_text())
    if Path(table["runs"]["base"]).resolve() != run.resolve():
        raise SystemExit(f"error: {posthoc} measured {table['runs']['base']}, not {run}\n"
                         "fix: pass each run with its own trust_posthoc JSON")  # fmt: skip
    return {
        "run": str(run),
        "arch": metrics["model"]["arch"],
        "validation_accuracy": metrics["val"]["accuracy"],
        "train_minutes": round(metrics["train_seconds"] / 60, 1),
        "detectors": {d: {"shift_proxy_mean_auroc": table["detectors"][d]["shift_proxy_mean_auroc"],
                          "new_class_auroc": table["detectors"][d]["new_class_auroc"]}
                      for d in DETECTORS},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=abspath, nargs=2, required=True)
    p.add_argument("--posthoc", type=abspath, nargs=2, required=True)
    p.add_argument("--name", required=True)
    args = p.parse_args()
    a, b = (summary(r, j) for r, j in zip(args.runs, args.posthoc, strict=True))
    la, lb = a["detectors"]["layers"], b["detectors"]["layers"]
    checks = {
        "validation_accuracy_not_lower": b["validation_accuracy"] >= a["validation_accuracy"],
        "new_class_gain": round(lb["new_class_auroc"] - la["new_class_auroc"], 4),
        "shift_proxy_change": round(lb["shift_proxy_mean_auroc"] - la["shift_proxy_mean_auroc"], 4),
    }
    passes = (checks["validation_accuracy_not_lower"] and checks["new_class_gain"] >= GAIN
              and checks["shift_proxy_change"] >= -SHIFT_LOSS)  # fmt: skip
    out = {"a": a, "b": b, "checks": checks, "passes": passes,
           "rule": f"B's validation accuracy not lower, `layers` new-class AUROC +{GAIN} or more, "
                   f"shift-proxy mean AUROC -{SHIFT_LOSS} at most; one training each: at most "
                   "a second seed follows",
           "images": "validation only (no test image)"}  # fmt: skip
    print(json.dumps({"checks": checks, "passes": passes}))
    save(f"backbone-trust/{args.name}", out, STUDY_RESULTS)


if __name__ == "__main__":
    main()
