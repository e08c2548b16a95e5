"""Image shifts of a known kind and strength, to measure what a model does away from its training
images (``bench/trust.py``): intensity remaps, an MRI-sequence-like inversion, blur, noise,
resolution loss, JPEG compression, rotation, zoom and a narrower, off-centre field of view.

Each shift maps a uint8 batch ``(N, H, W)`` or ``(N, H, W, 3)`` to a new batch of the same shape
and dtype, at severity 1, 2 or 3. Sizes (blur width, crop) are fractions of the image side, so a
severity means the same at any resolution. Randomness (a direction, an angle's sign, noise) is
drawn per image from a generator seeded by ``(seed, shift, image index)`` and independent of the
severity: the same image moves the same way, only further, as the severity grows.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from medxfer.errors import MedxferError

SEVERITIES = (1, 2, 3)
BACKGROUND = 10  # inversion: pixels at or below this stay black (the air around the body)

# per shift, the parameter at severity 1, 2, 3 (see each function for its meaning)
LEVELS: dict[str, tuple[float, float, float]] = {
    "intensity": (1.5, 2.0, 3.0),  # gamma factor g: gamma g or 1/g; contrast scaled by g**-0.5
    "inversion": (0.6, 0.8, 1.0),  # weight a of the inverted body in a mix with the original
    "blur": (0.006, 0.012, 0.02),  # Gaussian sigma as a fraction of the side
    "noise": (10.0, 20.0, 35.0),  # Gaussian noise standard deviation (0..255 scale)
    "resolution": (2.0, 3.0, 5.0),  # downsampling factor before upsampling back
    "jpeg": (30.0, 15.0, 5.0),  # JPEG quality (Pillow)
    "rotation": (15.0, 30.0, 45.0),  # degrees, sign drawn per image
    "zoom": (1.15, 1.3, 1.5),  # magnification, in or out drawn per image
    "fov": (0.85, 0.7, 0.55),  # side fraction of an off-centre crop, shown at full size
}

ImageFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img)


def _back(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.uint8)


def _intensity(img: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma ``g`` or ``1/g`` (drawn), then contrast about the mean scaled by ``g**-0.5``."""
    gamma = g if rng.random() < 0.5 else 1.0 / g
    x = (img.astype(np.float32) / 255.0) ** gamma
    x = x.mean() + (x - x.mean()) * g**-0.5
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def _inversion(img: np.ndarray, a: float, rng: np.random.Generator) -> np.ndarray:
    """The body's intensities mixed with their inversion, ``(1 - a) x + a (255 - x)``: for
    ``a > 0.5`` dark tissue turns bright and bright turns dark, as between MRI sequences (T1
    against T2), with the tissue contrast ``2a - 1``. The black background stays black."""
    x = img.astype(np.float32)
    y = (1.0 - a) * x + a * (255.0 - x)
    body = (x.mean(axis=-1, keepdims=True) if x.ndim == 3 else x) > BACKGROUND
    return np.where(body, np.clip(np.round(y), 0, 255), x).astype(np.uint8)


def _blur(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _back(_pil(img).filter(ImageFilter.GaussianBlur(sigma * max(img.shape[:2]))))


def _noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    noisy = img.astype(np.float32) + std * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _resolution(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    small = _pil(img).resize(
        (max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BILINEAR
    )
    return _back(small.resize((w, h), Image.Resampling.BILINEAR))


def _jpeg(img: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    _pil(img).save(buf, format="JPEG", quality=int(quality))
    with Image.open(buf) as im:
        return _back(im.convert("RGB" if img.ndim == 3 else "L"))


def _rotation(img: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    sign = 1.0 if rng.random() < 0.5 else -1.0
    fill = (0, 0, 0) if img.ndim == 3 else 0
    return _back(_pil(img).rotate(sign * degrees, Image.Resampling.BILINEAR, fillcolor=fill))


def _zoom(img: np.ndarray, z: float, rng: np.random.Generator) -> np.ndarray:
    """Magnify by ``z`` (centre crop shown at full size) or shrink by ``1/z`` (black border)."""
    h, w = img.shape[:2]
    if rng.random() < 0.5:
        ch, cw = round(h / z), round(w / z)
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = _pil(img).crop((left, top, left + cw, top + ch))
        return _back(crop.resize((w, h), Image.Resampling.BILINEAR))
    sh, sw = max(1, round(h / z)), max(1, round(w / z))
    small = _back(_pil(img).resize((sw, sh), Image.Resampling.BILINEAR))
    out = np.zeros_like(img)
    top, left = (h - sh) // 2, (w - sw) // 2
    out[top : top + sh, left : left + sw] = small
    return out


def _fov(img: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """A window of ``keep`` times the side at a drawn offset (the same relative position at
    every severity), resized back: a narrower field of view, not centred on the anatomy."""
    h, w = img.shape[:2]
    ch, cw = round(h * keep), round(w * keep)
    fy, fx = rng.random(2)
    top, left = round(fy * (h - ch)), round(fx * (w - cw))
    crop = _pil(img).crop((left, top, left + cw, top + ch))
    return _back(crop.resize((w, h), Image.Resampling.BILINEAR))


_FUNCTIONS: dict[str, ImageFn] = {
    "intensity": _intensity, "inversion": _inversion, "blur": _blur, "noise": _noise,
    "resolution": _resolution, "jpeg": _jpeg, "rotation": _rotation, "zoom": _zoom, "fov": _fov,
}  # fmt: skip
SHIFTS = tuple(LEVELS)


def check_images(images: np.ndarray) -> None:
    """Refuse anything but a uint8 batch of grayscale ``(N, H, W)`` or RGB ``(N, H, W, 3)``."""
    ok_shape = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
    if images.dtype != np.uint8 or not ok_shape:
        raise MedxferError(
            f"shifts take a uint8 batch (N, H, W) or (N, H, W, 3), not {images.dtype} "
            f"{images.shape}",
            "decode the images with medxfer.data.cache.load_images",
        )


def apply_shift(images: np.ndarray, shift: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """``images`` under ``shift`` (a name in ``SHIFTS``) at ``severity`` (1, 2 or 3): a new
    array of the same shape and dtype; the input is left unchanged."""
    if shift not in _FUNCTIONS:
        raise MedxferError(f"unknown shift {shift!r}", f"use one of {', '.join(SHIFTS)}")
    if severity not in SEVERITIES:
        raise MedxferError(f"shift severity {severity!r} is not 1, 2 or 3", "use 1, 2 or 3")
    check_images(images)
    fn, level, shift_id = _FUNCTIONS[shift], LEVELS[shift][severity - 1], SHIFTS.index(shift)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = fn(img, level, np.random.default_rng([seed, shift_id, i]))
    return out
