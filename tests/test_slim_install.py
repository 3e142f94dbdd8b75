"""The scanner-side install: ``pip install .`` into a clean venv gives a working ``runtime`` without PyTorch.

It installs the project (its base dependencies only) into a fresh virtual
environment, checks that torch is absent and the environment stays under
600 MB, and runs ``runtime info`` and ``runtime infer`` there on a bundle the
tests exported (PNG and DICOM inputs).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.envs import clean_env

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 600


def _du_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 2**20


@pytest.mark.slow
def test_slim_install_has_no_torch_and_fits(slim_env):
    py = slim_env / "bin" / "python"
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None)"
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True,
                         env=clean_env()).stdout.split()
    assert out == ["True", "True"], "the slim install must have onnxruntime and no torch"
    size = _du_mb(slim_env)
    print(f"slim venv: {size:.0f} MB")
    assert size < LIMIT_MB, f"the slim install takes {size:.0f} MB (limit {LIMIT_MB} MB)"


@pytest.mark.slow
def test_slim_runtime_info_and_infer(slim_env, tiny_bundle, tmp_path):
    from runtime import signing
    from tests.test_imageio import _dicom
    from training.data.phantom import SCANNER_PROFILES, image_rng, make_phantom

    pub = signing.default_signing_key().with_suffix(".pub")
    runtime = slim_env / "bin" / "runtime"
    env = clean_env()
    env["PATH"] = f"{slim_env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    info = subprocess.run([str(runtime), "info", "--bundle", str(tiny_bundle), "--trusted-key", str(pub)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "verified" in info.stdout

    import cv2

    scans = tmp_path / "scans"
    scans.mkdir()
    img = make_phantom(image_rng(3, 0), 64, True, SCANNER_PROFILES["A"])
    cv2.imwrite(str(scans / "a.png"), np.round(img * 65535).astype(np.uint16))
    _dicom(scans / "IM0001", np.round(img * 4095).astype(np.uint16))
    out = tmp_path / "r.jsonl"
    res = subprocess.run([str(runtime), "infer", str(scans), "--bundle", str(tiny_bundle), "--trusted-key", str(pub),
                          "--threads", "1", "--out", str(out), "--quiet"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in recs) == ["IM0001", "a.png"]
    for r in recs:
        assert r["error"] is None
        assert r["refused"] or r["prediction"] in ("no", "yes")
        assert r["bundle_signature"].startswith("verified:")
