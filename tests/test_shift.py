"""`medxfer shift`: the label-free comparison of new images with the validation split.

The statistics on arrays whose truth is known (no shift, a label shift with a known mix, an
accuracy the estimate must find), then the command end to end on the synthetic set: the
validation images themselves must look exactly like validation (this also proves that the file
path of `medxfer predict` preprocesses as the training loader does), and images of noise (a
scanner fault, the wrong files) must not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.cli import main
from medxfer.errors import MedxferError
from medxfer.evaluate.unlabelled import (
    ALPHA,
    atc_accuracy,
    bbse_class_shares,
    compare_outputs,
    label_shift_test,
    summary_lines,
)

CLASSES = ["a", "b", "c"]


def _model_outputs(
    rng: np.random.Generator, mix: list[float], n: int, skill: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from ``mix`` and the probabilities of a fixed noisy classifier: right with
    probability ``skill``, otherwise a uniformly drawn class; confidence depends on the
    predicted class only, so p(outputs | label) is the same whatever the mix."""
    labels = rng.choice(3, size=n, p=mix)
    pred = np.where(rng.random(n) < skill, labels, rng.integers(0, 3, n))
    top = rng.uniform(0.5, 0.95, n)
    probs = np.tile(((1 - top) / 2)[:, None], (1, 3))
    probs[np.arange(n), pred] = top
    return probs, labels


def test_no_shift_is_not_flagged_and_accuracy_is_estimated() -> None:
    rng = np.random.default_rng(0)
    ref, ref_y = _model_outputs(rng, [0.5, 0.3, 0.2], 4000)
    new, new_y = _model_outputs(rng, [0.5, 0.3, 0.2], 4000)
    r = compare_outputs(ref, ref_y, new, CLASSES)
    assert not r["shifted"] and r["ks_min_p_value"] > 0.05 / 3
    true_acc = float((new.argmax(1) == new_y).mean())
    assert abs(r["accuracy"]["estimated_accuracy"] - true_acc) < 0.03
    assert r["accuracy"]["reference_accuracy"] == pytest.approx((ref.argmax(1) == ref_y).mean())
    # identical sets: every KS statistic is 0 and p is 1
    same = compare_outputs(ref, ref_y, ref.copy(), CLASSES)
    assert same["ks_min_p_value"] == 1.0 and not same["shifted"]


def test_label_shift_is_flagged_and_bbse_recovers_the_mix() -> None:
    rng = np.random.default_rng(1)
    ref, ref_y = _model_outputs(rng, [0.6, 0.3, 0.1], 6000)
    mix = np.array([0.2, 0.3, 0.5])
    new, _ = _model_outputs(rng, list(mix), 6000)
    r = compare_outputs(ref, ref_y, new, CLASSES)
    assert r["shifted"]
    est = np.array([c["estimated_share"] for c in r["per_class"]])
    predicted = np.array([c["predicted_share"] for c in r["per_class"]])
    assert np.abs(est - mix).sum() < 0.05  # BBSE undoes the classifier's confusion
    assert np.abs(est - mix).sum() < np.abs(predicted - mix).sum() / 3
    assert est.sum() == pytest.approx(1.0)


def _less_confident_on_class_0(rng: np.random.Generator, n: int) -> np.ndarray:
    """A mix change *and* class-0 images that look different to the model: its confidence on
    them falls below anything validation produced."""
    probs, labels = _model_outputs(rng, [0.4, 0.3, 0.3], n)
    rows = np.flatnonzero(labels == 0)
    top = rng.uniform(0.34, 0.5, len(rows))
    pred = probs[rows].argmax(1)
    probs[rows] = ((1 - top) / 2)[:, None]
    probs[rows, pred] = top
    return probs


def test_bbse_assumption_is_tested() -> None:
    rng = np.random.default_rng(3)
    ref, ref_y = _model_outputs(rng, [0.6, 0.3, 0.1], 800)
    mix_only, _ = _model_outputs(rng, [0.2, 0.3, 0.5], 600)
    kept = label_shift_test(ref, ref_y, mix_only, n_bootstrap=100)
    assert kept["p_value"] > 0.2 and kept["n_bootstrap"] == 100
    changed = label_shift_test(ref, ref_y, _less_confident_on_class_0(rng, 600), n_bootstrap=100)
    assert changed["p_value"] < 0.02 and changed["statistic"] > kept["statistic"]
    # the command's summary says which
    r = compare_outputs(ref, ref_y, _less_confident_on_class_0(rng, 600), CLASSES)
    assert r["label_shift_test"]["p_value"] < 0.05
    assert "do not trust this mix" in summary_lines(r)[2]
    r = compare_outputs(ref, ref_y, mix_only, CLASSES)
    assert "alone fits these outputs" in summary_lines(r)[2]
    assert compare_outputs(ref, ref_y, mix_only, CLASSES, n_bootstrap=0)["label_shift_test"] is None


def test_atc_threshold_splits_validation_at_its_error() -> None:
    rng = np.random.default_rng(2)
    ref, ref_y = _model_outputs(rng, [0.4, 0.4, 0.2], 3000, skill=0.6)
    a = atc_accuracy(ref, ref_y, ref)
    # on validation itself the estimate is validation's accuracy (up to ties at the threshold)
    assert abs(a["estimated_accuracy"] - a["reference_accuracy"]) < 0.01
    # a less confident set is estimated less accurate
    flat = (ref + 1.0) / (1.0 + 3.0)
    assert atc_accuracy(ref, ref_y, flat)["estimated_accuracy"] < a["estimated_accuracy"] - 0.3


def test_bbse_with_a_class_missing_from_validation() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    labels = np.array([0, 1, 0])  # no class 2 on validation
    q = bbse_class_shares(probs, labels, probs, 3)
    assert q == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_bad_input_is_one_clear_message() -> None:
    ref = np.full((4, 3), 1 / 3)
    with pytest.raises(MedxferError, match="3 columns"):
        compare_outputs(ref, np.zeros(4, int), np.full((4, 2), 0.5), CLASSES)
    with pytest.raises(MedxferError, match="at least 2 images"):
        compare_outputs(ref, np.zeros(4, int), ref[:1], CLASSES)
    with pytest.raises(MedxferError, match="alpha"):
        compare_outputs(ref, np.zeros(4, int), ref, CLASSES, alpha=1.5)


FAST = [
    "model.arch=resnet18", "model.weights=none", "data.image_size=48", "train.epochs=2",
    "train.batch_size=16", "eval.n_bootstrap=20", "train.eval_batch_size=64",
    "train.steps_per_epoch=6",
]  # fmt: skip


def test_shift_command_end_to_end(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medxfer.config import load_config
    from medxfer.data.prepare import prepare

    root, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(synth_root, root)  # removed below: a deployment site has no training data
    assert main(["train", "--data", str(root), "--run-dir", str(run), *FAST]) == 0
    capsys.readouterr()
    assert (run / "val_predictions.npz").exists()
    cfg = load_config(run / "config.yaml")
    data = prepare(cfg.data)
    val = [data.samples[i] for i in data.split_index["val"].tolist()]
    same, noise = tmp_path / "same", tmp_path / "noise"
    rng = np.random.default_rng(0)
    noise.mkdir()
    for i, s in enumerate(val):
        dst = same / s.label / Path(s.path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, dst)
        pixels = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(noise / f"{i}.png")
    (same / "notes.txt").write_text("not an image: ignored")
    m = json.loads((run / "metrics.json").read_text())

    def check_same(name: str) -> dict[str, object]:
        out = tmp_path / f"{name}.json"
        assert main(["shift", str(run), str(same), "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(out)
        r = json.loads(out.read_text())
        assert r["n_images"] == r["n_reference"] == len(val)
        assert r["alpha"] == ALPHA  # no --alpha: the module's level, not a second literal
        assert not r["shifted"] and r["ks_min_p_value"] == pytest.approx(1.0)
        for c in r["per_class"]:  # the file path and the reference see the same pixels
            assert c["predicted_share"] == pytest.approx(c["reference_predicted_share"])
            assert c["mean_probability"] == pytest.approx(c["reference_mean_probability"], abs=1e-5)
        assert r["accuracy"]["reference_accuracy"] == pytest.approx(m["val"]["accuracy"])
        return r

    # the outputs stored by the training loop, and validation rebuilt from the data: both
    # equal what `medxfer predict`'s file path computes on the same images
    assert str(check_same("stored")["reference"]).startswith("stored")
    (run / "val_predictions.npz").rename(tmp_path / "kept.npz")
    assert str(check_same("rebuilt")["reference"]).startswith("rebuilt")

    out = tmp_path / "noise.json"
    assert main(["shift", str(run / "best.pt"), str(noise), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["shifted"] and "SHIFTED" in err
    assert r["ks_min_p_value"] < 1e-30
    # what the README warns of: confident on noise, so ATC estimates it above validation
    assert r["accuracy"]["estimated_accuracy"] > r["accuracy"]["reference_accuracy"]
    assert r["figure"] == str(out.with_suffix(".png")) and out.with_suffix(".png").stat().st_size

    # no training data: the stored outputs suffice; without them, one clear message
    shutil.rmtree(root)
    assert main(["shift", str(run), str(noise), "--out", str(out)]) == 2
    assert "cannot rebuild the run's validation split" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "kept.npz").rename(run / "val_predictions.npz")
    assert main(["shift", str(run), str(noise), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["shifted"]

    (tmp_path / "empty").mkdir()
    assert main(["shift", str(run), str(tmp_path / "empty")]) == 2
    assert "holds no images" in " ".join(capsys.readouterr().err.split())  # rich wraps lines


def test_evaluate_rerun_and_old_runs_get_their_validation_outputs(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`medxfer evaluate`: another eval setting into its own file, metrics.json untouched, only
    eval.* keys; a run without val_predictions.npz (made before it existed) gets one."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_root), "--run-dir", str(run), *FAST]) == 0
    metrics = (run / "metrics.json").read_text()
    stored = np.load(run / "val_predictions.npz")
    assert not bool(stored["tta"]) and str(stored["precision"]) == "fp32"
    (run / "val_predictions.npz").unlink()  # as in a run made before the file existed
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "metrics-rerun.json")
    again = np.load(run / "val_predictions.npz")
    np.testing.assert_allclose(again["probs"], stored["probs"], atol=1e-6)
    assert (again["labels"] == stored["labels"]).all()
    rerun = json.loads((run / "metrics-rerun.json").read_text())
    assert rerun["val"]["accuracy"] == pytest.approx(json.loads(metrics)["val"]["accuracy"])
    # test-time flips: a new file; metrics.json and the stored outputs stay as they were
    assert main(["evaluate", str(run), "eval.tta=true", "--out", "tta.json"]) == 0
    assert json.loads((run / "tta.json").read_text())["tta_flips"] == [[3]]
    assert (run / "metrics.json").read_text() == metrics
    assert not bool(np.load(run / "val_predictions.npz")["tta"])
    (run / "val_predictions.npz").unlink()  # flipped outputs are never stored: shift skips them
    assert main(["evaluate", str(run), "eval.tta=true", "--out", "tta.json"]) == 0
    assert not (run / "val_predictions.npz").exists()
    assert main(["evaluate", str(run), "train.lr=0.1"]) == 2
    assert "only eval.* settings" in " ".join(capsys.readouterr().err.split())
    # the final epoch instead of the best one: its own file and outputs, nothing for `shift`
    assert main(["evaluate", str(run), "--checkpoint", "last", "--out", "last.json"]) == 0
    last = json.loads((run / "last.json").read_text())
    assert last["checkpoint"] == "last" and last["epoch"] == len(json.loads(
        (run / "history.json").read_text()))  # fmt: skip
    assert "best_epoch" not in last and 0 <= last["test"]["accuracy"] <= 1
    outputs = np.load(run / "last-test.npz")
    assert outputs["probs"].shape[0] == len(outputs["labels"]) == last["test"]["n"]
    assert not (run / "val_predictions.npz").exists()
    assert (run / "metrics.json").read_text() == metrics
    assert rerun["best_epoch"] == rerun["epoch"] == json.loads(metrics)["best_epoch"]
    (run / "last.pt").unlink()
    assert main(["evaluate", str(run), "--checkpoint", "last"]) == 2
    assert "has no last.pt" in " ".join(capsys.readouterr().err.split())
