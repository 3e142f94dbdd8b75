"""Read brain scans from disk as 2-D float32 grey images in [0, 1].

Supported: PNG, JPEG, TIFF (8/16-bit, grey/BGR/BGRA, or float) and single-frame
DICOM. Every failure on a bad file raises :class:`ImageReadError`, which names
the file and gives a short reason. This module must not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")

MAX_PIXELS = 50_000_000  # a scan is far smaller; larger files are refused before they are decoded
_PNG_IEND = b"\x00\x00\x00\x00IEND"  # zero length + chunk type of the final chunk
_JPEG_EOI = b"\xff\xd9"


class ImageReadError(ValueError):
    """A file could not be read as an image; ``str(err) == f"{path}: {reason}"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _is_dicom(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".dcm" or head[128:132] == b"DICM"


def _scale_float(img: np.ndarray, path: Path) -> np.ndarray:
    """Min-max a float image to [0, 1]; a constant image becomes zeros."""
    img = img.astype(np.float64)
    if not np.isfinite(img).all():
        raise ImageReadError(path, "image contains NaN or inf values")
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros(img.shape, np.float32)
    return ((img - lo) / (hi - lo)).astype(np.float32)


def _to_unit_grey(img: np.ndarray, path: Path) -> np.ndarray:
    """(H, W[, C]) decoded raster -> (H, W) float32 in [0, 1]."""
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 1:
            img = img[:, :, 0]
        elif channels in (3, 4):
            if img.dtype not in (np.uint8, np.uint16, np.float32):
                img = img.astype(np.float32)
            code = cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY
            img = cv2.cvtColor(img, code)
        else:
            raise ImageReadError(path, f"unsupported number of channels: {channels}")
    elif img.ndim != 2:
        raise ImageReadError(path, f"unsupported image shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer):
        return _scale_float(img, path)
    raise ImageReadError(path, f"unsupported pixel type {img.dtype}")


def _check_truncation(path: Path, data: bytes) -> None:
    """Reject JPEG/PNG data cut short; the format is sniffed, since suffixes lie."""
    if data.startswith(b"\xff\xd8"):
        if not data.rstrip(b"\x00 \t\r\n").endswith(_JPEG_EOI):
            raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
    elif data.startswith(b"\x89PNG") and _PNG_IEND not in data:
        raise ImageReadError(path, "truncated PNG (no IEND chunk)")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header without decoding the pixels, when it can be found."""
    if data.startswith(b"\x89PNG") and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 2 if marker != 0xFF else 1
                continue
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _check_pixels(path: Path, height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise ImageReadError(path, f"image too large ({height}x{width} pixels; at most {MAX_PIXELS // 1_000_000} "
                                   "megapixels are read)")


def _read_raster(path: Path, data: bytes) -> np.ndarray:
    _check_truncation(path, data)
    size = _header_size(data)
    if size is not None:
        _check_pixels(path, *size)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageReadError(path, f"cannot decode image ({exc.msg.strip()})") from exc
    if img is None:
        raise ImageReadError(path, "cannot decode image (corrupt or not an image)")
    return _to_unit_grey(img, path)


def _first(value) -> float:
    """First element of a possibly multi-valued DICOM attribute, as float."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom  # local: only needed for DICOM input

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types for a bad file
        raise ImageReadError(path, f"cannot parse DICOM ({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM has no pixel data")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        slope = _first(ds.get("RescaleSlope", 1) or 1)
        intercept = _first(ds.get("RescaleIntercept", 0) or 0)
        centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        window = (_first(centre), _first(width)) if centre is not None and width else None
    except (TypeError, ValueError, IndexError) as exc:
        raise ImageReadError(path, f"bad DICOM frame/rescale/window attributes ({exc})") from exc
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames) not supported")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, bad lengths, ...
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour DICOM: RGB -> grey
        arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2:
        raise ImageReadError(path, f"unsupported DICOM pixel shape {arr.shape}")
    img = arr.astype(np.float64) * slope + intercept
    if window is not None and window[1] > 0:
        c, w = window
        img = np.clip((img - (c - w / 2)) / w, 0.0, 1.0)
    else:
        img = _scale_float(img, path)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        img = 1.0 - img
    return img.astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """Read one scan as a (H, W) float32 grey image with values in [0, 1].

    Raises:
        ImageReadError: for any unreadable file (missing, empty, unsupported
            suffix, truncated or undecodable data, DICOM without pixels or with
            several frames, smaller than 2x2, NaN/inf values).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror})") from exc
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    if _is_dicom(path, data[:132]):
        img = _read_dicom(path)
    elif path.suffix.lower() in SUPPORTED_SUFFIXES:
        img = _read_raster(path, data)
    else:
        raise ImageReadError(
            path, f"unsupported suffix {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    _check_pixels(path, img.shape[0], img.shape[1])
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ImageReadError(path, f"image too small ({img.shape[0]}x{img.shape[1]} pixels)")
    if not np.isfinite(img).all():
        raise ImageReadError(path, "image contains NaN or inf values")
    return np.ascontiguousarray(img, dtype=np.float32)


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Sorted paths of the files under ``folder`` with a supported suffix."""
    folder = Path(folder)
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
