"""Robustness evaluation: the adaptive attack respects its budget and differentiates the pipeline; reports are complete."""

import json
import shutil

import pytest
import torch

from training import config as C
from training.attacks.adaptive import AdaptiveConfig, adaptive_pgd, surrogate_loss
from training.defense import DefensePipeline
from training.diffusion import GaussianDiffusion
from training.models import create_model


def _pipe():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    parts = [create_model(c, p).eval() for c in ("classifier", "detector", "denoiser")]
    pipe = DefensePipeline(*parts, GaussianDiffusion.from_config(p.denoiser), 1.0, p.defense).eval()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        pipe.tau = float(pipe.score(x).median())
    return pipe, x, torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("gradient", ["exact", "bpda"])
def test_adaptive_attack_budget_and_gradient(gradient):
    pipe, x, y = _pipe()
    cfg = AdaptiveConfig(attack=C.AttackConfig(steps=2), eot=2, gradient=gradient, attack_purify_steps=1)
    xr = x.clone().requires_grad_(True)
    loss = surrogate_loss(pipe, xr, y, cfg, torch.Generator().manual_seed(0)).sum()
    (g,) = torch.autograd.grad(loss, xr)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    adv = adaptive_pgd(pipe, x, y, cfg, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= cfg.attack.eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_exact_gradient_reaches_the_denoiser():
    pipe, x, y = _pipe()
    cfg = AdaptiveConfig(eot=1, gradient="exact", attack_purify_steps=1, temperature=1e3)  # p ~ 0.5 for every scan
    pipe.denoiser.zero_grad()
    surrogate_loss(pipe, x.clone().requires_grad_(True), y, cfg, torch.Generator().manual_seed(0)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.denoiser.parameters())


@pytest.mark.slow
def test_evaluate_and_sweep_write_complete_reports(tiny_run, tmp_path):
    from training.evaluate import evaluate_run, sweep_run

    run = tmp_path / "run"  # a copy: the reports are written into the run
    shutil.copytree(tiny_run, run)
    rep = evaluate_run(run, ("paper", "adaptive", "transfer"), max_scans=8, adaptive_max=4,
                       adaptive=AdaptiveConfig(attack=C.AttackConfig(steps=2), eot=1), log=lambda *_: None)
    saved = json.loads((run / "reports" / "robustness.json").read_text())
    assert saved["mean"] == json.loads(json.dumps(rep["mean"]))
    for k in ("clean", "pgd_linf", "pgd_l2", "adaptive"):
        assert 0.0 <= rep["mean"][k]["acc"] <= 1.0 and 0.0 <= rep["mean"][k]["flag_rate"] <= 1.0
    assert rep["mean"]["adaptive"]["n"] == 4 and rep["mean"]["clean"]["n"] == 8
    assert "detection_auc" in rep["mean"]["pgd_linf"]
    assert rep["attacks"]["pgd_linf"]["eps"] == 0.015 and rep["attacks"]["pgd_l2"]["eps"] == 0.1
    md = (run / "reports" / "robustness.md").read_text()
    assert "PGD L-inf eps 0.015" in md and (run / "reports" / "roc.png").exists()
    sw = sweep_run(run, flag_rates=(0.05, 0.2), steps=(1, 0), max_scans=4, log=lambda *_: None)
    assert len(sw["rows"]) == 4
    full = [r for r in sw["rows"] if r["steps"] == "full"]
    one = [r for r in sw["rows"] if r["steps"] == 1]
    # full DDPM spends t* >= t_min evaluations per flagged scan, one step spends one
    for a, b in zip(one, full):
        assert b["evals_per_attacked_scan"] >= a["evals_per_attacked_scan"]
    assert (run / "reports" / "sweep.png").exists()
    # the same models under other defense settings, reported apart
    over = {"score": "mae", "t_min": 100, "t_max": 200, "steps": 1}
    rep2 = evaluate_run(run, ("paper",), max_scans=8, defense=over, tag="mae", log=lambda *_: None)
    assert rep2["defense"]["score"] == "mae" and rep2["defense"]["t_min"] == 100 and rep2["defense_overrides"] == over
    assert (run / "reports" / "robustness-mae.md").exists() and (run / "reports" / "roc-mae.png").exists()
    assert json.loads((run / "reports" / "robustness.json").read_text())["defense"]["score"] == "floor"


def test_defense_overrides_are_typed_and_validated():
    assert C.defense_overrides(["t_min=150,t_max=250", "steps=1", "score=mae", "flag_rate=0.1"]) == {
        "t_min": 150, "t_max": 250, "steps": 1, "score": "mae", "flag_rate": 0.1}
    assert C.defense_overrides(None) == {}
    for bad, msg in ((["tmin=3"], "KEY=VALUE"), (["t_min"], "KEY=VALUE"), (["t_min=abc"], "needs a int"),
                     (["score=psnr"], "defense score"), (["t_min=300,t_max=200"], "t_min <= t_max")):
        with pytest.raises(ValueError, match=msg):
            C.defense_overrides(bad)
    p = C.with_defense(C.get_profile("tiny"), {"t_max": 199})
    assert p.defense.t_max == 199 and p.classifier == C.get_profile("tiny").classifier


def test_textured_attack_leaves_flat_regions_and_the_noise_floor_alone():
    from tests.test_defense import _scans_with_flat_regions
    from training.attacks.adaptive import textured_support
    from training.defense import noise_floor

    pipe, _, _ = _pipe()
    x = _scans_with_flat_regions(4, size=32)
    y = torch.tensor([0, 1, 0, 1])
    support = textured_support(x, 0.2)
    # at least the flattest 20 % is left alone (ties included), and the textured rest is attacked
    assert 0.1 < float(support.mean()) <= 0.8
    cfg = AdaptiveConfig(attack=C.AttackConfig(steps=3), eot=1, attack_purify_steps=1, support="textured")
    adv = adaptive_pgd(pipe, x, y, cfg, torch.Generator().manual_seed(0))
    assert float(((adv - x).abs() * (1 - support)).max()) == 0.0
    assert float((adv - x).abs().max()) > 0.0
    assert torch.allclose(noise_floor(adv), noise_floor(x), atol=1e-6)
    full = adaptive_pgd(pipe, x, y, AdaptiveConfig(attack=C.AttackConfig(steps=3), eot=1, attack_purify_steps=1),
                        torch.Generator().manual_seed(0))
    assert bool((noise_floor(full) > noise_floor(x) + 1e-3).all())
