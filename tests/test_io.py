from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data.io import read_image, resize
from medxfer.errors import MedxferError


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 2 % 256).astype(np.uint8)


def test_png8_gray_exact(tmp_path: Path) -> None:
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), arr)


def test_png16_scaled_to_uint8(tmp_path: Path) -> None:
    arr16 = (np.linspace(0, 4095, 40 * 60).reshape(40, 60)).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    out = read_image(tmp_path / "a16.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order preserved


def test_rgb_jpeg_to_gray_and_rgb(tmp_path: Path) -> None:
    rgb = np.stack([_gradient()] * 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    g = read_image(tmp_path / "c.jpg", "gray")
    c = read_image(tmp_path / "c.jpg", "rgb")
    assert g.shape == (40, 60) and c.shape == (40, 60, 3)
    assert np.abs(g.astype(int) - _gradient().astype(int)).mean() < 3


def _write_dicom(path: Path, pixels: np.ndarray, **tags: object) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CT", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_rescale_and_window(tmp_path: Path) -> None:
    raw = np.tile(np.arange(0, 2000, 20, dtype=np.uint16), (10, 1))  # 10 x 100
    # HU = raw - 1000; window centre 40, width 400 -> [-160, 240] HU -> raw [840, 1240]
    _write_dicom(
        tmp_path / "ct.dcm",
        raw,
        RescaleSlope=1,
        RescaleIntercept=-1000,
        WindowCenter=40,
        WindowWidth=400,
    )
    out = read_image(tmp_path / "ct.dcm")
    assert out.shape == (10, 100) and out.dtype == np.uint8
    hu = raw[0].astype(float) - 1000
    expected = np.clip((hu + 160) / 400, 0, 1) * 255
    assert np.abs(out[0].astype(float) - expected).max() <= 1.0


def test_dicom_without_window_uses_min_max(tmp_path: Path) -> None:
    raw = np.tile(np.arange(100, 1100, 10, dtype=np.uint16), (4, 1))
    _write_dicom(tmp_path / "x.dcm", raw)
    out = read_image(tmp_path / "x.dcm")
    assert out.min() == 0 and out.max() == 255


def test_corrupt_file_names_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(MedxferError, match=r"broken\.png"):
        read_image(bad)


def test_resize_pad_keeps_aspect() -> None:
    arr = np.full((20, 40), 200, np.uint8)
    out = resize(arr, 32, "pad")
    assert out.shape == (32, 32)
    assert out[0].max() == 0 and out[16].min() > 150  # black bars on top, image in the middle
