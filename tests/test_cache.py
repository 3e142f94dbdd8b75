"""The on-disk cache of preprocessed scans: keyed by file content, private to the user, optional."""

import os
import stat

import cv2
import numpy as np
import pytest

from runtime.preprocess import PreprocessConfig
from training.data import datasets

CFG = PreprocessConfig(size=32)
NAMES = ("no", "yes")
PER_CLASS = 5
PNG_FLAT = [cv2.IMWRITE_PNG_COMPRESSION, 0]  # stored, not deflated: the file size depends on the shape only


def _scan(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((48, 48), np.uint8)
    cv2.ellipse(img, (24, 24), (16, 20), 0, 0, 360, int(rng.integers(120, 255)), -1)
    cv2.circle(img, (int(rng.integers(16, 32)), int(rng.integers(16, 32))), 5, 255, -1)
    return img


def _write_folder(root):
    files = []
    for c, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            path = root / name / f"scan_{i}.png"
            assert cv2.imwrite(str(path), _scan(10 * c + i), PNG_FLAT)
            files.append(path)
    return files


def _pixels(data) -> np.ndarray:
    return np.concatenate([data[s].images for s in datasets.SPLITS])


def _cache_files(cache):
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


@pytest.fixture
def folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDFEDPURE_CACHE", str(cache))
    monkeypatch.delenv("MEDFEDPURE_NO_CACHE", raising=False)
    root = tmp_path / "scans"
    return root, _write_folder(root), cache


def test_changed_content_is_a_miss(folder):
    root, files, cache = folder
    first = datasets.load_folder(root, CFG, progress=False)
    assert _pixels(first).max() > 0.5
    assert _cache_files(cache)
    for path in files:
        st = os.stat(path)
        assert cv2.imwrite(str(path), np.zeros((48, 48), np.uint8), PNG_FLAT)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    second = datasets.load_folder(root, CFG, progress=False)
    assert second.digest == first.digest  # same files, labels and split
    assert _pixels(second).shape == _pixels(first).shape
    assert _pixels(second).max() == 0.0


def test_cache_is_private(folder, tmp_path, monkeypatch):
    root, _, cache = folder
    datasets.load_folder(root, CFG, progress=False)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    files = _cache_files(cache)
    assert files
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # a folder left readable by an earlier version is tightened, its entries too
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    old = loose / "scans-0123456789abcdef01234567.npz"
    old.write_bytes(b"x")
    os.chmod(old, 0o644)
    monkeypatch.setenv("MEDFEDPURE_CACHE", str(loose))
    datasets.load_folder(root, CFG, progress=False)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
    for path in _cache_files(loose):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_unchanged_files_are_a_hit(folder, monkeypatch):
    root, files, cache = folder
    first = datasets.load_folder(root, CFG, progress=False)
    for path in files:  # same bytes written again: new mtime, same content
        path.write_bytes(path.read_bytes())

    def fail(*_args, **_kwargs):
        raise AssertionError("preprocessed again despite a cache entry")

    monkeypatch.setattr(datasets, "preprocess", fail)
    monkeypatch.setattr(datasets, "read_image", fail)
    second = datasets.load_folder(root, CFG, progress=False)
    np.testing.assert_array_equal(_pixels(second), _pixels(first))
    assert second.class_names == first.class_names


def test_other_settings_are_a_miss(folder):
    root, _, cache = folder
    datasets.load_folder(root, CFG, progress=False)
    datasets.load_folder(root, PreprocessConfig(size=24), progress=False)
    (root / "yes").rename(root / "zzz")  # same bytes, other class names
    datasets.load_folder(root, CFG, progress=False)
    assert len(_cache_files(cache)) == 3


def test_no_cache_writes_nothing(folder, monkeypatch):
    root, _, cache = folder
    datasets.load_folder(root, CFG, cache=False, progress=False)
    datasets.load_dataset(str(root), CFG, cache=False, progress=False)
    assert _cache_files(cache) == []
    monkeypatch.setenv("MEDFEDPURE_NO_CACHE", "1")
    datasets.load_dataset(str(root), CFG, progress=False)
    assert _cache_files(cache) == []


def test_no_cache_flag(monkeypatch, tmp_path):
    from training import cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_load(source, cfg, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.delenv("MEDFEDPURE_NO_CACHE", raising=False)
    args = cli.build_parser().parse_args(["train", "--out", str(tmp_path / "run"), "--data", "scans", "--no-cache"])
    with pytest.raises(Stop):
        args.func(args)
    assert seen["cache"] is False
    args = cli.build_parser().parse_args(["train", "--out", str(tmp_path / "run"), "--data", "scans"])
    with pytest.raises(Stop):
        args.func(args)
    assert seen["cache"] is True
    for argv in (["report", "--run", "r", "--no-cache"], ["evaluate", "--run", "r", "--no-cache"],
                 ["finetune", "--run", "r", "--out", "o", "--no-cache"]):
        assert cli.build_parser().parse_args(argv).no_cache
