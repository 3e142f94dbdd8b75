"""The defense's decision code, written once per side (torch, numpy), against hand-computed values and each other."""

import dataclasses

import numpy as np
import pytest
import torch

from runtime.pipeline import Pipeline, PurifyConfig
from runtime.pipeline import t_star_of as np_t_star_of
from training.config import DefenseConfig
from training.defense import DefensePipeline, ScanSeedNoise
from training.diffusion import GaussianDiffusion

# tau 1, t* from 100 at s = tau to 300 at s = 3 tau, multiples of 20
CFG = DefenseConfig(t_min=100, t_max=300, ref_ratio=3.0, quantum=20, steps=2)
SCORES = np.array([0.5, 1.0, 1.6, 2.2, 5.0], np.float32)
FLAGS = [False, False, True, True, True]  # s > tau, strictly
# s = 1.6: 100 + 0.3 * 200 = 160; s = 2.2: 100 + 0.6 * 200 = 220; s = 5: clipped at 300
T_STAR = [0, 0, 160, 220, 300]


def test_torch_side_decides_as_computed_by_hand():
    pipe = DefensePipeline(torch.nn.Identity(), None, torch.nn.Identity(), GaussianDiffusion(), 1.0, CFG)
    flagged, t_star = pipe.decide(torch.from_numpy(SCORES))
    assert flagged.tolist() == FLAGS and t_star.tolist() == T_STAR


def test_numpy_side_decides_as_computed_by_hand():
    cfg = PurifyConfig(tau=1.0, t_min=100, t_max=300, ref_ratio=3.0, quantum=20, steps=2, num_steps=1000,
                       beta_start=1e-4, beta_end=2e-2)
    flagged = SCORES > cfg.tau
    t_star = np.where(flagged, np_t_star_of(SCORES, cfg), 0)
    assert flagged.tolist() == FLAGS and t_star.tolist() == T_STAR


def test_both_sides_purify_alike_with_the_same_noise(tiny_run, tiny_bundle):
    """Every scan flagged (tau 0): the PyTorch pipeline with the runtime's per-scan noise gives its probabilities."""
    from runtime.bundle import Bundle
    from runtime.engines import OrtEngine
    from training.evaluate import load_sites

    bundle = Bundle.load(tiny_bundle)
    _, sites, _ = load_sites(tiny_run)
    s = sites[0]
    pt = DefensePipeline(s.pipe.classifier, s.pipe.detector, s.pipe.denoiser, s.pipe.diffusion, 0.0, s.pipe.cfg).eval()
    rt = Pipeline(OrtEngine(bundle), dataclasses.replace(PurifyConfig.from_manifest(bundle.manifest), tau=0.0))
    x = s.data["test"].images[:6][:, None].astype(np.float32)
    seeds = np.arange(100, 106)
    a = rt.run(x, seed=seeds)
    with torch.no_grad():
        b = pt.run(torch.from_numpy(x), ScanSeedNoise(seeds))
    assert a["flagged"].all() and b["flagged"].all()
    assert a["t_star"].tolist() == b["t_star"].tolist()
    np.testing.assert_allclose(a["probs"], b["probs"].numpy(), atol=1e-4)
    # another noise draw moves them: the agreement above is the noise's, not a constant output
    c = rt.run(x, seed=seeds + 1000)
    assert np.abs(c["probs"] - a["probs"]).max() > 1e-6


@pytest.mark.parametrize("t", [1, 150, 999])
def test_q_sample_is_the_same_on_both_sides(t):
    from runtime import schedule
    from training.diffusion import to_diffusion_space

    d = GaussianDiffusion()
    rng = np.random.default_rng(t)
    x = rng.random((2, 1, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    a = schedule.q_sample(x, t, noise, schedule.alpha_bar_by_step())
    b = d.q_sample(to_diffusion_space(torch.from_numpy(x)), torch.full((2,), t), torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(a, b, atol=1e-5)
