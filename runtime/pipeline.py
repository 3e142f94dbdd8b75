"""detect -> purify the flagged scans -> classify, on any engine, without torch.

An engine provides three calls on float32 numpy batches: ``classify(x) ->
probs [N, C]``, ``score(x) -> [N]`` and ``eps(x_t, t) -> [N, 1, S, S]``. The
pipeline does the rest with the bundle's manifest: tau, the score -> t* map,
the schedule (``runtime.schedule``, the same arithmetic as training) and the
respaced DDIM reverse process (or every ancestral step when ``steps`` is 0).

Purification noise comes from ``numpy.random.default_rng(seed)``; the seed is
returned with every result so that a result can be reproduced for an audit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime import schedule


@dataclass(frozen=True)
class PurifyConfig:
    tau: float
    t_min: int
    t_max: int
    ref_ratio: float
    quantum: int
    steps: int
    num_steps: int
    beta_start: float
    beta_end: float
    rule: str = "tau"

    @classmethod
    def from_manifest(cls, m: dict) -> PurifyConfig:
        d, p = m["detector"], m["purification"]
        s, t = p["schedule"], p["t_star"]
        return cls(float(d["tau"]), int(t["t_min"]), int(t["t_max"]), float(t["ref_ratio"]), int(t["quantum"]),
                   int(p["steps"]), int(s["num_steps"]), float(s["beta_start"]), float(s["beta_end"]),
                   d.get("calibration", {}).get("rule", "tau"))


def t_star_of(scores: np.ndarray, cfg: PurifyConfig) -> np.ndarray:
    frac = np.clip((scores - cfg.tau) / max(cfg.tau * (cfg.ref_ratio - 1.0), 1e-12), 0.0, 1.0)
    t = cfg.t_min + frac * (cfg.t_max - cfg.t_min)
    t = np.round(t / cfg.quantum) * cfg.quantum
    return np.clip(t, cfg.t_min, cfg.t_max).astype(np.int64)


class Pipeline:
    """The defended classifier of one site on one engine."""

    def __init__(self, engine, cfg: PurifyConfig):
        if cfg.rule != "tau":
            raise ValueError(f"the bundle's detector rule is {cfg.rule!r}; only per-scan 'tau' can run at a scanner")
        self.engine, self.cfg = engine, cfg
        self.abar = schedule.alpha_bar_by_step(cfg.num_steps, cfg.beta_start, cfg.beta_end)
        self.betas = np.concatenate([[0.0], schedule.linear_betas(cfg.num_steps, cfg.beta_start, cfg.beta_end)])

    def purify(self, x: np.ndarray, t_star: int, rng: np.random.Generator, noise: np.ndarray | None = None) -> np.ndarray:
        """Noise ``x`` (in [0, 1]) to ``t_star`` and run the reverse process back; returns [0, 1] images."""
        noise = rng.standard_normal(x.shape).astype(np.float32) if noise is None else noise.astype(np.float32)
        a = self.abar
        h = (np.sqrt(a[t_star]) * (2.0 * x - 1.0) + np.sqrt(1.0 - a[t_star]) * noise).astype(np.float32)
        steps = self.cfg.steps or None
        ts = schedule.respaced_timesteps(t_star, steps)
        n = x.shape[0]
        if steps is None or steps >= t_star:
            for t in ts:
                eps = self.engine.eps(h, np.full(n, t, np.float32))
                b = self.betas[t]
                mean = (h - b / np.sqrt(1.0 - a[t]) * eps) / np.sqrt(1.0 - b)
                z = rng.standard_normal(x.shape).astype(np.float32) if t > 1 else 0.0
                h = (mean + np.sqrt(b) * z).astype(np.float32)
        else:
            for t, t_prev in zip(ts, ts[1:] + [0]):
                eps = self.engine.eps(h, np.full(n, t, np.float32))
                x0 = np.clip((h - np.sqrt(1.0 - a[t]) * eps) / np.sqrt(a[t]), -1.0, 1.0)
                h = (np.sqrt(a[t_prev]) * x0 + np.sqrt(1.0 - a[t_prev]) * eps).astype(np.float32)
        return np.clip((h + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)

    MODES = ("adaptive", "always", "classify")

    def run(self, x: np.ndarray, seed: int = 0, mode: str = "adaptive") -> dict:
        """``x [N, 1, S, S]`` float32 in [0, 1] -> probabilities, scores, flags, t*, the seed and stage timings.

        ``mode="adaptive"`` is the defense (purify the flagged scans). The two
        others exist to price it: ``"always"`` purifies every scan (t* from
        the score, at least ``t_min``) and ``"classify"`` runs the classifier
        alone (no detection, no purification).
        """
        if mode not in self.MODES:
            raise ValueError(f"unknown pipeline mode {mode!r}; choose one of {self.MODES}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        timings = {"detect": 0.0}
        if mode == "classify":
            t0 = time.perf_counter()
            probs = np.asarray(self.engine.classify(x), dtype=np.float32)
            zeros = np.zeros(len(x), np.float32)
            return {"probs": probs, "scores": zeros, "flagged": zeros.astype(bool), "t_star": zeros.astype(np.int64),
                    "seed": seed, "timings": {"detect": 0.0, "purify": 0.0, "classify": time.perf_counter() - t0}}
        t0 = time.perf_counter()
        scores = np.asarray(self.engine.score(x), dtype=np.float32)
        timings["detect"] = time.perf_counter() - t0
        flagged = scores > self.cfg.tau
        if mode == "always":
            flagged = np.ones(len(x), bool)
        t_star = np.where(flagged, t_star_of(scores, self.cfg), 0)
        t0 = time.perf_counter()
        x_in = x
        if flagged.any():
            rng = np.random.default_rng(seed)
            x_in = x.copy()
            for t in np.unique(t_star[flagged]):
                idx = np.flatnonzero(flagged & (t_star == t))
                x_in[idx] = self.purify(x[idx], int(t), rng)
        timings["purify"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = np.asarray(self.engine.classify(x_in), dtype=np.float32)
        timings["classify"] = time.perf_counter() - t0
        return {"probs": probs, "scores": scores, "flagged": flagged, "t_star": t_star, "seed": seed, "timings": timings}
