"""Checkpoints that carry what is needed to trust and resume them.

Each holds the model state, the resolved configuration, the data split
digest, metrics, the code revision, and (for resuming) the optimiser state,
the epoch and the random generator state.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from training import __version__
from training.config import UsageError


def code_revision() -> str:
    """``git`` revision of the code (``+dirty`` with local changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            raise OSError(rev.stderr)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return f"medfedpure-{__version__}"


def save_checkpoint(path: str | Path, **payload) -> None:
    """Write atomically (a killed run never leaves a half-written checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload.setdefault("code_revision", code_revision())
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise UsageError(f"{path}: not a readable checkpoint ({err})") from err
