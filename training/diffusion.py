"""Diffusion arithmetic, apart from the network (cf. improved-diffusion's gaussian_diffusion.py).

Images enter and leave in [0, 1] pixel space; internally the process runs on
``2x - 1``. The schedule comes from ``runtime.schedule`` so that training and
the scanner-side runtime use the very same numbers. Nothing here runs under
``no_grad``: an adaptive attack can differentiate through :func:`purify`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from runtime import schedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_diffusion_space(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0


def to_pixel_space(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


class GaussianDiffusion:
    """A linear-beta DDPM schedule with T steps. Timesteps are integers 1..T; t = 0 is the clean image."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2):
        betas = schedule.linear_betas(num_steps, beta_start, beta_end)
        abar = schedule.alphas_cumprod(betas)
        self.num_steps = num_steps
        # Index t holds step t; index 0 is the clean image (alpha-bar = 1, beta = 0).
        self.betas = torch.cat([torch.zeros(1), torch.from_numpy(betas).float()])
        self.alphas_cumprod = torch.cat([torch.ones(1), torch.from_numpy(abar).float()])

    @classmethod
    def from_config(cls, cfg) -> GaussianDiffusion:
        return cls(cfg.num_steps, cfg.beta_start, cfg.beta_end)

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I). Shapes ``[N, C, H, W]``, ``t [N]``."""
        abar = self._abar(t)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def ddpm_step(self, model: EpsModel, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (Ho et al. 2020, sigma_t^2 = beta_t); no noise added at t = 1."""
        eps = model(x_t, t)
        beta = self.betas.to(t.device)[t].view(-1, 1, 1, 1)
        abar = self._abar(t)
        mean = (x_t - beta / (1.0 - abar).sqrt() * eps) / (1.0 - beta).sqrt()
        nonzero = (t > 1).float().view(-1, 1, 1, 1)
        return mean + nonzero * beta.sqrt() * noise

    def ddim_step(self, model: EpsModel, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM step (eta = 0) between two steps of the same schedule (a respacing)."""
        eps = model(x_t, t)
        x0 = self.predict_x0(x_t, t, eps).clamp(-1.0, 1.0)
        abar_prev = self._abar(t_prev)
        return abar_prev.sqrt() * x0 + (1.0 - abar_prev).sqrt() * eps


def purify(
    model: EpsModel,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    t_star: int,
    steps: int | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise ``x`` ``[N, 1, H, W]`` (in [0, 1]) to step ``t_star`` and denoise it back; returns [0, 1] images.

    ``steps=None`` runs every ancestral DDPM step from ``t_star`` down (``t_star``
    network evaluations, step noise drawn from ``generator``); ``steps=k`` runs k
    deterministic DDIM steps on a respacing of the same schedule (k evaluations,
    the only randomness is ``noise``). ``noise`` ``[N, 1, H, W]`` is the forward
    noise; when omitted it is drawn from ``generator``. Differentiable.
    """
    if not 1 <= t_star <= diffusion.num_steps:
        raise ValueError(f"t_star must be in 1..{diffusion.num_steps}, got {t_star}")
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    n = x.shape[0]
    t0 = torch.full((n,), t_star, dtype=torch.long, device=x.device)
    h = diffusion.q_sample(to_diffusion_space(x), t0, noise)
    timesteps = schedule.respaced_timesteps(t_star, steps)
    if steps is None or steps >= t_star:
        for t in timesteps:
            step_noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if t > 1 else torch.zeros_like(x)
            h = diffusion.ddpm_step(model, h, torch.full_like(t0, t), step_noise)
    else:
        for t, t_prev in zip(timesteps, timesteps[1:] + [0]):
            h = diffusion.ddim_step(model, h, torch.full_like(t0, t), torch.full_like(t0, t_prev))
    return to_pixel_space(h)
