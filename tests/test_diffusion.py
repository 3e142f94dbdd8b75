"""Schedule closed forms against direct computation; purification is deterministic and differentiable."""

import numpy as np
import pytest
import torch

from runtime import schedule
from training.diffusion import GaussianDiffusion, purify
from training.models.unet import UNet


def test_alpha_bar_closed_form():
    betas = schedule.linear_betas(1000, 1e-4, 2e-2)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(2e-2)
    abar = schedule.alphas_cumprod(betas)
    direct = np.array([np.prod([1 - betas[s] for s in range(t + 1)]) for t in (0, 9, 499, 999)])
    np.testing.assert_allclose(abar[[0, 9, 499, 999]], direct, rtol=1e-10)


def test_q_sample_mean_and_variance():
    d = GaussianDiffusion()
    x0 = torch.full((20000, 1, 1, 1), 0.3)
    t = torch.full((20000,), 200)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    abar = float(np.prod(1 - schedule.linear_betas()[:200]))
    assert xt.mean().item() == pytest.approx(np.sqrt(abar) * 0.3, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


def test_respaced_timesteps():
    assert schedule.respaced_timesteps(5, None) == [5, 4, 3, 2, 1]
    ts = schedule.respaced_timesteps(100, 10)
    assert len(ts) == 10 and ts[0] == 100 and all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError):
        schedule.respaced_timesteps(0, 3)


@pytest.mark.parametrize("steps", [None, 4])
def test_purify_deterministic_and_differentiable(steps):
    torch.manual_seed(0)
    model = UNet(8, (1, 2, 2, 2), 32)
    d = GaussianDiffusion()
    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    a = purify(model, d, x, 8, steps=steps, noise=noise, generator=torch.Generator().manual_seed(2))
    b = purify(model, d, x, 8, steps=steps, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
