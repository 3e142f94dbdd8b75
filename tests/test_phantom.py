"""The synthetic phantom data set: determinism, ranges, classes, profiles, files."""

from __future__ import annotations

import csv
from dataclasses import replace

import cv2
import numpy as np
import pytest

from training.data.phantom import (
    SCANNER_PROFILES,
    ScannerProfile,
    generate,
    image_rng,
    make_labels,
    make_phantom,
    profile_seed,
    write_dataset,
)


def test_same_seed_same_images_other_seed_other_images():
    x1, y1 = generate(6, size=48, seed=3)
    x2, y2 = generate(6, size=48, seed=3)
    x3, _ = generate(6, size=48, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(x1, x3)


def test_image_does_not_depend_on_n():
    xa, ya = generate(5, size=40, seed=7)
    xb, yb = generate(9, size=40, seed=7)
    for i in range(5):
        ref = make_phantom(image_rng(7, i), 40, bool(ya[i]), SCANNER_PROFILES["default"])
        np.testing.assert_array_equal(xa[i], ref)
        if ya[i] == yb[i]:
            np.testing.assert_array_equal(xa[i], xb[i])


def test_shapes_dtypes_and_range():
    x, y = generate(8, size=56, seed=1, profile="B")
    assert x.shape == (8, 56, 56) and x.dtype == np.float32
    assert y.shape == (8,) and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.isfinite(x).all()
    # black background, bright head
    assert x[:, :3, :3].mean() < 0.1 and x[:, 20:36, 20:36].mean() > 0.2


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.5), (11, 0.5), (7, 0.3), (5, 0.0), (4, 1.0)])
def test_label_counts(n, fraction):
    y = make_labels(n, seed=2, tumor_fraction=fraction)
    assert y.sum() == round(n * fraction)
    assert set(np.unique(y)) <= {0, 1}


def test_labels_are_shuffled():
    y = make_labels(200, seed=0)
    assert 0 < y[:100].sum() < 100


def test_tumor_changes_only_a_local_region():
    """Same generator state: the tumor image is the healthy one plus a lesion."""
    prof = SCANNER_PROFILES["default"]
    for i in range(10):
        healthy = make_phantom(image_rng(0, i), 64, False, prof)
        tumor = make_phantom(image_rng(0, i), 64, True, prof)
        changed = np.abs(tumor - healthy) > 1e-3
        assert changed.any()
        assert changed.mean() < 0.25  # a lesion (with edema), not the whole slice
        assert not changed[:4].any() and not changed[:, :4].any()  # never the background


def test_mean_intensity_alone_does_not_classify():
    """Only the lesion separates the classes: a global statistic is near chance."""
    x, y = generate(400, size=64, seed=11)
    for stat in (x.mean(axis=(1, 2)), x.std(axis=(1, 2))):
        best = max(max(((stat > t) == y).mean(), ((stat <= t) == y).mean()) for t in stat)
        assert best < 0.7, best


def _laplacian_energy(x: np.ndarray) -> float:
    """Mean absolute Laplacian of images [N, H, W] (high-frequency content)."""
    return float(np.mean([np.abs(cv2.Laplacian(im, cv2.CV_32F)).mean() for im in x]))


def test_profiles_have_different_statistics():
    stats = {}
    for name in ("A", "B", "C", "D"):
        x, _ = generate(24, size=64, seed=5, profile=name)
        stats[name] = {
            "background": float(x[:, :6, :6].std()),  # noise floor
            "mean": float(x.mean()),  # contrast (gamma)
            "sharpness": _laplacian_energy(x),
        }
    assert stats["B"]["background"] > 1.3 * stats["A"]["background"]  # noisier
    assert stats["D"]["mean"] < 0.8 * stats["A"]["mean"]  # darker gamma
    sharp_c, _ = generate(
        24, size=64, seed=5, profile=replace(SCANNER_PROFILES["C"], resolution=1.0)
    )
    assert stats["C"]["sharpness"] < 0.8 * _laplacian_energy(sharp_c)  # blurred
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            va, vb = np.array(list(stats[a].values())), np.array(list(stats[b].values()))
            assert np.abs(va - vb).max() > 0.005, (a, b)


def test_profiles_by_name_or_object_and_validation():
    x1, _ = generate(2, size=32, profile="C")
    x2, _ = generate(2, size=32, profile=SCANNER_PROFILES["C"])
    np.testing.assert_array_equal(x1, x2)
    assert len({k for k in SCANNER_PROFILES if k != "default"}) >= 4
    with pytest.raises(ValueError):
        generate(2, size=32, profile="no-such-scanner")
    with pytest.raises(ValueError):
        ScannerProfile("bad", resolution=0.0)


def test_write_dataset_layout_and_csv(tmp_path):
    counts = write_dataset(tmp_path, n=10, size=32, seed=1, profiles=("A", "B"), progress=False)
    assert counts["total"] == 10 and counts["no"] + counts["yes"] == 10
    assert counts["per_profile"] == {"A": 5, "B": 5}
    with open(tmp_path / "phantoms.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "profile", "seed"]
    assert len(rows) == 10
    for row in rows:
        path = tmp_path / row["path"]
        label = int(row["label"])
        assert path.parent.name == ("no", "yes")[label]
        assert path.name.startswith(row["profile"] + "_") and path.suffix == ".png"
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert img.shape == (32, 32) and img.dtype == np.uint8
    # a file is the phantom of its seed and index, rounded to 8 bit
    row = rows[3]
    index = int(row["path"].split("_")[-1].split(".")[0])
    assert int(row["seed"]) == profile_seed(1, ("A", "B").index(row["profile"]))
    ref = make_phantom(
        image_rng(int(row["seed"]), index),
        32,
        bool(int(row["label"])),
        SCANNER_PROFILES[row["profile"]],
    )
    img = cv2.imread(str(tmp_path / row["path"]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(img, np.round(ref * 255).astype(np.uint8))
    names = sorted(p.name for d in ("no", "yes") for p in (tmp_path / d).iterdir())
    assert names == sorted(f"{p}_{i:06d}.png" for p in ("A", "B") for i in range(5))
