"""Scan files for the runtime tests: the tiny run's own training phantoms, written as a scanner would."""

from pathlib import Path

import cv2
import numpy as np


def training_scan_files(d: Path, n: int, size: int = 32, source_n: int = 80) -> Path:
    """The first ``n`` training phantoms of ``synth:source_n`` (the tiny run's data) as 16-bit PNGs in
    ``d/no`` and ``d/yes``: in distribution for the tiny bundle by construction (its out-of-distribution
    statistics were fitted on exactly these scans), so tests about other things are not refused."""
    from training.config import PreprocessConfig
    from training.data.datasets import load_synthetic, synthetic_originals

    data = load_synthetic(source_n, PreprocessConfig(size=size), seed=0)
    train = data["train"]
    images, labels = synthetic_originals(source_n, size, train.groups[:n], seed=0)
    for name in ("no", "yes"):
        (d / name).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        cv2.imwrite(str(d / ("yes" if y else "no") / f"scan_{i:03d}.png"), np.round(img * 65535).astype(np.uint16))
    return d
