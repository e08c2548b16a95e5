"""The test of BBSE's assumption (`medxfer.evaluate.unlabelled.label_shift_test`) on simulated
outputs whose truth is known.

    python bench/shift_simulation.py [--draws 60] [--bootstrap 100]

A fixed noisy 3-class classifier (right with probability 0.8, else a uniformly drawn class; its
top probability uniform in [0.5, 0.95], the rest split evenly) scores a validation set with
class mix (0.6, 0.3, 0.1) and a new set of mix (0.2, 0.3, 0.5):

- **pure label shift**: the new images of each class look like validation's, so the test
  should reject at most at its level (5%);
- **a class looks different**: the classifier's top probability on class-0 images drawn from
  [0.34, 0.5], below anything validation shows, with class 0 at 40% of the new images (mix
  0.4, 0.3, 0.3) and, harder, at 20% (mix 0.2, 0.3, 0.5): the test should reject (its power).

For three sizes (validation / new images): 400 / 300, 800 / 600, 200 / 1000. Writes
bench/results/shift-simulation/result.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import save

from medxfer.evaluate.unlabelled import ALPHA, label_shift_test


def outputs(
    rng: np.random.Generator, mix: list[float], n: int, class0_top: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.choice(3, size=n, p=mix)
    pred = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 3, n))
    top = rng.uniform(0.5, 0.95, n)
    if class0_top is not None:
        rows = labels == 0
        top[rows] = rng.uniform(*class0_top, rows.sum())
    probs = np.tile(((1 - top) / 2)[:, None], (1, 3))
    probs[np.arange(n), pred] = top
    return probs, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=60)
    p.add_argument("--bootstrap", type=int, default=100)
    args = p.parse_args()
    rows = []
    for n_ref, n_new in ((400, 300), (800, 600), (200, 1000)):
        t0 = time.perf_counter()
        false_rej = power = power_minor = 0
        for i in range(args.draws):
            rng = np.random.default_rng(100 + i)
            ref, ref_y = outputs(rng, [0.6, 0.3, 0.1], n_ref, None)
            same, _ = outputs(rng, [0.2, 0.3, 0.5], n_new, None)
            changed, _ = outputs(rng, [0.4, 0.3, 0.3], n_new, (0.34, 0.5))
            minor, _ = outputs(rng, [0.2, 0.3, 0.5], n_new, (0.34, 0.5))
            kw = {"n_bootstrap": args.bootstrap, "seed": i}
            false_rej += label_shift_test(ref, ref_y, same, **kw)["p_value"] < ALPHA
            power += label_shift_test(ref, ref_y, changed, **kw)["p_value"] < ALPHA
            power_minor += label_shift_test(ref, ref_y, minor, **kw)["p_value"] < ALPHA
        rows.append({
            "n_validation": n_ref,
            "n_new": n_new,
            "pure_label_shift_rejection_rate": false_rej / args.draws,
            "changed_class_40pct_rejection_rate": power / args.draws,
            "changed_class_20pct_rejection_rate": power_minor / args.draws,
            "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
        print(rows[-1])
    save("shift-simulation/result", {"alpha": ALPHA, "draws": args.draws,
                              "n_bootstrap": args.bootstrap, "sizes": rows})  # fmt: skip


if __name__ == "__main__":
    main()
