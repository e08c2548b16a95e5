"""The audit's shortcut check: can the label be told from image statistics alone?"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data.audit import audit, shortcut_report
from medxfer.data.shortcuts import CUES, MIN_PER_CLASS, cues, shortcut_check
from medxfer.data.sources import discover
from medxfer.data.synthetic import make_synthetic

MEAN = list(CUES).index("mean")


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, len(CUES))).astype(np.float32)


def test_cues_of_a_hand_made_image(tmp_path: Path) -> None:
    img = np.zeros((40, 80), np.uint8)  # black frame, a 20 x 40 bright box in the middle
    img[10:30, 20:60] = 200
    path = tmp_path / "a.png"
    Image.fromarray(img).save(path)
    c = dict(zip(CUES, cues(img, str(path)), strict=True))
    assert c["aspect"] == pytest.approx(0.5)
    assert c["log_width"] == pytest.approx(np.log(80))
    assert c["foreground_fraction"] == pytest.approx(800 / 3200)
    assert c["foreground_box_height"] == pytest.approx(0.5)
    assert c["foreground_box_width"] == pytest.approx(0.5)
    assert c["mean"] == pytest.approx(200 / 255 * 0.25, abs=1e-6)
    assert c["foreground_mean"] == pytest.approx(200 / 255)
    assert c["p01"] == 0.0 and c["p99"] == pytest.approx(200 / 255)
    assert c["at_minimum"] == pytest.approx(0.75)
    assert c["bytes_per_pixel"] == pytest.approx(path.stat().st_size / 3200)
    rgb = cues(np.repeat(img[..., None], 3, axis=2), str(path))
    assert np.allclose(rgb, cues(img, str(path)))  # gray in RGB gives the same cues


def test_a_class_with_its_own_brightness_is_flagged() -> None:
    labels = ["a"] * 60 + ["b"] * 60
    x = _vectors(120, 0)
    x[:60, MEAN] += 4.0  # class a: brighter images
    out = shortcut_check(labels, ["train"] * 120, x)
    assert out["checked"] and out["flagged"]
    assert out["balanced_accuracy"] > 0.9 and out["chance"] == 0.5
    assert max(out["by_group"], key=out["by_group"].get) == "intensity"
    assert "test" not in out  # no test split


def test_statistics_that_do_not_depend_on_the_label_are_not_flagged() -> None:
    labels = (["a", "b", "c"] * 40)[:120]
    out = shortcut_check(labels, ["train"] * 120, _vectors(120, 1))
    assert out["checked"] and not out["flagged"] and out["by_group"] is None
    assert out["balanced_accuracy"] < 0.6  # chance is 1/3


def test_the_test_split_is_scored_and_patients_group_the_folds() -> None:
    labels = ["a"] * 50 + ["b"] * 50 + ["a"] * 10 + ["b"] * 10
    splits = ["train"] * 100 + ["test"] * 20
    x = _vectors(120, 2)
    x[:50, MEAN] += 4.0
    x[100:110, MEAN] += 4.0
    patients = [f"p{i // 2}" for i in range(120)]
    out = shortcut_check(labels, splits, x, patients)
    assert out["grouped_by_patient"] and out["images"] == 100
    assert out["test"]["images"] == 20 and out["test"]["balanced_accuracy"] > 0.9


def test_too_few_images_per_class_is_not_checked() -> None:
    labels = ["a"] * 30 + ["b"] * (MIN_PER_CLASS - 1)
    out = shortcut_check(labels, [""] * len(labels), _vectors(len(labels), 3))
    assert out == {"checked": False, "why": out["why"]} and str(MIN_PER_CLASS) in out["why"]


def test_the_audit_reports_a_planted_brightness_cue(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "set", counts={"disc": 12, "ring": 12}, test_per_class=4)
    for f in (root / "train" / "disc").glob("*.png"):  # every training disc brighter
        with Image.open(f) as im:
            a = np.asarray(im).astype(np.int16)
        Image.fromarray(np.clip(a + 60, 0, 255).astype(np.uint8)).save(f)
    report = audit(discover(root), workers=1)
    s = report["shortcuts"]
    assert s["checked"] and s["flagged"] and s["images"] == 24
    assert report["summary"]["label_from_image_statistics"] == s["balanced_accuracy"]
    assert "test" in s  # the test split (not brightened) is scored too


def test_the_check_alone_matches_the_audit(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "set", counts={"disc": 12, "ring": 12}, test_per_class=4)
    samples = discover(root)
    assert shortcut_report(samples, workers=1) == audit(samples, workers=1)["shortcuts"]


def test_the_synthetic_demo_set_is_not_flagged(tmp_path: Path) -> None:
    """Its classes differ in shape, drawn on one intensity distribution: nothing to flag."""
    s = shortcut_report(discover(make_synthetic(tmp_path / "set")), workers=1)
    assert s["checked"] and not s["flagged"] and s["balanced_accuracy"] < 0.4
