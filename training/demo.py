"""``make demo``: the main job end to end on the embedded default (synthetic phantoms, CPU, no download)."""

from __future__ import annotations

import time
from pathlib import Path

from training import config as cfgmod
from training.data.datasets import load_dataset
from training.report import write_report
from training.train import train_component


def run_demo(out: str | Path, profile: str = "tiny", n: int = 600) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prof = cfgmod.get_profile(profile)
    if profile == "tiny":  # a few more epochs than the unit-test default, still about a minute
        prof = cfgmod.resolve(prof, {c: {"optim": {"epochs": 6}} for c in cfgmod.COMPONENTS})
    source = f"synth:{n}"
    t0 = time.perf_counter()
    data = load_dataset(source, prof.preprocess, seed=prof.seed)
    print(data.summary())
    (out / "config.toml").write_text(cfgmod.dump_toml(prof))
    (out / "data.txt").write_text(f"source = {source}\nsplit_digest = {data.digest}\n")
    for comp in cfgmod.COMPONENTS:
        train_component(comp, prof, data, out, resume=False)
    md = write_report(out, source, quick=True)
    print(f"\nreport: {md}  ({time.perf_counter() - t0:.0f} s in all)\n")
    print(md.read_text())
    return 0
