"""The shift suite's image shifts: same shape and dtype, deterministic under their seed, and a
higher severity moves every image further from the original."""

from __future__ import annotations

import numpy as np
import pytest

from medxfer.data.synthetic import render
from medxfer.errors import MedxferError
from medxfer.evaluate.shifts import SEVERITIES, SHIFTS, apply_shift


def _scans(n: int = 6, size: int = 96, rgb: bool = False) -> np.ndarray:
    """Shapes on noise inside a bright ellipse on a black background (a body in air), the way
    an MRI slice or a radiograph has anatomy and an empty border."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    body = (xx / 0.42) ** 2 + (yy / 0.36) ** 2 <= 1.0
    out = np.stack([
        np.where(body, render(("disc", "ring", "bars")[i % 3], size, np.random.default_rng(i)), 0)
        for i in range(n)
    ]).astype(np.uint8)  # fmt: skip
    return np.repeat(out[..., None], 3, axis=-1) if rgb else out


def _change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute pixel change of each image."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return diff.reshape(len(a), -1).mean(axis=1)


@pytest.mark.parametrize("shift", SHIFTS)
def test_shift_keeps_shape_dtype_and_input(shift: str) -> None:
    for images in (_scans(3), _scans(3, size=80, rgb=True)):
        before = images.copy()
        out = apply_shift(images, shift, 2, seed=0)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert np.array_equal(images, before)  # the input is not changed in place
        assert not np.array_equal(out, images)


@pytest.mark.parametrize("shift", SHIFTS)
def test_shift_is_deterministic_under_its_seed(shift: str) -> None:
    images = _scans(4)
    a = apply_shift(images, shift, 3, seed=7)
    assert np.array_equal(a, apply_shift(images, shift, 3, seed=7))
    # each image has its own stream: a sub-batch from the start gets the same images
    assert np.array_equal(a[:2], apply_shift(images[:2], shift, 3, seed=7))
    if shift in ("noise", "fov"):  # drawn every time: another seed, other images
        assert not np.array_equal(a, apply_shift(images, shift, 3, seed=8))


@pytest.mark.parametrize("shift", SHIFTS)
def test_severity_moves_every_image_further(shift: str) -> None:
    images = _scans(8)
    changes = np.stack([_change(images, apply_shift(images, shift, s)) for s in SEVERITIES])
    assert (changes > 0).all()
    assert (np.diff(changes, axis=0) > 0).all(), changes.round(2)


def test_inversion_folds_the_body_and_keeps_the_background() -> None:
    images = _scans(2)
    out = apply_shift(images, "inversion", 3)
    body = images > 10
    assert np.array_equal(out[body], 255 - images[body])
    assert (out[~body] == images[~body]).all()


def test_bad_input_is_one_clear_error() -> None:
    images = _scans(1)
    with pytest.raises(MedxferError, match="unknown shift"):
        apply_shift(images, "fog", 1)
    with pytest.raises(MedxferError, match="severity"):
        apply_shift(images, "blur", 4)
    with pytest.raises(MedxferError, match="uint8 batch"):
        apply_shift(images.astype(np.float32), "blur", 1)
    with pytest.raises(MedxferError, match="uint8 batch"):
        apply_shift(images[0], "blur", 1)
