"""detect -> purify the flagged scans -> classify, on any engine, without torch.

An engine provides three calls on float32 numpy batches: ``classify(x) ->
probs [N, C]``, ``score(x) -> [N]`` and ``eps(x_t, t) -> [N, 1, S, S]``. The
pipeline does the rest with the bundle's manifest: tau, the score -> t* map,
the schedule (``runtime.schedule``, the same arithmetic as training) and the
respaced DDIM reverse process (or every ancestral step when ``steps`` is 0).

Purification noise is drawn per scan: scan i's noise comes from
``numpy.random.default_rng(seeds[i])`` alone, so a scan's result does not
depend on the batch it came in or its place in it. At the scanner the seed is
derived from the scan's content and a site secret (:func:`scan_seed`): the
same scan always gets the same answer, the record states the seed so that the
site can reproduce it, and an outsider, who lacks the secret, cannot predict
the noise.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path

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


SECRET_BYTES = 32


def load_site_secret(path: str | Path, create: bool = True) -> bytes:
    """The site's secret (32 random bytes, a 0600 file); made on first use when ``create``."""
    path = Path(path)
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(SECRET_BYTES))
        try:
            os.link(tmp, path)  # never replaces a secret another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the site secret ({err.strerror})") from None
    if len(data) < 16:
        raise ValueError(f"{path}: a site secret must hold at least 16 bytes, found {len(data)}")
    return data


def scan_seed(secret: bytes, content_sha256: str, draw: int = 0) -> int:
    """A 63-bit noise seed from the scan's content hash and the site secret (HMAC-SHA256); ``draw``: which draw."""
    msg = bytes.fromhex(content_sha256) + draw.to_bytes(4, "big")
    return int.from_bytes(hmac.new(secret, msg, hashlib.sha256).digest()[:8], "big") >> 1


def t_star_of(scores: np.ndarray, cfg: PurifyConfig) -> np.ndarray:
    frac = np.clip((scores - cfg.tau) / max(cfg.tau * (cfg.ref_ratio - 1.0), 1e-12), 0.0, 1.0)
    t = cfg.t_min + frac * (cfg.t_max - cfg.t_min)
    t = np.round(t / cfg.quantum) * cfg.quantum
    return np.clip(t, cfg.t_min, cfg.t_max).astype(np.int64)


class Pipeline:
    """The defended classifier of one site on one engine."""

    def __init__(self, engine, cfg: PurifyConfig, ood_threshold: float | None = None):
        if cfg.rule != "tau":
            raise ValueError(f"the bundle's detector rule is {cfg.rule!r}; only per-scan 'tau' can run at a scanner")
        if ood_threshold is not None and not hasattr(engine, "ood"):
            raise ValueError("an out-of-distribution threshold needs an engine with an ood graph")
        self.engine, self.cfg, self.ood_threshold = engine, cfg, ood_threshold
        self.abar = schedule.alpha_bar_by_step(cfg.num_steps, cfg.beta_start, cfg.beta_end)
        self.betas = np.concatenate([[0.0], schedule.linear_betas(cfg.num_steps, cfg.beta_start, cfg.beta_end)])

    def purify(self, x: np.ndarray, t_star: int, rng, noise: np.ndarray | None = None) -> np.ndarray:
        """Noise ``x`` (in [0, 1]) to ``t_star`` and run the reverse process back; returns [0, 1] images.

        ``rng``: one generator for the batch, or a list of one generator per
        scan (each scan's noise from its own generator only).
        """
        if isinstance(rng, (list, tuple)):
            if len(rng) != len(x):
                raise ValueError(f"{len(rng)} generators for {len(x)} scans")
            rngs = list(rng)

            def draw(shape):
                return np.stack([r.standard_normal(shape[1:]) for r in rngs]).astype(np.float32)
        else:
            def draw(shape):
                return rng.standard_normal(shape).astype(np.float32)
        noise = draw(x.shape) if noise is None else noise.astype(np.float32)
        a = self.abar
        h = schedule.q_sample(x, t_star, noise, a)
        steps = self.cfg.steps or None
        ts = schedule.respaced_timesteps(t_star, steps)
        n = x.shape[0]
        if steps is None or steps >= t_star:
            for t in ts:
                eps = self.engine.eps(h, np.full(n, t, np.float32))
                b = self.betas[t]
                mean = (h - b / np.sqrt(1.0 - a[t]) * eps) / np.sqrt(1.0 - b)
                z = draw(x.shape) if t > 1 else 0.0
                h = (mean + np.sqrt(b) * z).astype(np.float32)
        else:
            for t, t_prev in zip(ts, ts[1:] + [0]):
                eps = self.engine.eps(h, np.full(n, t, np.float32))
                x0 = np.clip((h - np.sqrt(1.0 - a[t]) * eps) / np.sqrt(a[t]), -1.0, 1.0)
                h = (np.sqrt(a[t_prev]) * x0 + np.sqrt(1.0 - a[t_prev]) * eps).astype(np.float32)
        return np.clip((h + 1.0) * 0.5, 0.0, 1.0).astype(np.float32)

    MODES = ("adaptive", "always", "classify")

    @staticmethod
    def _seed_table(seed: int | np.ndarray, n: int) -> np.ndarray:
        """``[N, D]`` noise seeds from an int ``s`` (``s, s + 1, ...``), ``[N]`` seeds or ``[N, D]`` seeds."""
        seeds = (np.arange(n, dtype=np.int64) + int(seed)) if np.isscalar(seed) else np.asarray(seed, np.int64)
        if seeds.ndim == 1:
            seeds = seeds[:, None]
        if seeds.ndim != 2 or seeds.shape[0] != n or seeds.shape[1] < 1:
            raise ValueError(f"{seeds.shape} seeds for {n} scans")
        return seeds

    def _out_of_distribution(self, x: np.ndarray, mode: str, timings: dict) -> tuple[np.ndarray, np.ndarray]:
        """OOD scores ``[N]`` and refusals ``[N]`` of ``x`` (zeros and none without a threshold or in ``classify``)."""
        n = len(x)
        ood = np.zeros(n, np.float32)
        if self.ood_threshold is not None and mode != "classify":
            t0 = time.perf_counter()
            ood = np.asarray(self.engine.ood(x), dtype=np.float32)
            timings["ood"] = time.perf_counter() - t0
        refused = ~(ood <= self.ood_threshold) if self.ood_threshold is not None and mode != "classify" \
            else np.zeros(n, bool)
        return ood, refused

    def _classify_purified(self, x: np.ndarray, flagged: np.ndarray, t_star: np.ndarray, seeds: np.ndarray,
                           timings: dict) -> np.ndarray:
        """Probabilities ``[N, C]`` of ``x`` with the flagged scans purified at their t*, the mean over seed draws."""
        draws = seeds.shape[1]
        probs = None
        for d in range(draws if flagged.any() else 1):  # each draw purifies the flagged scans with its own noise
            t0 = time.perf_counter()
            x_in = x
            if flagged.any():
                x_in = x.copy()
                for t in np.unique(t_star[flagged]):
                    idx = np.flatnonzero(flagged & (t_star == t))
                    x_in[idx] = self.purify(x[idx], int(t), [np.random.default_rng(int(seeds[i, d])) for i in idx])
            timings["purify"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            p = np.asarray(self.engine.classify(x_in if d == 0 else x_in[flagged]), dtype=np.float32)
            timings["classify"] += time.perf_counter() - t0
            if d == 0:
                probs = p.copy()
            else:
                probs[flagged] += p
        if draws > 1 and flagged.any():
            probs[flagged] /= draws  # the mean of the draws' probabilities
        return probs

    def run(self, x: np.ndarray, seed: int | np.ndarray = 0, mode: str = "adaptive") -> dict:
        """``x [N, 1, S, S]`` float32 in [0, 1] -> probabilities, scores, flags, t*, seeds, OOD scores, timings.

        ``seed``: one noise seed per scan (``[N]``), or an int ``s`` meaning
        ``s, s + 1, ...``; ``[N, D]`` purifies each flagged scan ``D`` times
        (draw ``d`` with seed ``[i, d]``) and averages the ``D``
        probabilities, which makes the answer depend less on the noise. ``mode="adaptive"`` is the defense (purify the
        flagged scans). The two others exist to price it: ``"always"``
        purifies every scan (t* from the score, at least ``t_min``) and
        ``"classify"`` runs the classifier alone (no detection, no
        purification). When the engine has an out-of-distribution graph,
        ``ood`` holds its scores and ``refused`` the scans above the bundle's
        threshold (they are still computed; the caller withholds their
        diagnosis).
        """
        if mode not in self.MODES:
            raise ValueError(f"unknown pipeline mode {mode!r}; choose one of {self.MODES}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(x)
        seeds = self._seed_table(seed, n)
        timings = {"ood": 0.0, "detect": 0.0, "purify": 0.0, "classify": 0.0}
        ood, refused = self._out_of_distribution(x, mode, timings)
        if mode == "classify":
            t0 = time.perf_counter()
            probs = np.asarray(self.engine.classify(x), dtype=np.float32)
            zeros = np.zeros(n, np.float32)
            timings["classify"] = time.perf_counter() - t0
            return {"probs": probs, "scores": zeros, "flagged": zeros.astype(bool), "t_star": zeros.astype(np.int64),
                    "seeds": seeds, "ood": ood, "refused": refused, "timings": timings}
        t0 = time.perf_counter()
        scores = np.asarray(self.engine.score(x), dtype=np.float32)
        timings["detect"] = time.perf_counter() - t0
        flagged = scores > self.cfg.tau
        if mode == "always":
            flagged = np.ones(n, bool)
        t_star = np.where(flagged, t_star_of(scores, self.cfg), 0)
        probs = self._classify_purified(x, flagged, t_star, seeds, timings)
        return {"probs": probs, "scores": scores, "flagged": flagged, "t_star": t_star,
                "seeds": seeds[:, 0] if seeds.shape[1] == 1 else seeds, "ood": ood, "refused": refused,
                "timings": timings}
