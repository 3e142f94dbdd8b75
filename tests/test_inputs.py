"""runtime.inputs: every input named on a command line, directly or through a folder, gets exactly one entry."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.imageio import read_image
from runtime.inputs import NOT_AN_IMAGE, Input, collect, is_dicom_file
from tests.test_imageio import _dicom, _gradient


def _by_path(entries: list[Input]) -> dict[Path, str | None]:
    paths = [e.path for e in entries]
    assert len(paths) == len(set(paths)), f"an input listed twice: {paths}"
    return {e.path: e.reason for e in entries}


@pytest.fixture
def export(tmp_path) -> Path:
    """A PACS-style export: extensionless DICOM files beside things that are not scans."""
    root = tmp_path / "export"
    (root / "series1").mkdir(parents=True)
    _dicom(root / "IM0001", _gradient(maxval=100))
    _dicom(root / "series1" / "1.2.840.113619.2.55.3", _gradient(maxval=50))
    cv2.imwrite(str(root / "series1" / "scan.png"), _gradient())
    (root / "README.txt").write_text("exported by the scanner\n")
    (root / "DICOMDIR-notes").write_bytes(b"x" * 200)  # no suffix, no preamble
    (root / ".DS_Store").write_bytes(b"\0" * 200)  # hidden: skipped silently
    (root / "broken").symlink_to(root / "gone.dcm")
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _dicom(elsewhere / "IM0009", _gradient(maxval=10))
    (root / "linked_series").symlink_to(elsewhere, target_is_directory=True)
    (root / "series1" / "latest").symlink_to(root / "IM0001")  # same file as IM0001
    (root / "outside").symlink_to(elsewhere / "IM0009")
    return root


def test_folder_every_member_one_entry(export):
    entries = collect([str(export)])
    got = _by_path(entries)
    assert [e.path for e in entries] == sorted(got)  # deterministic, sorted
    assert got == {
        export / "DICOMDIR-notes": NOT_AN_IMAGE,
        export / "IM0001": None,
        export / "README.txt": NOT_AN_IMAGE,
        export / "broken": "broken symlink",
        export / "linked_series": "symlinked folder not followed",
        export / "loop_a": "symlink loop",
        export / "loop_b": "symlink loop",
        export / "outside": None,  # a symlink to a file is read like the file
        export / "series1" / "1.2.840.113619.2.55.3": None,
        export / "series1" / "scan.png": None,
        # series1/latest resolves to IM0001, already listed
    }
    np.testing.assert_allclose(read_image(export / "IM0001"), _gradient(maxval=100) / 100.0, atol=1e-6)
    np.testing.assert_allclose(read_image(export / "series1" / "1.2.840.113619.2.55.3"),
                               _gradient(maxval=50) / 50.0, atol=1e-6)
    np.testing.assert_allclose(read_image(export / "outside"), _gradient(maxval=10) / 10.0, atol=1e-6)


def test_unreadable_subfolder_gets_an_entry(export, monkeypatch):
    locked = export / "series1"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    got = _by_path(collect([str(export)]))
    assert got[locked] == "cannot read folder (Permission denied)"
    assert not any(locked in p.parents for p in got)
    assert got[export / "IM0001"] is None


def test_named_file_read_whatever_its_suffix(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    scan = tmp_path / "IM0002"
    _dicom(scan, _gradient())
    assert collect([str(notes), str(scan)]) == [Input(notes), Input(scan)]


def test_missing_empty_and_hidden_only(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden_only").mkdir()
    (tmp_path / "hidden_only" / ".thumbs").write_bytes(b"x")
    (tmp_path / "nested_empty" / "a" / "b").mkdir(parents=True)
    names = ["missing.png", "empty", "hidden_only", "nested_empty"]
    assert collect([str(tmp_path / n) for n in names]) == [
        Input(tmp_path / "missing.png", "no such file or folder"),
        Input(tmp_path / "empty", "folder holds no files"),
        Input(tmp_path / "hidden_only", "folder holds no files"),
        Input(tmp_path / "nested_empty", "folder holds no files"),
    ]


def test_named_symlink_problems(tmp_path):
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert collect([str(tmp_path / "broken.png"), str(tmp_path / "a")]) == [
        Input(tmp_path / "broken.png", "broken symlink"),
        Input(tmp_path / "a", "symlink loop"),
    ]


def test_globs(tmp_path):
    (tmp_path / "s" / "deep").mkdir(parents=True)
    for name in ["b.png", "a.png", "s/c.png", "s/deep/d.png"]:
        cv2.imwrite(str(tmp_path / name), _gradient())
    (tmp_path / "s" / "notes.txt").write_text("x")
    pattern = str(tmp_path / "*.png")
    assert collect([pattern]) == [Input(tmp_path / "a.png"), Input(tmp_path / "b.png")]
    recursive = collect([str(tmp_path / "**" / "*.png")])
    assert [e.path for e in recursive] == sorted(tmp_path / n for n in ["a.png", "b.png", "s/c.png", "s/deep/d.png"])
    assert all(e.reason is None for e in recursive)
    folders = _by_path(collect([str(tmp_path / "s*")]))  # a matched folder is searched like a named one
    assert folders == {tmp_path / "s/c.png": None, tmp_path / "s/deep/d.png": None,
                       tmp_path / "s/notes.txt": NOT_AN_IMAGE}
    nothing = str(tmp_path / "*.dcm")
    assert collect([nothing]) == [Input(Path(nothing), "pattern matches no files")]


def test_duplicates_keep_the_first(tmp_path):
    (tmp_path / "f").mkdir()
    scan = tmp_path / "f" / "a.png"
    cv2.imwrite(str(scan), _gradient())
    (tmp_path / "f" / "b.png").symlink_to(scan)
    other = tmp_path / "f" / "c.png"
    cv2.imwrite(str(other), _gradient())
    spelled = str(tmp_path / "f" / ".." / "f" / "a.png")
    entries = collect([spelled, str(tmp_path / "f"), str(scan), str(tmp_path / "f" / "*.png"), "missing", "missing"])
    assert entries == [Input(Path(spelled)), Input(other), Input(Path("missing"), "no such file or folder")]


def test_is_dicom_file(tmp_path):
    dcm = _dicom(tmp_path / "IM0001", _gradient())
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), _gradient())
    short = tmp_path / "short"
    short.write_bytes(b"DICM")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # must not block
    assert is_dicom_file(dcm) and is_dicom_file(str(dcm))
    assert not any(is_dicom_file(p) for p in [png, short, fifo, tmp_path, tmp_path / "missing"])
