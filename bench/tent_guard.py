"""The constant of the label-shift guard of `medxfer adapt`, chosen on synthetic sites.

    python bench/tent_guard.py [--run DIR] [--draws 3]

A model trained on the SYNTHETIC set (seed 0; trained here unless --run names one) is adapted,
by AdaBN and by TENT, to "new sites": images of another synthetic set (seed 7, never seen in
training), darker and with less contrast (x 0.6 + 20). Each site is a draw of 160 of them:

- ``validation_mix``: the class mix of the run's validation split (no label shift);
- ``balanced``: every class equally often (a mild label shift, towards more classes);
- ``shift_85``: 85% of one class, the rest shared (a strong label shift), for each class;
- ``single``: one class only.

Recorded per case and method: the guard's ratio (effective number of predicted classes after
adaptation over validation's), and whether adaptation changed accuracy. The threshold is put
between the no-shift cases (validation_mix, balanced) and the strong shifts. No official test
split is involved. Writes bench/results/tent-guard.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import abspath, medxfer_cmd, run, save

from medxfer.data.synthetic import make_synthetic
from medxfer.evaluate.predict import load_trained, probs_of_arrays, read_arrays
from medxfer.evaluate.tent import guard, make_adapter
from medxfer.evaluate.unlabelled import STORED

TRAIN = ["model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=6",
         "train.batch_size=32", "train.steps_per_epoch=12", "eval.n_bootstrap=20",
         "train.threads=1"]  # fmt: skip


def site_pool(folder: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    root = make_synthetic(folder / "site", size=64, seed=7,
                          counts=dict.fromkeys(meta["classes"], 120))  # fmt: skip
    files = sorted(root.rglob("*.png"))
    arrays, _ = read_arrays(meta, files)
    images = np.stack(arrays).astype(np.float32) * 0.6 + 20
    labels = np.array([meta["classes"].index(f.parent.name) for f in files])
    return images.astype(np.uint8), labels


def draws(labels: np.ndarray, val_mix: np.ndarray, k: int, rng: np.random.Generator, n: int
          ) -> list[tuple[str, np.ndarray]]:  # fmt: skip
    cases = [("validation_mix", val_mix), ("balanced", np.full(k, 1 / k))]
    for j in range(k):
        mix = np.full(k, 0.15 / (k - 1))
        mix[j] = 0.85
        cases.append((f"shift_85_class{j}", mix))
        cases.append((f"single_class{j}", np.eye(k)[j]))
    out = []
    for name, mix in cases:
        counts = rng.multinomial(n, mix)
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == j), c, replace=False)
                              for j, c in enumerate(counts) if c])  # fmt: skip
        out.append((name, idx))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run folder of the synthetic set (default: train)")
    ap.add_argument("--draws", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tent-guard-"))
    run_dir = abspath(args.run) if args.run else tmp / "run"
    if not args.run:
        run([*medxfer_cmd(), "train", "--run-dir", str(run_dir), *TRAIN])
    model, meta = load_trained(run_dir)
    k = len(meta["classes"])
    with np.load(run_dir / STORED) as saved:
        val_mix = np.bincount(saved["labels"], minlength=k) / len(saved["labels"])
    images, labels = site_pool(tmp, meta)
    rows = []
    for d in range(args.draws):
        rng = np.random.default_rng(d)
        for case, idx in draws(labels, val_mix, k, rng, 160):
            x, y = images[idx], labels[idx]
            p0 = probs_of_arrays(model, meta, x, batch_size=64).argmax(1)
            for method in ("adabn", "tent"):
                adapter, _ = make_adapter(method, batch_size=64, seed=d, steps=0, lr=1e-3)
                p1 = probs_of_arrays(adapter(model, meta, x), meta, x, batch_size=64).argmax(1)
                g = guard(run_dir, p0, p1, k)
                rows.append({"draw": d, "case": case, "method": method, "ratio": g["ratio"],
                             "accuracy_unadapted": float((p0 == y).mean()),
                             "accuracy_adapted": float((p1 == y).mean())})  # fmt: skip
                print(rows[-1], flush=True)
    no_shift = [r["ratio"] for r in rows if r["case"] in ("validation_mix", "balanced")]
    strong = [r["ratio"] for r in rows if r["case"].startswith(("shift_85", "single"))]
    save("tent-guard", {
        "run": str(run_dir), "site": "synthetic seed 7, x 0.6 + 20", "n_per_site": 160,
        "no_shift_ratio_min": min(no_shift), "strong_shift_ratio_max": max(strong),
        "strong_shift_ratio_median": float(np.median(strong)),
        "strong_shift_fired_at_0.75": float(np.mean(np.array(strong) < 0.75)),
        "no_shift_fired_at_0.75": float(np.mean(np.array(no_shift) < 0.75)),
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
