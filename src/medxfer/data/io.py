"""Decode one medical image file into a uint8 numpy array.

Formats: JPEG, PNG (8- and 16-bit), TIFF/BMP through Pillow, and DICOM through pydicom
(rescale slope/intercept applied, then the file's VOI window, else min-max, to 8 bits).
Output is ``(H, W)`` for grayscale or ``(H, W, 3)`` for colour, always ``uint8``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medxfer.errors import MedxferError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map ``[lo, hi]`` (default: min, max) to ``[0, 255]``."""
    arr = arr.astype(np.float32)
    lo = float(arr.min()) if lo is None else lo
    hi = float(arr.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.round(out).astype(np.uint8)


def _first(value: Any) -> float:
    """DICOM window values may be multi-valued; take the first."""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__getitem__"):
        return float(value[0])
    return float(value)


def read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(str(path))
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3 and arr.shape[-1] != 3:  # multi-frame: take the middle frame
        arr = arr[arr.shape[0] // 2]
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    if arr.ndim == 3:  # RGB DICOM
        return _to_uint8(arr)
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        c, w = _first(center), _first(width)
        out = _to_uint8(arr, c - w / 2.0, c + w / 2.0)
    else:
        out = _to_uint8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: high values are dark
    return out


def read_pil(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        opened.load()
        im: Image.Image = opened
        if im.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:  # 16-bit / int / float grayscale
            return _to_uint8(np.asarray(im))
        if im.mode in {"RGBA", "LA"} or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, rgba).convert("RGB")
        if im.mode not in {"L", "RGB"}:
            im = im.convert("RGB") if im.mode in {"P", "CMYK", "YCbCr"} else im.convert("L")
        return np.asarray(im).copy()


def read_image(path: str | Path, color: str = "gray") -> np.ndarray:
    """Read ``path`` as uint8; ``color`` is ``gray`` (H, W) or ``rgb`` (H, W, 3).

    Raises MedxferError naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        arr = read_dicom(path) if is_dicom(path) else read_pil(path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, AttributeError) as err:
        raise MedxferError(
            f"cannot read image {path}: {err.__class__.__name__}: {err}",
            "remove or replace the file (`medxfer data audit` lists every unreadable file), "
            "or set data.skip_unreadable=true",
        ) from None
    except Exception as err:  # pydicom raises many types for broken files
        raise MedxferError(
            f"cannot read image {path}: {err.__class__.__name__}: {err}",
            "remove or replace the file, or set data.skip_unreadable=true",
        ) from None
    if color == "gray" and arr.ndim == 3:
        arr = np.asarray(Image.fromarray(arr).convert("L"))
    elif color == "rgb" and arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr)


def pad_to_square(arr: np.ndarray) -> np.ndarray:
    """Pad with black so that height == width, image centred (keeps the aspect ratio)."""
    h, w = arr.shape[:2]
    m = max(h, w)
    if h == w:
        return arr
    out = np.zeros((m, m, *arr.shape[2:]), dtype=arr.dtype)
    top, left = (m - h) // 2, (m - w) // 2
    out[top : top + h, left : left + w] = arr
    return out


def resize(arr: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Resize to ``size x size``: ``pad`` keeps the aspect ratio, ``squash`` stretches."""
    if mode == "pad":
        arr = pad_to_square(arr)
    elif mode != "squash":
        raise MedxferError(f"unknown resize mode {mode!r}", "use data.resize=pad or squash")
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    im = Image.fromarray(arr)
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))
