"""The README's scanner-side quick start, run as written (on the tiny demo's bundle and files)."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

from tests.envs import clean_env

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ["python3 -m venv scanner-venv", "scanner-venv/bin/pip install ."]


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Scanner side: the slim install", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_two_commands_come_first():
    text = (ROOT / "README.md").read_text()
    first = text.split("```", 2)[1]
    assert "make demo" in first and "make test" in first
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["## What you just saw", "## Scanner side: the slim install", "## Training on your own data"]


@pytest.mark.slow
def test_scanner_quick_start_runs_as_written(slim_env, tiny_demo, tmp_path):
    lines = quick_start()
    # the install lines are exactly what the slim_env fixture ran (python3 -m venv, pip install . at the root)
    assert lines[:2] == INSTALL
    home = os.environ["MEDFEDPURE_HOME"]
    env = clean_env()
    for line in lines[2:]:
        cmd = (line.replace("scanner-venv/", f"{slim_env}/").replace("runs/demo/", f"{tiny_demo}/")
               .replace("~/.config/medfedpure", home))
        res = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, f"{line}\n{res.stderr[-2000:]}"
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    files = sorted(f.name for f in (tiny_demo / "heldout-scans").iterdir())
    assert sorted(Path(r["file"]).name for r in rows) == files
    assert all(r["prediction"] in ("no", "yes") or r["refused"] in ("True", "true", "1") for r in rows)
