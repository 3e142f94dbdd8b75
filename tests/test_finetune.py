"""Purification-consistent fine-tuning: purified scans reach the classifier, a complete new run is written."""

import json

import pytest
import torch

from training import config as C
from training.diffusion import GaussianDiffusion
from training.finetune import PurifiedAugmentObjective
from training.models import create_model


def test_purified_augment_replaces_the_chosen_fraction():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    den = create_model("denoiser", p).eval()
    seen = {}

    def base(model, x, y, g):
        seen["x"] = x
        return torch.zeros(()), {}

    obj = PurifiedAugmentObjective(base, den, GaussianDiffusion.from_config(p.denoiser), 0.5, 50, 60, 1)
    x = torch.rand(8, 1, 32, 32)
    obj(None, x, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    changed = (seen["x"] - x).flatten(1).abs().amax(1) > 0
    assert int(changed.sum()) == 4 and seen["x"].min() >= 0 and seen["x"].max() <= 1
    obj0 = PurifiedAugmentObjective(base, den, GaussianDiffusion.from_config(p.denoiser), 0.0, 50, 60, 1)
    obj0(None, x, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(seen["x"], x)


@pytest.mark.slow
def test_finetune_writes_an_evaluable_run(tiny_run, tmp_path):
    from training.cli import main
    from training.evaluate import load_sites

    out = tmp_path / "ft"
    rc = main(["finetune", "--run", str(tiny_run), "--out", str(out), "--epochs", "1",
               "--defense", "t_min=60,t_max=80,steps=1", "--quiet"])
    assert rc == 0
    for f in ("classifier/best.pt", "detector/best.pt", "denoiser/best.pt", "config.toml", "data.txt", "finetune.json"):
        assert (out / f).exists(), f
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["defense"]["t_min"] == 60 and meta["adv_fraction"] == 0.5
    profile, sites, info = load_sites(out)
    assert profile.defense.t_max == 80 and sites[0].pipe is not None
    # refuses to overwrite, and to fine-tune a run that is not there
    assert main(["finetune", "--run", str(tiny_run), "--out", str(out), "--quiet"]) == 2
    assert main(["finetune", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
