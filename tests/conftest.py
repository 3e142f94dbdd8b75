"""Shared fixtures: a tiny trained run (all three components, one epoch) and its exported bundle."""

import os
import tempfile

import pytest

from tests.envs import clean_env
from training import config as C

# Keys (the export's signing key, the runtime's trusted keys) live in a home of the test session's own,
# never in the user's ~/.config/medfedpure.
os.environ["MEDFEDPURE_HOME"] = tempfile.mkdtemp(prefix="medfedpure-home-")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from training.data.datasets import load_dataset
    from training.runs import write_data_record
    from training.train import train_component

    p = C.get_profile("tiny")
    data = load_dataset("synth:80", p.preprocess)
    run = tmp_path_factory.mktemp("run")
    (run / "config.toml").write_text(C.dump_toml(p))
    write_data_record(run, "synth:80", data.digest)
    for comp in C.COMPONENTS:
        train_component(comp, p, data, run, epochs=1, progress=False, log=lambda *_: None)
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    from export.bundle import export_site
    from runtime import signing

    out = tmp_path_factory.mktemp("bundles") / "tiny-site-0"
    export_site(tiny_run, 0, out, log=lambda *_: None)
    trusted = signing.trusted_dir()  # this machine trusts its own export key, as a site trusts its federation's
    trusted.mkdir(parents=True, exist_ok=True)
    pub = signing.default_signing_key().with_suffix(".pub")
    (trusted / "export.pub").write_bytes(pub.read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """``make demo``'s whole job on the tiny profile: run, bundle, held-out files, records, bench, report.html."""
    from training.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    assert run_demo(out, profile="tiny", n=120, backend="inprocess") == 0
    return out


@pytest.fixture(scope="session")
def slim_env(tmp_path_factory):
    """A fresh virtual environment with ``pip install .`` (the runtime's own dependencies only), made with the
    README's two commands (``python3 -m venv DIR``, ``DIR/bin/pip install .``)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env_dir = tmp_path_factory.mktemp("slim") / "scanner-venv"
    env = clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300, env=env)
    res = subprocess.run([str(env_dir / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "."],
                         cwd=root, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, f"pip install . failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return env_dir
