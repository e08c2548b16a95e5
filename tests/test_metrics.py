from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from medxfer.evaluate import (
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    format_summary,
)

NAMES = ["a", "b", "c", "d"]
EXPECTED_KEYS = {
    "n",
    "class_names",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auroc_macro_ovr",
    "log_loss",
    "ece",
    "per_class",
    "per_class_recall",
    "confusion_matrix",
    "ci95",
    "n_bootstrap",
}


def make_data(n: int, k: int = 4, seed: int = 0, signal: float = 1.5):
    """Imbalanced labels and softmax probabilities with some signal."""
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=np.linspace(1, 2, k) / np.linspace(1, 2, k).sum())
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    probs = np.exp(logits)
    return y, probs / probs.sum(axis=1, keepdims=True)


def test_matches_sklearn_on_random_data() -> None:
    y, p = make_data(400)
    m = compute_metrics(y, p, NAMES, n_bootstrap=50)
    pred = p.argmax(axis=1)
    assert set(m) == EXPECTED_KEYS
    assert m["n"] == 400
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auroc_macro_ovr"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["log_loss"] == pytest.approx(log_loss(y, p, labels=range(4)))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred)
    for k, name in enumerate(NAMES):
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(prec[k])
        assert row["recall"] == pytest.approx(rec[k])
        assert row["f1"] == pytest.approx(f1[k])
        assert row["support"] == sup[k]
        assert row["auroc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))
        assert m["per_class_recall"][name] == row["recall"]
    json.dumps(m, allow_nan=False)


def test_hand_made_example() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.2, 0.7, 0.1],  # wrong: predicted 1
            [0.1, 0.8, 0.1],
            [0.3, 0.3, 0.4],  # wrong: predicted 2
            [0.1, 0.1, 0.8],
        ]
    )
    m = compute_metrics(y, p, ["x", "y", "z"], n_bootstrap=20)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["x"]["precision"] == pytest.approx(1.0)
    assert m["per_class"]["y"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["z"]["f1"] == pytest.approx(2 / 3)
    # Class x scores: positives .8 .6 .2 vs negatives .1 .3 .1 -> 8 of 9 pairs ordered.
    assert m["per_class"]["x"]["auroc"] == pytest.approx(8 / 9)


def test_float32_probs_with_rounding_drift_are_accepted() -> None:
    y, p = make_data(100)
    m = compute_metrics(y, (p * (1 + 1e-6)).astype(np.float32), NAMES, n_bootstrap=10)
    assert 0.0 <= m["accuracy"] <= 1.0


def test_ece_hand_computed() -> None:
    # Two bins of width 0.5. (0, .5]: conf .4, right. (.5, 1]: .9 right, .8 wrong, .6 right.
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05], [0.8, 0.2, 0.0], [0.4, 0.6, 0.0]])
    low = abs(1.0 - 0.4)
    high = abs(2 / 3 - (0.9 + 0.8 + 0.6) / 3)
    expected = (1 * low + 3 * high) / 4
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(expected)


def test_ece_zero_for_confident_correct_predictions() -> None:
    y = np.array([0, 1, 2, 1, 0])
    assert expected_calibration_error(y, np.eye(3)[y]) == pytest.approx(0.0)


def _reference_bootstrap(y, pred, n_boot: int, seed: int) -> dict[str, list[float]]:
    """Slow loop over the same resamples, scoring each with scikit-learn."""
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    accs, bals = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples may miss a class
        for row in idx:
            accs.append(accuracy_score(y[row], pred[row]))
            bals.append(balanced_accuracy_score(y[row], pred[row]))
    return {
        "accuracy": list(np.percentile(accs, [2.5, 97.5])),
        "balanced_accuracy": list(np.percentile(bals, [2.5, 97.5])),
    }


def test_bootstrap_matches_loop_reference_including_missing_classes() -> None:
    # Class 3 has a single sample, so many resamples lack it.
    y = np.array([0] * 20 + [1] * 10 + [2] * 5 + [3])
    pred = y.copy()
    pred[::4] = (pred[::4] + 1) % 4
    got = bootstrap_ci(y, pred, 4, n_bootstrap=60, seed=3, chunk=60)
    want = _reference_bootstrap(y, pred, 60, seed=3)
    for key in ("accuracy", "balanced_accuracy"):
        assert got[key] == pytest.approx(want[key])


def test_paired_difference_matches_loop_reference() -> None:
    """Both models are scored on the same resamples: the interval is of per-resample
    differences (scikit-learn on each), not of two independent intervals."""
    from medxfer.evaluate.metrics import paired_bootstrap_difference

    y = np.array([0] * 20 + [1] * 10 + [2] * 5 + [3])
    a = y.copy()
    a[::4] = (a[::4] + 1) % 4
    b = a.copy()
    b[1::6] = (b[1::6] + 2) % 4  # b is wrong on more images
    got = paired_bootstrap_difference(y, a, b, 4, n_bootstrap=80, seed=5, chunk=30)
    idx = np.random.default_rng(5).integers(0, len(y), size=(80, len(y)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d_acc = [accuracy_score(y[r], b[r]) - accuracy_score(y[r], a[r]) for r in idx]
        d_bal = [balanced_accuracy_score(y[r], b[r]) - balanced_accuracy_score(y[r], a[r])
                 for r in idx]  # fmt: skip
    assert got["accuracy_difference"] == pytest.approx((b == y).mean() - (a == y).mean())
    assert got["accuracy_difference"] < 0
    assert got["accuracy_difference_ci95"] == pytest.approx(np.percentile(d_acc, [2.5, 97.5]))
    assert got["balanced_accuracy_difference_ci95"] == pytest.approx(
        np.percentile(d_bal, [2.5, 97.5])
    )
    same = paired_bootstrap_difference(y, a, a, 4, n_bootstrap=50)
    assert same["accuracy_difference_ci95"] == [0.0, 0.0]  # paired: identical models, no spread
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap_difference(y, a, b[:-1], 4)


def test_bootstrap_contains_point_deterministic_and_narrows() -> None:
    y, p = make_data(200, seed=1)
    m1 = compute_metrics(y, p, NAMES, n_bootstrap=300, seed=7)
    m2 = compute_metrics(y, p, NAMES, n_bootstrap=300, seed=7)
    assert m1["ci95"] == m2["ci95"]
    for key in ("accuracy", "balanced_accuracy"):
        lo, hi = m1["ci95"][key]
        assert lo <= m1[key] <= hi
    y_big, p_big = make_data(3000, seed=1)
    big = compute_metrics(y_big, p_big, NAMES, n_bootstrap=300, seed=7)
    for key in ("accuracy", "balanced_accuracy"):
        width_small = m1["ci95"][key][1] - m1["ci95"][key][0]
        width_big = big["ci95"][key][1] - big["ci95"][key][0]
        assert width_big < 0.6 * width_small


def test_bootstrap_seed_changes_interval() -> None:
    y, p = make_data(200, seed=2)
    pred = p.argmax(axis=1)
    assert bootstrap_ci(y, pred, 4, seed=0) != bootstrap_ci(y, pred, 4, seed=1)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_class_missing_from_y_true() -> None:
    y, p = make_data(120, seed=4)
    keep = y != 2
    y, p = y[keep], p[keep]
    m = compute_metrics(y, p, NAMES, n_bootstrap=50)
    assert m["per_class"]["c"]["support"] == 0
    assert m["per_class"]["c"]["auroc"] is None
    assert m["per_class_recall"]["c"] is None
    defined = [m["per_class"][n]["auroc"] for n in ("a", "b", "d")]
    assert m["auroc_macro_ovr"] == pytest.approx(np.mean(defined))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(axis=1), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(axis=1)))
    json.dumps(m, allow_nan=False)


def test_single_class_present_gives_no_auroc() -> None:
    y = np.zeros(5, dtype=int)
    p = np.tile([0.7, 0.2, 0.1], (5, 1))
    m = compute_metrics(y, p, ["x", "y", "z"], n_bootstrap=10)
    assert m["auroc_macro_ovr"] is None
    assert m["accuracy"] == 1.0
    assert "AUROC n/a" in format_summary(m)


@pytest.mark.parametrize(
    ("y", "p", "names"),
    [
        (np.array([0, 1]), np.array([0.5, 0.5]), ["a", "b"]),  # probs 1-D
        (np.array([[0], [1]]), np.full((2, 2), 0.5), ["a", "b"]),  # y 2-D
        (np.array([0, 1, 1]), np.full((2, 2), 0.5), ["a", "b"]),  # length mismatch
        (np.array([0, 1]), np.full((2, 3), 1 / 3), ["a", "b"]),  # names mismatch
        (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"]),  # label out of range
        (np.array([0, -1]), np.full((2, 2), 0.5), ["a", "b"]),  # negative label
        (np.array([0.0, 0.5]), np.full((2, 2), 0.5), ["a", "b"]),  # non-integer label
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.3, 0.7]]), ["a", "b"]),  # negative prob
        (np.array([0, 1]), np.array([[1.0, 2.0], [0.3, 0.7]]), ["a", "b"]),  # logits
        (np.array([0, 1]), np.array([[np.nan, 1.0], [0.3, 0.7]]), ["a", "b"]),  # NaN
        (np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"]),  # empty
        (np.array([0, 0]), np.ones((2, 1)), ["a"]),  # one class
        (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "a"]),  # duplicate names
    ],
)
def test_bad_inputs_raise(y: np.ndarray, p: np.ndarray, names: list[str]) -> None:
    with pytest.raises(ValueError):
        compute_metrics(y, p, names, n_bootstrap=10)


def test_bad_bootstrap_arguments_raise() -> None:
    y = np.array([0, 1])
    with pytest.raises(ValueError):
        bootstrap_ci(y, y, 2, n_bootstrap=0)
    with pytest.raises(ValueError):
        bootstrap_ci(y, y, 2, confidence=1.5)
    with pytest.raises(ValueError):
        expected_calibration_error(y, np.eye(2), n_bins=0)


def test_format_summary() -> None:
    y, p = make_data(150)
    m = compute_metrics(y, p, NAMES, n_bootstrap=50)
    line = format_summary(m)
    assert line.startswith(f"acc {m['accuracy']:.3f} [")
    for part in ("bal-acc", "macro-F1", "AUROC", "ECE"):
        assert part in line
    assert "\n" not in line


def test_bootstrap_does_not_depend_on_chunk_size() -> None:
    y, p = make_data(300, seed=5)
    pred = p.argmax(axis=1)
    assert bootstrap_ci(y, pred, 4, chunk=7) == bootstrap_ci(y, pred, 4, chunk=1000)


def _recall_split(recalls: list[float], supports: list[int]) -> dict:  # type: ignore[type-arg]
    """compute_metrics of a split whose class k has `supports[k]` images, `recalls[k]` right;
    the wrong ones are called class (k + 1) mod K."""
    names = NAMES[: len(recalls)]
    y, pred = [], []
    for k, (r, n) in enumerate(zip(recalls, supports, strict=True)):
        right = round(r * n)
        y += [k] * n
        pred += [k] * right + [(k + 1) % len(names)] * (n - right)
    p = np.full((len(y), len(names)), 0.1 / (len(names) - 1))
    p[np.arange(len(y)), pred] = 0.9
    return compute_metrics(np.array(y), p, names, n_bootstrap=10)


def test_split_shift_flags_a_large_certain_gap_only() -> None:
    from medxfer.evaluate.metrics import split_shift

    val = _recall_split([0.98, 0.90, 0.50], [200, 400, 200])
    test = _recall_split([0.75, 0.88, 0.62], [240, 240, 150])
    rows = {r["class"]: r for r in split_shift(val, test)}
    assert rows["a"]["shifted"]  # -23 points on 200 and 240 images: beyond chance
    assert rows["a"]["gap"] == pytest.approx(0.75 - 0.98)
    assert rows["a"]["val_share"] == pytest.approx(0.25)
    assert rows["a"]["test_share"] == pytest.approx(240 / 630)
    assert not rows["b"]["shifted"]  # small gap
    # 12 points is large, but p ~ 0.026 misses the Bonferroni-corrected 0.01 / 3
    assert not rows["c"]["shifted"] and 0.001 < rows["c"]["p_value"] < 0.05
    # a 30-point gap on 10 images per class is within chance
    small = split_shift(
        _recall_split([0.9, 0.9, 0.9], [10] * 3), _recall_split([0.6, 0.9, 0.9], [10] * 3)
    )
    assert small[0]["gap"] == pytest.approx(-0.3) and not small[0]["shifted"]
    # identical splits: nothing shifted, p = 1
    same = split_shift(val, val)
    assert not any(r["shifted"] for r in same) and all(r["p_value"] == 1.0 for r in same)


def test_shift_warnings_name_the_shifted_class_only() -> None:
    from medxfer.evaluate.metrics import shift_warnings

    val = _recall_split([0.98, 0.90, 0.50], [200, 400, 200])
    lines = shift_warnings(val, _recall_split([0.75, 0.88, 0.62], [240, 240, 150]))
    assert len(lines) == 1
    assert lines[0].startswith("class 'a': recall 0.980 on validation, 0.750 on test")
    assert shift_warnings(val, val) == []
