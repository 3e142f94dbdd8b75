"""Read brain scans from disk as 2-D float32 grey images in [0, 1].

Supported: PNG, JPEG, single-page TIFF (classic or BigTIFF; 8/16-bit,
grey/BGR/BGRA, or float) and single-frame DICOM (any transfer syntax pydicom
decodes, Deflated Explicit VR Little Endian included). Every failure on a bad
file raises :class:`ImageReadError`, which names the file and gives a short
reason. This module must not import torch.

Every input is bounded before it is decoded, so a small file that claims a
huge image (a decompression bomb) is refused without the memory it would need:

* ``MAX_FILE_BYTES`` (512 MB): the size on disk, from ``stat`` before any byte is
  read.
* ``MAX_PIXELS`` (50 megapixels): height x width from the header (PNG IHDR,
  JPEG SOF, the first TIFF image directory, DICOM Rows/Columns).
* ``MAX_DECODED_BYTES`` (200 MB): height x width x samples x bytes per sample
  of the decoded raster, from the same header; 4 bytes a pixel at the pixel
  limit, so 8-bit images of up to 4 channels and 16-bit or float32 grey images
  may use all 50 megapixels, wider layouts correspondingly fewer. A deflated
  DICOM data set may inflate to at most this plus ``MAX_DICOM_HEADER_BYTES``.

Only PNG, JPEG and TIFF rasters reach the decoder; other content (BMP, GIF,
WebP, ...) is refused whatever its suffix, since its size cannot be checked
first. Multi-page TIFF and multi-frame DICOM are refused.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")

MAX_FILE_BYTES = 512_000_000  # size on disk, checked before the file is read
MAX_PIXELS = 50_000_000  # a scan is far smaller; larger images are refused before they are decoded
MAX_DECODED_BYTES = 4 * MAX_PIXELS  # decoded raster: 200 MB, 4 bytes a pixel at the pixel limit
MAX_DICOM_HEADER_BYTES = 16_000_000  # inflated DICOM attributes read to find the pixel description

DICOM_MAGIC = b"DICM"  # at byte 128, after the preamble
_DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_DICOM_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # (Float/DoubleFloat)PixelData
_PNG_IEND = b"\x00\x00\x00\x00IEND"  # zero length + chunk type of the final chunk
_JPEG_EOI = b"\xff\xd9"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# magic -> (byte order, BigTIFF)
_TIFF_MAGIC = {b"II*\0": ("little", False), b"MM\0*": ("big", False),
               b"II+\0": ("little", True), b"MM\0+": ("big", True)}
_TIFF_INT_TYPES = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4, 16: 8, 17: 8}  # field type -> bytes per value
_TIFF_TAGS = {256: "width", 257: "height", 258: "bits", 262: "photometric", 277: "samples",
              322: "tile_width", 323: "tile_height"}
_TIFF_MAX_ENTRIES = 4096  # a real image directory holds a few dozen
_TIFF_MAX_PAGES = 10_000  # pages counted for the message of a multi-page refusal
_OTHER_FORMATS = ((b"BM", "BMP"), (b"GIF8", "GIF"), (b"\xffO\xffQ", "JPEG 2000"),
                  (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"v/1\x01", "OpenEXR"), (b"#?", "Radiance HDR"),
                  (b"PF\n", "PFM"), (b"Pf\n", "PFM"), (b"\x59\xa6\x6a\x95", "Sun raster"))


class ImageReadError(ValueError):
    """A file could not be read as an image; ``str(err) == f"{path}: {reason}"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _is_dicom(path: Path, head: bytes) -> bool:
    return path.suffix.lower() == ".dcm" or head[128:132] == DICOM_MAGIC


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


def _sample_bytes(bits: int) -> int:
    """Bytes a decoded sample of ``bits`` bits takes (8, 16, 32 or 64-bit storage)."""
    return 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8


def _check_size(path: Path, height: int, width: int, samples: int = 1, sample_bytes: int = 1,
                what: str = "image") -> None:
    """Refuse a raster over ``MAX_PIXELS`` pixels or ``MAX_DECODED_BYTES`` decoded bytes."""
    if height * width > MAX_PIXELS:
        raise ImageReadError(path, f"{what} too large ({height}x{width} pixels; at most "
                                   f"{MAX_PIXELS // 1_000_000} megapixels are read)")
    nbytes = height * width * samples * sample_bytes
    if nbytes > MAX_DECODED_BYTES:
        raise ImageReadError(path, f"{what} too large to decode ({height}x{width} pixels x {samples} sample(s) x "
                                   f"{sample_bytes} byte(s) = {nbytes / 1e6:.0f} MB; at most "
                                   f"{MAX_DECODED_BYTES // 1_000_000} MB are decoded)")


def _png_header(path: Path, data: bytes) -> tuple[int, int, int, int]:
    """(height, width, samples, bytes per sample) of the decoded PNG, from its IHDR chunk."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        raise ImageReadError(path, "cannot decode image (PNG without an IHDR header)")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    # grey, BGR; palette (may carry alpha), grey+alpha and RGBA decode to 4 channels
    samples = {0: 1, 2: 3}.get(colour, 4)
    return height, width, samples, 2 if depth == 16 else 1


def _jpeg_header(path: Path, data: bytes) -> tuple[int, int, int, int]:
    """(height, width, components, bytes per sample) of the decoded JPEG, from its frame header (SOF)."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in _JPEG_SOF:
            precision = data[i + 4]
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return height, width, max(1, data[i + 9]), 2 if precision > 8 else 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 2 if marker != 0xFF else 1
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ImageReadError(path, "cannot decode image (JPEG without a frame header)")


def _tiff_header(path: Path, data: bytes) -> tuple[int, int, int, int, tuple[int, int] | None]:
    """(height, width, samples, bytes per sample, (tile height, tile width) or None) of a
    single-page TIFF, from its first image directory; refuses multi-page files."""
    order, big = _TIFF_MAGIC[data[:4]]
    word = 8 if big else 4  # offsets and value counts
    count_size, entry_size = (8, 20) if big else (2, 12)

    def bad(what: str) -> ImageReadError:
        return ImageReadError(path, f"cannot decode image (TIFF {what})")

    def num(pos: int, size: int) -> int:
        if pos + size > len(data):
            raise bad("header points past the end of the file")
        return int.from_bytes(data[pos : pos + size], order)

    def directory(pos: int) -> tuple[int, int] | None:
        """(number of entries, offset of the next directory), or None if ``pos`` holds none."""
        if pos < 8 or pos + count_size > len(data):
            return None
        n = num(pos, count_size)
        end = pos + count_size + n * entry_size
        if n > _TIFF_MAX_ENTRIES or end > len(data):
            return None
        return n, num(end, word) if end + word <= len(data) else 0  # a missing link ends the chain

    if big and (num(4, 2) != 8 or num(6, 2) != 0):
        raise bad("header has a bad BigTIFF offset size")
    first = num(8 if big else 4, word)
    ifd = directory(first)
    if ifd is None:
        raise bad("without a readable image directory")
    tags: dict[str, list[int]] = {}
    for k in range(ifd[0]):
        e = first + count_size + k * entry_size
        tag, kind, count = num(e, 2), num(e + 2, 2), num(e + 4, word)
        if tag not in _TIFF_TAGS or kind not in _TIFF_INT_TYPES or count == 0:
            continue
        size = _TIFF_INT_TYPES[kind]
        at = e + 4 + word if count * size <= word else num(e + 4 + word, word)
        tags[_TIFF_TAGS[tag]] = [num(at + j * size, size) for j in range(min(count, 16))]
    pages, seen, nxt = 1, {first}, ifd[1]
    while nxt and nxt not in seen and pages < _TIFF_MAX_PAGES and (d := directory(nxt)) is not None:
        seen.add(nxt)
        pages, nxt = pages + 1, d[1]
    if pages > 1:
        raise ImageReadError(path, f"multi-page TIFF ({pages} pages) not supported")
    if "width" not in tags or "height" not in tags:
        raise bad("without image width and length")
    samples = tags.get("samples", [1])[0]
    if tags.get("photometric", [None])[0] == 3:  # palette: decoded to BGR
        samples = max(samples, 3)
    tile = None
    if "tile_width" in tags and "tile_height" in tags:
        tile = tags["tile_height"][0], tags["tile_width"][0]
    return tags["height"][0], tags["width"][0], samples, _sample_bytes(max(tags.get("bits", [1]))), tile


def _other_format(data: bytes) -> str | None:
    """The name of another image format ``data`` starts like, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    if data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PNM"
    return next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)


def _check_raster(path: Path, data: bytes) -> None:
    """Refuse raster data that is not PNG, JPEG or TIFF, or whose header claims too large an image."""
    if data.startswith(b"\x89PNG"):
        _check_size(path, *_png_header(path, data))
    elif data.startswith(b"\xff\xd8"):
        _check_size(path, *_jpeg_header(path, data))
    elif data[:4] in _TIFF_MAGIC:
        height, width, samples, sample_bytes, tile = _tiff_header(path, data)
        _check_size(path, height, width, samples, sample_bytes)
        if tile is not None:
            _check_size(path, *tile, samples, sample_bytes, what="TIFF tile")
    else:
        other = _other_format(data)
        what = f"{other} data; only PNG, JPEG and TIFF rasters are read" if other else "not PNG, JPEG or TIFF data"
        raise ImageReadError(path, f"cannot decode image ({what})")


def _read_raster(path: Path, data: bytes) -> np.ndarray:
    _check_truncation(path, data)
    _check_raster(path, data)
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


def _dicom_header(data: bytes):
    """(attributes before the pixel data, deflated data set or None).

    The file meta group is read as pydicom reads it, so that a deflated data set
    is recognised exactly when pydicom would inflate it. The attributes are None
    when a deflated data set holds no pixel data within its first
    ``MAX_DICOM_HEADER_BYTES`` inflated bytes; nothing beyond them is inflated
    or decoded.
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble

    fp = BytesIO(data)
    read_preamble(fp, True)
    meta = _read_file_meta_info(fp)
    if str(meta.get("TransferSyntaxUID", "")).strip("\0 ") != _DEFLATED_DICOM:
        return pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True), None
    deflated = memoryview(data)[fp.tell() :]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(deflated, MAX_DICOM_HEADER_BYTES)
    found = []

    def at_pixels(tag, vr, length) -> bool:
        if tag in _DICOM_PIXEL_TAGS:
            found.append(tag)
            return True
        return False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a data set cut at the inflation limit ends early
        ds = read_dataset(BytesIO(head), False, True, stop_when=at_pixels)
    return (ds if found or inflater.eof else None), deflated


def _check_inflated(path: Path, deflated: bytes) -> None:
    """Refuse a deflated data set that inflates past the decoded-size limit (inflated in chunks, then dropped)."""
    limit = MAX_DECODED_BYTES + MAX_DICOM_HEADER_BYTES
    inflater, rest, total = zlib.decompressobj(-zlib.MAX_WBITS), deflated, 0
    try:
        while not inflater.eof:
            chunk = inflater.decompress(rest, 1 << 22)
            rest, total = inflater.unconsumed_tail, total + len(chunk)
            if total > limit:
                raise ImageReadError(path, f"deflated DICOM too large (inflates to over {limit // 1_000_000} MB)")
            if not chunk and not rest:
                break
    except zlib.error as exc:
        raise ImageReadError(path, f"cannot parse DICOM (bad deflated data: {exc})") from exc


def _check_dicom_size(path: Path, header) -> None:
    """Refuse a multi-frame or too large DICOM image from its attributes, before its pixels are read."""
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
        rows = int(header.get("Rows", 0) or 0)
        columns = int(header.get("Columns", 0) or 0)
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        bits = int(header.get("BitsAllocated", 8) or 8)
    except Exception as exc:  # pydicom raises many types for a bad value
        raise ImageReadError(path, f"bad DICOM frame/size attributes ({exc})") from exc
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames) not supported")
    _check_size(path, rows, columns, samples, _sample_bytes(bits))


def _read_dicom(path: Path, data: bytes) -> np.ndarray:
    import pydicom  # local: only needed for DICOM input

    try:
        header, deflated = _dicom_header(data)
    except ImportError:  # a pydicom without the readers used: not a fault of the file
        raise
    except Exception as exc:  # pydicom raises many types for a bad file
        raise ImageReadError(path, f"cannot parse DICOM ({type(exc).__name__})") from exc
    if header is None:
        raise ImageReadError(path, f"DICOM header too large (no pixel data in its first "
                                   f"{MAX_DICOM_HEADER_BYTES // 1_000_000} MB)")
    _check_dicom_size(path, header)
    if deflated is not None:
        _check_inflated(path, deflated)
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types for a bad file
        raise ImageReadError(path, f"cannot parse DICOM ({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM has no pixel data")
    try:
        slope = _first(ds.get("RescaleSlope", 1) or 1)
        intercept = _first(ds.get("RescaleIntercept", 0) or 0)
        centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        window = (_first(centre), _first(width)) if centre is not None and width else None
    except (TypeError, ValueError, IndexError) as exc:
        raise ImageReadError(path, f"bad DICOM rescale/window attributes ({exc})") from exc
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


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; its size is checked with ``stat`` before they are read."""
    def too_large(size: int) -> ImageReadError:
        return ImageReadError(path, f"file too large ({size / 1e6:.0f} MB; at most "
                                    f"{MAX_FILE_BYTES // 1_000_000} MB are read)")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise too_large(size)
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if len(data) > MAX_FILE_BYTES:  # grew since it was measured
        raise too_large(len(data))
    return data


def read_image(path: str | Path) -> np.ndarray:
    """Read one scan as a (H, W) float32 grey image with values in [0, 1].

    A file whose first 132 bytes hold the DICOM preamble ('DICM' at byte 128)
    is read as DICOM whatever its suffix, and so is any ``.dcm`` file.

    Raises:
        ImageReadError: for any unreadable file (missing, not a regular file,
            empty, unsupported suffix or content, over the size limits of this
            module, truncated or undecodable data, DICOM without pixels or with
            several frames, multi-page TIFF, smaller than 2x2, NaN/inf values).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "a folder, not a file")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    data = _read_bytes(path)
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    if _is_dicom(path, data[:132]):
        img = _read_dicom(path, data)
    elif path.suffix.lower() in SUPPORTED_SUFFIXES:
        img = _read_raster(path, data)
    else:
        raise ImageReadError(
            path, f"unsupported suffix {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    _check_size(path, img.shape[0], img.shape[1])
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
