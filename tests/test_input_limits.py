"""runtime.imageio refuses a file that would decode too large from its header, before decoding it.

Each bomb is small on disk and huge when decoded; it is read in a child process
whose peak resident memory must stay low, so that a refusal after decoding
(or no refusal) fails the test instead of only being slow.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import MRImageStorage, generate_uid

from runtime.imageio import MAX_FILE_BYTES, ImageReadError, read_image
from tests.test_imageio import _dicom

ROOT = Path(__file__).resolve().parents[1]
MAX_RSS_MB = 300
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_MB = 1 << 20

CHILD = """
import resource, sys
limit = 2 << 30  # a reader that decodes the bomb fails here instead of exhausting the machine
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from runtime.imageio import ImageReadError, read_image
try:
    img = read_image(sys.argv[1])
    print("read", img.shape)
except ImageReadError as err:
    print("refused", err.reason)
except MemoryError:
    print("out of memory")
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report the peak of the (pytest) parent that forked us
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _read_in_child(path: Path) -> tuple[str, float]:
    """(outcome line, peak RSS in MB) of ``read_image(path)`` in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) >= 2, proc.stdout + proc.stderr
    return lines[-2], int(lines[-1]) / 1024  # VmHWM is in kB


def _deflate_zeros(nzeros: int, prefix: bytes = b"", zlib_wrapper: bool = False) -> bytes:
    """Deflate ``prefix`` followed by ``nzeros`` zero bytes, in milliseconds.

    Each segment ends with a full flush (byte-aligned, no references back), so
    one compressed MiB of zeros can be repeated instead of compressed again.
    ``zlib_wrapper`` adds the zlib header and Adler-32 (PNG, TIFF); without it
    the stream is raw deflate (DICOM).
    """
    def segment(data: bytes, last: bool) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)

    body = segment(prefix, False) + segment(bytes(_MB), False) * (nzeros // _MB) + segment(bytes(nzeros % _MB), True)
    if not zlib_wrapper:
        return body
    adler = zlib.adler32(prefix)
    low, high = adler & 0xFFFF, (adler >> 16) + nzeros * (adler & 0xFFFF)  # zeros leave the low sum as it is
    return b"\x78\xda" + body + struct.pack(">I", (high % 65521) << 16 | low)


def _tiff(width: int, height: int, bits: int, samples: int, strip: bytes, compression: int,
          order: str = "little", big: bool = False) -> bytes:
    """A single-strip TIFF (classic or BigTIFF) holding ``strip`` as its pixel data."""
    bo = "<" if order == "little" else ">"
    off = "Q" if big else "I"
    word = 8 if big else 4
    header_len = 16 if big else 8
    extra_at = header_len + len(strip)
    extra, entries = b"", []

    def entry(tag: int, kind: int, values: list[int]) -> None:
        nonlocal extra
        raw = struct.pack(bo + {3: "H", 4: "I"}[kind] * len(values), *values)
        if len(raw) <= word:
            field = raw.ljust(word, b"\0")
        else:  # stored after the strip, the entry holds its offset
            field = struct.pack(bo + off, extra_at + len(extra))
            extra += raw
        entries.append(struct.pack(bo + "HH" + off, tag, kind, len(values)) + field)

    entry(256, 4, [width])
    entry(257, 4, [height])
    entry(258, 3, [bits] * samples)
    entry(259, 3, [compression])
    entry(262, 3, [2 if samples >= 3 else 1])
    entry(273, 4, [header_len])
    entry(277, 3, [samples])
    entry(278, 4, [height])
    entry(279, 4, [len(strip)])
    entry(284, 3, [1])
    entry(339, 3, [3 if bits == 32 else 1] * samples)  # float or unsigned samples
    ifd_at = extra_at + len(extra)
    ifd = struct.pack(bo + ("Q" if big else "H"), len(entries)) + b"".join(entries) + struct.pack(bo + off, 0)
    magic = b"II" if order == "little" else b"MM"
    head = magic + (struct.pack(bo + "HHHQ", 43, 8, 0, ifd_at) if big else struct.pack(bo + "HI", 42, ifd_at))
    return head + strip + extra + ifd


def _png(width: int, height: int, depth: int, colour: int, channels: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = 1 + width * channels * depth // 8  # filter byte + samples
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    idat = _deflate_zeros(row * height, zlib_wrapper=True)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int, precision: int, components: int) -> bytes:
    """SOI, an extended-sequential frame header (SOF1) and EOI: the header of a JPEG, no scan."""
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    body = struct.pack(">BHHB", precision, height, width, components) + comps
    return b"\xff\xd8\xff\xc1" + struct.pack(">H", len(body) + 2) + body + b"\xff\xd9"


def _deflated_dicom(rows: int, columns: int, frames: int = 1, nbytes: int | None = None) -> bytes:
    """A 16-bit grey MR DICOM in Deflated Explicit VR Little Endian whose pixels are all zero.

    ``nbytes`` (default: what the attributes claim) is the length of its pixel data.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DEFLATED
    ds = FileDataset("bomb.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    buf = BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)  # pydicom 2
    raw = buf.getvalue()
    meta_end = 144 + struct.unpack("<I", raw[140:144])[0]  # (0002,0000) group length: its value at byte 140
    attributes = zlib.decompress(raw[meta_end:], -15)
    nbytes = rows * columns * frames * 2 if nbytes is None else nbytes
    pixel_data = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, nbytes)
    return raw[:meta_end] + _deflate_zeros(nbytes, prefix=attributes + pixel_data)


BOMBS = {  # name -> (file name, builder, words the reason must hold)
    "tiff-20000x20000-16bit-deflate": (
        "bomb.tif", lambda: _tiff(20000, 20000, 16, 1, _deflate_zeros(20000 * 20000 * 2, zlib_wrapper=True), 8),
        ["too large", "20000x20000"]),
    "tiff-7000x7000-float-rgb": (  # under the pixel limit, over the decoded-bytes limit
        "bomb.tif", lambda: _tiff(7000, 7000, 32, 3, _deflate_zeros(7000 * 7000 * 12, zlib_wrapper=True), 8),
        ["too large to decode", "7000x7000", "588 mb"]),
    "png-6000x6000-rgba-16bit": (
        "bomb.png", lambda: _png(6000, 6000, 16, 6, 4), ["too large to decode", "6000x6000", "288 mb"]),
    "jpeg-7000x7000-12bit-colour": (
        "bomb.jpg", lambda: _jpeg_header(7000, 7000, 12, 3), ["too large to decode", "7000x7000", "294 mb"]),
    "dicom-15000x15000-deflated": (
        "bomb.dcm", lambda: _deflated_dicom(15000, 15000), ["too large", "15000x15000"]),
    "dicom-64x64-deflated-300mb-pixel-data": (  # small attributes, oversized data set
        "bomb.dcm", lambda: _deflated_dicom(64, 64, nbytes=300_000_000), ["deflated dicom too large", "216 mb"]),
    "dicom-deflated-2000-frames-no-suffix": (
        "IM0001", lambda: _deflated_dicom(512, 512, frames=2000), ["multi-frame", "2000 frames"]),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_refused_before_decoding(tmp_path, name):
    filename, build, words = BOMBS[name]
    path = tmp_path / filename
    path.write_bytes(build())
    assert path.stat().st_size < 2 * _MB  # small on disk
    outcome, rss_mb = _read_in_child(path)
    assert outcome.startswith("refused"), outcome
    for word in words:
        assert word in outcome.lower(), outcome
    assert rss_mb < MAX_RSS_MB, f"{name}: peak RSS {rss_mb:.0f} MB"


def test_deflated_dicom(tmp_path):
    """A deflated DICOM is read; one whose attributes claim too large an image is refused from them."""
    data = _deflate_zeros(5 * _MB + 123, prefix=b"head", zlib_wrapper=True)  # the bombs' streams are real
    inflater = zlib.decompressobj()  # checks the Adler-32 at the end
    assert inflater.decompress(data) == b"head" + bytes(5 * _MB + 123) and inflater.eof
    small = tmp_path / "small.dcm"
    small.write_bytes(_deflated_dicom(24, 32))
    np.testing.assert_array_equal(read_image(small), np.zeros((24, 32), np.float32))
    claims = tmp_path / "claims.dcm"
    claims.write_bytes(_deflated_dicom(15000, 15000, nbytes=8))
    _expect_error(claims, "too large", "15000x15000")


def test_oversized_file_refused_unread(tmp_path):
    path = tmp_path / "big.png"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing on disk
    outcome, rss_mb = _read_in_child(path)
    assert outcome.startswith("refused") and "file too large" in outcome, outcome
    assert rss_mb < MAX_RSS_MB


def _expect_error(path: Path, *words: str) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    reason = info.value.reason.lower()
    for word in words:
        assert word in reason, reason
    return reason


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"Rows": 15000, "Columns": 15000}, ["too large", "15000x15000"]),
        ({"Rows": 7000, "Columns": 7000, "SamplesPerPixel": 3, "PlanarConfiguration": 0},
         ["too large to decode", "7000x7000", "3 sample"]),
        ({"Rows": 7000, "Columns": 7000, "BitsAllocated": 64, "BitsStored": 64, "HighBit": 63},
         ["too large to decode", "8 byte"]),
    ],
)
def test_dicom_header_refused_before_pixels(tmp_path, attrs, words):
    """The attributes, not the (short) pixel data, decide: nothing is decoded."""
    path = _dicom(tmp_path / "claims.dcm", np.zeros((2, 2), np.uint16), **attrs)
    _expect_error(path, *words)


def test_multi_page_tiff_refused(tmp_path):
    path = tmp_path / "stack.tif"
    page = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert cv2.imwritemulti(str(path), [page, page, page])
    _expect_error(path, "multi-page", "3 pages")


@pytest.mark.parametrize(("ext", "name"), [(".bmp", "bmp"), (".ppm", "pnm")])
def test_other_raster_formats_refused(tmp_path, ext, name):
    """Only PNG, JPEG and TIFF data reach the decoder, whatever the suffix says."""
    ok, encoded = cv2.imencode(ext, np.zeros((8, 8, 3), np.uint8))
    path = tmp_path / "scan.png"
    path.write_bytes(encoded.tobytes())
    _expect_error(path, "cannot decode", name)


@pytest.mark.parametrize(("order", "big"), [("little", False), ("big", False), ("little", True), ("big", True)])
def test_tiff_header_layouts(tmp_path, order, big):
    """Classic and BigTIFF headers in either byte order are parsed: a small image decodes, a huge claim is refused."""
    raw = np.arange(16, dtype=np.uint8).reshape(4, 4) * 15
    raw[3] = 0
    path = tmp_path / "small.tif"
    path.write_bytes(_tiff(4, 4, 8, 1, _deflate_zeros(4, raw[:3].tobytes(), zlib_wrapper=True), 8, order, big))
    np.testing.assert_allclose(read_image(path), raw / 255.0, atol=1e-6)
    huge = tmp_path / "huge.tif"  # 3.6 gigapixels, 8 bytes of pixel data
    huge.write_bytes(_tiff(60000, 60000, 8, 1, bytes(8), 1, order, big))
    _expect_error(huge, "too large", "60000x60000")


def test_not_a_regular_file(tmp_path):
    _expect_error(tmp_path, "folder")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _expect_error(fifo, "not a regular file")
