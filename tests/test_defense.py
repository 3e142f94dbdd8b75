"""The PyTorch defense: no label reaches it, tau from clean scans, only flagged scans are purified."""

import inspect

import numpy as np
import torch

from training import config as C
from training.defense import DefensePipeline, calibrate_tau, run_batched, t_star_of
from training.diffusion import GaussianDiffusion
from training.models import create_model


def _pipe(tau):
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    parts = [create_model(c, p).eval() for c in ("classifier", "detector", "denoiser")]
    return DefensePipeline(*parts, GaussianDiffusion.from_config(p.denoiser), tau, p.defense).eval(), parts


def test_no_label_can_reach_the_defense():
    for fn in (DefensePipeline.forward, DefensePipeline.run, run_batched, DefensePipeline.purify_flagged):
        names = set(inspect.signature(fn).parameters)
        assert not names & {"y", "label", "labels", "target", "targets"}, fn


def test_calibrate_tau_flag_rate():
    s = np.random.default_rng(0).normal(size=10000)
    tau = calibrate_tau(s, 0.05)
    assert abs((s > tau).mean() - 0.05) < 0.002


def test_t_star_grows_with_score_within_bounds():
    cfg = C.DefenseConfig(t_min=50, t_max=120, ref_ratio=2.0, quantum=10)
    s = torch.linspace(1.0, 3.0, 50)
    t = t_star_of(s, 1.0, cfg)
    assert t.min() == 50 and t.max() == 120
    assert bool((t[1:] >= t[:-1]).all()) and bool((t % 10 == 0).all())


def test_only_flagged_scans_are_purified():
    x = torch.rand(6, 1, 32, 32)
    pipe, (classifier, detector, _) = _pipe(tau=0.0)
    with torch.no_grad():
        scores = pipe.score(x)
    pipe.tau = float(scores.median())
    out = pipe.run(x, torch.Generator().manual_seed(0))
    flagged = out["flagged"]
    assert 0 < int(flagged.sum()) < 6
    with torch.no_grad():
        direct = classifier(x).softmax(1)
    assert torch.allclose(out["probs"][~flagged], direct[~flagged], atol=1e-6)
    assert not torch.allclose(out["probs"][flagged], direct[flagged], atol=1e-6)
    assert bool((out["t_star"][~flagged] == 0).all()) and bool((out["t_star"][flagged] >= 50).all())
    # the purification noise comes from the generator: same seed, same result
    again = pipe.run(x, torch.Generator().manual_seed(0))
    assert torch.equal(out["probs"], again["probs"])


def test_kappa_rule_flags_the_top_fraction_of_a_batch():
    from training.defense import kappa_flags

    s = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert kappa_flags(s, 0.5).tolist() == [False, True, True, False]
    assert not kappa_flags(s, 0.0).any() and kappa_flags(s, 1.0).all()
    # batch-dependent: the same scan is flagged or not depending on its neighbours
    assert kappa_flags(torch.tensor([0.5, 0.1]), 0.5)[0] and not kappa_flags(torch.tensor([0.5, 0.9]), 0.5)[0]
