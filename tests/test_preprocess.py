"""runtime.preprocess: crop to the head, square, resize; the image size no longer shows."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.preprocess import (
    PreprocessConfig,
    head_bbox,
    head_mask,
    load_and_preprocess,
    preprocess,
)

BR35H = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "br35h"


def _phantom(
    canvas: int, centre: tuple[float, float], radius: float, background: float = 0.0
) -> np.ndarray:
    """(canvas, canvas) float32 'head': bright disk with a dark ring and a bright core.

    ``centre`` (y, x) and ``radius`` are in pixels.
    """
    yy, xx = np.mgrid[:canvas, :canvas].astype(np.float32)
    r = np.hypot(yy - centre[0], xx - centre[1]) / radius
    img = np.where(r < 1.0, 0.8, background)
    img = np.where((r > 0.45) & (r < 0.6), 0.3, img)  # inner structure
    img = np.where(r < 0.2, 1.0, img)
    return img.astype(np.float32)


def _check_output(out: np.ndarray, size: int) -> None:
    assert out.shape == (size, size) and out.dtype == np.float32
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


def test_output_shape_dtype_range():
    img = _phantom(300, (120, 180), 90)
    for cfg in (PreprocessConfig(), PreprocessConfig(size=64, normalize=False)):
        _check_output(preprocess(img, cfg), cfg.size)


def test_upscaling_small_input():
    _check_output(preprocess(_phantom(40, (20, 20), 15)), 112)


def test_deterministic():
    img = _phantom(200, (60, 120), 50) + np.random.default_rng(0).uniform(0, 0.05, (200, 200))
    img = np.clip(img, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(preprocess(img), preprocess(img.copy()))


def test_normalize_stretches_dim_head():
    dim = _phantom(200, (100, 100), 60) * 0.4
    assert preprocess(dim, PreprocessConfig(normalize=False)).max() <= 0.4 + 1e-6
    assert preprocess(dim).max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "small, large",
    [
        # (canvas, centre, radius): same head drawn at 6x the resolution, elsewhere
        ((150, (75, 75), 50), (900, (450, 450), 300)),
        ((150, (50, 60), 45), (900, (600, 560), 270)),
        # same head in pixels, but on a much larger canvas
        ((150, (70, 80), 60), (900, (200, 650), 60)),
        ((150, (75, 75), 62), (900, (820, 100), 62)),
    ],
)
def test_canvas_size_does_not_show(small, large):
    """A small and a large scan of the same head look the same after preprocessing."""
    a = preprocess(_phantom(*small))
    b = preprocess(_phantom(*large))
    assert np.abs(a - b).mean() < 0.03
    for out in (a, b):  # the head fills the frame in both
        assert 0.5 < head_mask(out, 0.08).mean() < 0.9


def test_bbox_blank_is_full_image():
    assert head_bbox(np.zeros((30, 40), np.float32), 0.08) == (0, 30, 0, 40)
    out = preprocess(np.zeros((30, 40), np.float32))
    _check_output(out, 112)
    assert out.max() == 0.0


def test_bbox_ignores_corner_label():
    label = np.zeros((400, 400), np.uint8)
    cv2.putText(label, "L 12", (5, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    img = np.maximum(_phantom(400, (220, 200), 100), label / 255.0).astype(np.float32)
    assert img[:30, :80].max() == 1.0
    y0, y1, x0, x1 = head_bbox(img, 0.08)
    # disk: centre (220, 200), radius 100 (the blur widens it by a few pixels)
    assert abs(y0 - 120) <= 8 and abs(y1 - 320) <= 8
    assert abs(x0 - 100) <= 8 and abs(x1 - 300) <= 8


def test_bbox_grey_noisy_background():
    rng = np.random.default_rng(0)
    img = _phantom(300, (150, 135), 75, background=0.15) + rng.normal(0, 0.03, (300, 300))
    y0, y1, x0, x1 = head_bbox(np.clip(img, 0, 1).astype(np.float32), 0.08)
    assert abs(y0 - 75) <= 8 and abs(y1 - 225) <= 8
    assert abs(x0 - 60) <= 8 and abs(x1 - 210) <= 8


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 3), np.float32),
        np.zeros(10, np.float32),
        np.full((10, 10), 1.5, np.float32),
        np.full((10, 10), -0.1, np.float32),
        np.zeros((10, 10), np.uint8),
        np.full((10, 10), np.nan, np.float32),
    ],
)
def test_bad_input(bad):
    with pytest.raises(ValueError):
        preprocess(bad)


def test_load_and_preprocess(tmp_path):
    path = tmp_path / "scan.png"
    cv2.imwrite(str(path), (_phantom(256, (100, 128), 70) * 255).astype(np.uint8))
    out = load_and_preprocess(path, PreprocessConfig(size=96))
    _check_output(out, 96)
    ref = preprocess(_phantom(256, (100, 128), 70), PreprocessConfig(size=96))
    np.testing.assert_allclose(out, ref, atol=0.02)


# --- real data (skipped where /work/shared/data is absent) --------------------------------


def _real_paths(per_class: int) -> list[tuple[str, Path]]:
    if not (BR35H / "split.csv").is_file():
        pytest.skip(f"Br35H data not found at {BR35H}")
    with open(BR35H / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = []
    for label in ("yes", "no"):
        rows_of = [r for r in rows if r["label"] == label]
        step = max(1, len(rows_of) // per_class)  # spread over the list, not just the first files
        picked += [(label, BR35H / r["path"]) for r in rows_of[::step][:per_class]]
    return picked


def test_real_scans_preprocess():
    for label, path in _real_paths(20):
        out = load_and_preprocess(path)
        _check_output(out, 112)
        frac = head_mask(out, 0.08).mean()
        assert 0.3 < frac < 0.95, f"{label} {path.name}: head fills {frac:.2f} of the frame"


def test_runtime_does_not_import_torch():
    code = "import sys, runtime.imageio, runtime.preprocess, runtime.schedule, runtime.cli; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_percentile_is_numpys_bit_for_bit():
    from runtime.preprocess import percentile

    rng = np.random.default_rng(0)
    for n in [*range(1, 40), 999, 12544, 83000]:
        for q in (0, 1, 37.3, 50, 99, 99.5, 100):
            for a in (rng.random(n).astype(np.float32), np.round(rng.random(n) * 4).astype(np.float32) / 4,
                      (rng.random(n) * 1e-3).astype(np.float32), rng.standard_normal(n)):
                assert percentile(a, q) == float(np.percentile(a, q)), (n, q, a.dtype)
    img = rng.random((50, 70)).astype(np.float32)  # any shape: the flat array's percentile
    assert percentile(img, 99) == float(np.percentile(img, 99))
    with pytest.raises(ValueError, match="empty"):
        percentile(np.zeros(0, np.float32), 99)
