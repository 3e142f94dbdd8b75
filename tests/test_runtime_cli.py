"""``runtime preprocess``: writes what the models see; bad files stop it with a clear error or are listed."""

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from runtime.cli import main


def _scan(path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = np.zeros((200, 160), np.uint8)
    cv2.ellipse(img, (80, 100), (60, 80), 0, 0, 360, 180, -1)
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), img)
    return path


def test_preprocess_folder(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _scan(src / "a.png")
    _scan(src / "b.jpg")
    assert main(["preprocess", str(src), "--out", str(tmp_path / "out"), "--size", "64", "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    img = cv2.imread(str(tmp_path / "out" / rows[0]["output"]), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (64, 64)
    assert (rows[0]["height"], rows[0]["width"]) == ("200", "160")


def test_bad_file_is_an_error_or_listed(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _scan(src / "a.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["preprocess", str(src), "--out", str(tmp_path / "o1")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["preprocess", str(src), "--out", str(tmp_path / "o2"), "--skip-bad", "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o2" / "index.csv")))
    assert [r["status"][:7] for r in rows] == ["ok", "skipped"]
    assert main(["preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "o3")]) == 2


def test_console_script_runs_without_torch(tmp_path):
    src = _scan(tmp_path / "a.png")
    code = ("import sys; from runtime.cli import main; rc = main(sys.argv[1:]); "
            "sys.exit(rc or ('torch' in sys.modules) * 3)")
    r = subprocess.run([sys.executable, "-c", code, "preprocess", str(src), "--out", str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
