"""Diffusion schedule arithmetic shared by training and the scanner-side runtime.

Plain numpy, no torch: the runtime computes the same alpha-bar values and
respaced timesteps as the training code, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """Linear DDPM schedule. Returns betas ``[T]`` float64 for t = 1..T (index t-1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s). Returns ``[T]`` float64, index t-1 for step t."""
    return np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))


def alpha_bar_by_step(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """Alpha-bar of the linear schedule indexed by timestep: ``[T + 1]`` float64, ``[0] = 1`` (the clean image)."""
    return np.concatenate([[1.0], alphas_cumprod(linear_betas(num_steps, beta_start, beta_end))])


def respaced_timesteps(t_star: int, steps: int | None) -> list[int]:
    """Descending timesteps from ``t_star`` towards 0 used by a respaced reverse process.

    ``steps=None`` (or ``steps >= t_star``) gives every step ``t_star, t_star-1, ..., 1``.
    Otherwise ``steps`` evenly spaced integer steps starting at ``t_star``; the
    process then jumps from the last one to a clean image (t = 0).
    """
    if t_star < 1:
        raise ValueError(f"t_star must be >= 1, got {t_star}")
    if steps is None or steps >= t_star:
        return list(range(t_star, 0, -1))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = np.round(np.linspace(t_star, 0, steps + 1)[:-1]).astype(int)
    return [int(t) for t in ts]


def q_sample(x01: np.ndarray, t: int, noise: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """Forward-noise images in [0, 1] to step ``t``: ``sqrt(abar_t) (2x - 1) + sqrt(1 - abar_t) noise`` (float32).

    ``abar`` is alpha-bar indexed by timestep (:func:`alpha_bar_by_step`);
    the result is in diffusion space, as the denoiser takes it.
    """
    return (np.sqrt(abar[t]) * (2.0 * x01 - 1.0) + np.sqrt(1.0 - abar[t]) * noise).astype(np.float32)
