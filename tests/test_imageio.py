"""runtime.imageio: every format read to a (H, W) float32 image in [0, 1]; bad files raise."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from runtime.imageio import SUPPORTED_SUFFIXES, ImageReadError, list_images, read_image


def _gradient(h: int = 24, w: int = 32, maxval: int = 255, dtype=np.uint8) -> np.ndarray:
    """(h, w) smooth ramp from 0 to maxval, so lossy JPEG stays close."""
    ramp = np.linspace(0, maxval, h * w).reshape(h, w)
    return np.round(ramp).astype(dtype)


def _write(path: Path, img: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), img)
    return path


def _assert_image(img: np.ndarray, shape: tuple[int, int]) -> None:
    assert img.shape == shape and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0


# --- PNG / JPEG / TIFF -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_grey_8bit_lossless(tmp_path, suffix):
    raw = _gradient()
    img = read_image(_write(tmp_path / f"a{suffix}", raw))
    _assert_image(img, raw.shape)
    np.testing.assert_allclose(img, raw / 255.0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_grey_16bit_lossless(tmp_path, suffix):
    raw = _gradient(maxval=65535, dtype=np.uint16)
    img = read_image(_write(tmp_path / f"a{suffix}", raw))
    _assert_image(img, raw.shape)
    np.testing.assert_allclose(img, raw / 65535.0, atol=1e-6)
    assert img.max() == pytest.approx(1.0) and len(np.unique(img)) > 256  # kept 16-bit depth


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_jpeg_close_to_source(tmp_path, suffix):
    raw = _gradient(64, 64)
    img = read_image(_write(tmp_path / f"a{suffix}", raw))
    _assert_image(img, raw.shape)
    assert np.abs(img - raw / 255.0).mean() < 0.01


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_colour_to_grey(tmp_path, suffix):
    bgr = np.zeros((8, 9, 3), np.uint8)
    bgr[:, :3] = (255, 0, 0)  # blue
    bgr[:, 3:6] = (0, 255, 0)  # green
    bgr[:, 6:] = (0, 0, 255)  # red
    img = read_image(_write(tmp_path / f"c{suffix}", bgr))
    _assert_image(img, (8, 9))
    expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) / 255.0
    np.testing.assert_allclose(img, expected, atol=1e-6)
    # luminance weights: green > red > blue
    assert img[0, 4] > img[0, 7] > img[0, 1] > 0.05


def test_rgba_drops_alpha(tmp_path):
    bgr = np.dstack([_gradient(), _gradient()[::-1], np.full((24, 32), 90, np.uint8)])
    alpha = np.zeros((24, 32), np.uint8)  # fully transparent must not matter
    img = read_image(_write(tmp_path / "rgba.png", np.dstack([bgr, alpha])))
    ref = read_image(_write(tmp_path / "rgb.png", bgr))
    np.testing.assert_array_equal(img, ref)
    assert img.max() > 0.3


def test_float_tiff_min_max(tmp_path):
    raw = np.linspace(-3.0, 5.0, 20 * 10, dtype=np.float32).reshape(20, 10)
    img = read_image(_write(tmp_path / "f.tif", raw))
    np.testing.assert_allclose(img, (raw + 3.0) / 8.0, atol=1e-6)
    flat = read_image(_write(tmp_path / "flat.tif", np.full((5, 5), 7.0, np.float32)))
    np.testing.assert_array_equal(flat, 0.0)


def test_odd_path(tmp_path):
    folder = tmp_path / "dir with spaces ü"
    folder.mkdir()
    img = read_image(_write(folder / "scan é.png", _gradient()))
    _assert_image(img, (24, 32))


# --- DICOM -----------------------------------------------------------------------------


def _dicom(
    path: Path,
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    **attrs,
) -> Path:
    """Write a minimal single-channel MR DICOM file; ``pixels`` is (H, W) or (F, H, W)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    if pixels is not None:
        bits = pixels.dtype.itemsize * 8
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.save_as(path, write_like_original=False)  # pydicom 2
    return path


def test_dicom_8bit_min_max(tmp_path):
    raw = _gradient(maxval=200)
    img = read_image(_dicom(tmp_path / "a.dcm", raw))
    _assert_image(img, raw.shape)
    np.testing.assert_allclose(img, raw / 200.0, atol=1e-6)


def test_dicom_monochrome1_inverted(tmp_path):
    raw = _gradient(maxval=1000, dtype=np.uint16)
    mono2 = read_image(_dicom(tmp_path / "m2.dcm", raw))
    mono1 = read_image(_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono2, raw / 1000.0, atol=1e-6)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_16bit_signed_rescale_and_window(tmp_path):
    raw = np.linspace(-500, 1500, 16 * 16).astype(np.int16).reshape(16, 16)
    path = _dicom(
        tmp_path / "ct.dcm",
        raw,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=400,
        WindowWidth=1000,
    )
    img = read_image(path)
    value = raw.astype(np.float64) * 2 - 1000
    expected = np.clip((value - (400 - 500)) / 1000, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert (img == 0).any() and (img == 1).any()  # the window clipped both ends


def test_dicom_rescale_without_window(tmp_path):
    raw = np.array([[0, 10], [20, 30]], np.uint16)
    img = read_image(_dicom(tmp_path / "r.dcm", raw, RescaleSlope=3, RescaleIntercept=5))
    np.testing.assert_allclose(img, raw / 30.0, atol=1e-6)  # linear rescale, then min-max


def test_dicom_multi_valued_window_uses_first(tmp_path):
    raw = np.arange(0, 200, 2, dtype=np.uint16).reshape(10, 10)
    path = _dicom(tmp_path / "w.dcm", raw, WindowCenter=[50, 1000], WindowWidth=[100, 4000])
    np.testing.assert_allclose(read_image(path), np.clip(raw / 100.0, 0, 1), atol=1e-6)


def test_dicom_detected_by_magic_without_suffix(tmp_path):
    raw = _gradient(maxval=100)
    dcm = _dicom(tmp_path / "a.dcm", raw)
    renamed = dcm.rename(tmp_path / "IM0001")
    np.testing.assert_allclose(read_image(renamed), raw / 100.0, atol=1e-6)


# --- failures --------------------------------------------------------------------------


def _expect_error(path: Path, *words: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    err = info.value
    assert err.path == str(path) and str(err) == f"{path}: {err.reason}"
    for word in words:
        assert word in err.reason.lower()
    return err


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.png", "not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _expect_error(path, "empty")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated(tmp_path, suffix):
    rng = np.random.default_rng(0)
    full = _write(tmp_path / f"full{suffix}", rng.integers(0, 256, (64, 64), np.uint8))
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _expect_error(path, "truncated")


def test_jpeg_with_zero_padding_is_fine(tmp_path):
    path = _write(tmp_path / "pad.jpg", _gradient())
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert read_image(path).shape == (24, 32)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, np.uint8).tobytes())
    _expect_error(path, "decode")


@pytest.mark.parametrize("name", ["a.gif", "notes.txt"])
def test_unsupported_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"GIF89a" + b"\0" * 20)
    err = _expect_error(path, "unsupported")
    assert all(s in err.reason for s in SUPPORTED_SUFFIXES)


def test_too_small(tmp_path):
    _expect_error(_write(tmp_path / "line.png", np.full((1, 5), 100, np.uint8)), "small")


def test_float_nan(tmp_path):
    raw = np.ones((4, 4), np.float32)
    raw[1, 2] = np.nan
    _expect_error(_write(tmp_path / "nan.tif", raw), "nan")


def test_dicom_without_pixels(tmp_path):
    _expect_error(_dicom(tmp_path / "nopix.dcm", None), "no pixel data")


def test_dicom_multi_frame(tmp_path):
    raw = np.zeros((3, 8, 8), np.uint8)
    _expect_error(_dicom(tmp_path / "multi.dcm", raw, frames=3), "multi-frame", "not supported")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dicom_garbage(tmp_path):
    path = tmp_path / "bad.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    _expect_error(path)


def test_error_is_value_error():
    err = ImageReadError("x.png", "boom")
    assert isinstance(err, ValueError) and str(err) == "x.png: boom"


# --- list_images -----------------------------------------------------------------------


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "a.JPG", "sub/c.dcm", "sub/d.tiff", "notes.txt", "e.gif"]:
        (tmp_path / name).write_bytes(b"x")
    assert list_images(tmp_path) == sorted(
        [tmp_path / "a.JPG", tmp_path / "b.png", tmp_path / "sub/c.dcm", tmp_path / "sub/d.tiff"]
    )
    assert list_images(tmp_path, recursive=False) == [tmp_path / "a.JPG", tmp_path / "b.png"]
