"""Byzantine-robust aggregation that needs the server's root set: FLTrust and OptiGradTrust.

Both work on the sites' *updates* ``u_i = w_i - w_global`` (flattened over
the floating-point arrays the sites share) and on a **reference update**
``g_0`` the server computes itself by training the current global model on
its **root set**: a small slice of clean training scans the server holds
(``root_size`` scans; see docs/training-defenses.md for the assumption).

**FLTrust** (Cao et al., NDSS 2021): trust ``ReLU(cos(u_i, g_0))``; each
update is rescaled to ``||g_0||`` and the trust-weighted mean is applied.

**OptiGradTrust**: a fingerprint of six features per update,

1. reconstruction error of a small VAE trained on honest updates (the
   server's reference updates and, from the second round on, the updates it
   trusted before), after a fixed random projection to ``PROJ_DIM``
   dimensions and scaling to unit norm;
2. cosine similarity to ``g_0``;
3. mean cosine similarity to the other sites' updates;
4. L2 norm, as ``|log(||u_i|| / median_j ||u_j||)|``;
5. sign agreement with ``g_0`` (fraction of coordinates of equal sign, as 2f - 1);
6. a Monte Carlo Shapley value: the mean decrease of the root-set loss when
   the update joins a random coalition of the others (``permutations``
   random orders; the value of a coalition is the loss of the global model
   plus the coalition's mean update);

each taken relative to the round's typical site (:func:`scorer_inputs`),
turned into trust weights in [0, 1] by :class:`TrustScorer`, a linear
scorer with an interpretable starting point plus one self-attention layer
over the round's sites (each site's weight can depend on the others'
fingerprints). The scorer is a **policy trained by REINFORCE** on-line, every
round: it samples which sites to include (Bernoulli(trust)), the reward is
the relative root-set loss decrease (clipped to [-1, 1]) of the included sites' mean update, plus a
small bonus for the fraction included (averaging more honest updates lowers a
variance that a small root set cannot measure), and a plain policy-gradient
step on the baseline-subtracted reward (tethered to the starting weights)
raises the trust of sites whose inclusion lowers the loss, by as much as the
reward tells them apart. The applied update is the trust-weighted mean (weights
``trust_i * n_i``; sites with trust below ``threshold`` are left out and
counted as detected) of the updates clipped to the median norm. Batch-norm
stays at the sites (the strategy keeps it local, FedBN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

PROJ_DIM = 256
FEATURES = ("vae_error", "cos_reference", "cos_others", "norm_deviation", "sign_agreement", "shapley")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the rows of ``a`` with the vector ``b`` (0 where a norm is 0)."""
    return (a @ b) / (a.norm(dim=-1) * b.norm()).clamp_min(1e-12)


def fltrust(updates: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aggregated update, trust scores) of FLTrust for ``updates`` (n, d) and ``reference`` (d,)."""
    trust = torch.relu(cosine(updates, reference))
    scaled = updates * (reference.norm() / updates.norm(dim=1).clamp_min(1e-12))[:, None]
    if float(trust.sum()) <= 0:  # nobody agrees with the root set: keep the global model
        return torch.zeros_like(reference), trust
    return (trust[:, None] * scaled).sum(0) / trust.sum(), trust


def shapley_values(updates: torch.Tensor, loss_of: Callable[[torch.Tensor | None], float], permutations: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Monte Carlo Shapley values of the updates: mean loss decrease when each joins a random coalition."""
    n = updates.shape[0]
    phi = torch.zeros(n, dtype=torch.float64)
    base = loss_of(None)
    for _ in range(max(1, permutations)):
        order = torch.randperm(n, generator=generator)
        total = torch.zeros_like(updates[0])
        prev = base
        for j, i in enumerate(order.tolist()):
            total = total + updates[i]
            cur = loss_of(total / (j + 1))
            phi[i] += prev - cur
            prev = cur
    return (phi / max(1, permutations)).float()


class UpdateVAE(nn.Module):
    """A small VAE over projected, unit-norm updates; its reconstruction error flags unusual directions."""

    def __init__(self, dim: int = PROJ_DIM, hidden: int = 64, latent: int = 8):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x, generator=None):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp() if self.training else mu
        return self.dec(z), mu, logvar

    def error(self, x: torch.Tensor) -> torch.Tensor:
        self.eval()
        with torch.no_grad():
            return (self(x)[0] - x).pow(2).sum(-1)

    def fit(self, x: torch.Tensor, steps: int, generator: torch.Generator, lr: float = 3e-3, kl_weight: float = 1e-3) -> float:
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        self.train()
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            recon, mu, logvar = self(x, generator)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
            loss = (recon - x).pow(2).sum(-1).mean() + kl_weight * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())


class TrustScorer(nn.Module):
    """Trust logits for a round's sites from their fingerprints (n, 6): linear prior + self-attention."""

    PRIOR = (-0.5, 1.0, 0.5, -2.0, 0.5, 1.0)  # one weight per FEATURES entry (after :func:`scorer_inputs`)
    PRIOR_BIAS = 2.0  # the typical site of a round starts at trust sigmoid(2) = 0.88

    def __init__(self, width: int = 16, heads: int = 2, prior: bool = True):
        super().__init__()
        n = len(FEATURES)
        self.linear = nn.Linear(n, 1)
        with torch.no_grad():
            if prior:
                self.linear.weight.copy_(torch.tensor([self.PRIOR]))
                self.linear.bias.fill_(self.PRIOR_BIAS)
            else:
                self.linear.weight.zero_()
                self.linear.bias.fill_(0.0)
        self.embed = nn.Linear(n, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))[None]
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.linear(x).squeeze(-1) + self.out(h[0]).squeeze(-1)


def robust_z(v: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """``(v - median) / (1.4826 * MAD)``: how far each site lies from the round's typical site.

    The median and MAD belong to the honest majority whenever fewer than half
    the sites are malicious (the assumption of every Byzantine-robust rule), so
    the scale is the spread of honest updates, whatever the layer sizes, the
    learning rate or the round make of the raw values. ``floor`` (plus 5 % of
    the median's size) keeps a round of near-identical sites from turning
    rounding noise into large scores.
    """
    med = v.median()
    scale = (1.4826 * (v - med).abs().median()).clamp_min(floor + 0.05 * float(med.abs()))
    return (v - med) / scale


def scorer_inputs(raw: torch.Tensor) -> torch.Tensor:
    """The scorer's inputs from the raw fingerprint (FEATURES order): each feature relative to the round.

    VAE error: robust z-score of its log. Cosines, sign agreement and Shapley
    value: robust z-scores (:func:`robust_z`). Norm deviation stays
    ``|log(norm / median norm)|`` (already relative, and a 10x scaled update
    should stand out by the same amount in every round), capped at 5. The
    z-scores are clamped to [-5, 3]: a site can lose any amount of trust by being unusual, but gain
    little by looking better than the typical site.
    """
    x = raw.clone().float()
    x[:, 0] = robust_z(x[:, 0].clamp_min(1e-12).log()).clamp(-5.0, 3.0)
    for c in (1, 2, 4, 5):
        x[:, c] = robust_z(x[:, c]).clamp(-5.0, 3.0)
    x[:, 3] = x[:, 3].clamp(max=5.0)
    return x


@dataclass
class OptiGradTrust:
    """The server-side state of OptiGradTrust across rounds (see the module docstring)."""

    dim: int
    seed: int = 0
    threshold: float = 0.5
    permutations: int = 2
    policy_iters: int = 4
    policy_samples: int = 8
    policy_lr: float = 0.1
    inclusion_bonus: float = 0.1
    tether: float = 0.01
    vae_steps: int = 150
    pool_size: int = 64
    scorer: TrustScorer | None = None  # None: a TrustScorer with the prior, initialised from ``seed``
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed + 7)
        proj_gen = torch.Generator().manual_seed(self.seed + 11)
        self.projection = torch.randn(self.dim, PROJ_DIM, generator=proj_gen) / math.sqrt(PROJ_DIM)
        with torch.random.fork_rng(devices=[]):  # initial weights from the seed, not from the global RNG's state
            torch.manual_seed(self.seed + 13)
            self.vae = UpdateVAE()
            if self.scorer is None:
                self.scorer = TrustScorer()
        self.pool: list[torch.Tensor] = []  # projected unit-norm honest updates
        self.optimizer = torch.optim.SGD(self.scorer.parameters(), lr=self.policy_lr)
        self.start = [p.detach().clone() for p in self.scorer.parameters()]

    def project(self, updates: torch.Tensor) -> torch.Tensor:
        p = updates @ self.projection
        return p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def fingerprints(self, updates: torch.Tensor, reference: torch.Tensor, references: torch.Tensor,
                     loss_of: Callable[[torch.Tensor | None], float]) -> torch.Tensor:
        """The (n, 6) raw fingerprint, FEATURES order; trains the VAE on the honest pool first."""
        n = updates.shape[0]
        honest = torch.cat([self.project(references), *[p[None] for p in self.pool]]) if self.pool else self.project(references)
        self.vae.fit(honest, self.vae_steps, self.generator)
        vae_err = self.vae.error(self.project(updates))
        cos_ref = cosine(updates, reference)
        unit = updates / updates.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = unit @ unit.T
        cos_others = (sim.sum(1) - sim.diagonal()) / max(1, n - 1)
        norms = updates.norm(dim=1)
        norm_dev = (norms.clamp_min(1e-12) / norms.median().clamp_min(1e-12)).log().abs()
        sign = ((updates.sign() == reference.sign()[None]).float().mean(1)) * 2 - 1
        shap = shapley_values(updates, loss_of, self.permutations, self.generator)
        return torch.stack([vae_err, cos_ref, cos_others, norm_dev, sign, shap], dim=1)

    @staticmethod
    def reward(base: float, loss: float) -> float:
        """Relative root-loss decrease, clipped to [-1, 1] (one ruinous sample must not swamp the rest)."""
        return max(-1.0, min(1.0, (base - loss) / max(abs(base), 1e-12)))

    def learn(self, x: torch.Tensor, updates: torch.Tensor, loss_of: Callable[[torch.Tensor | None], float]) -> dict:
        """REINFORCE steps: reward = root-loss decrease of the mean update of a sampled set of sites."""
        base = loss_of(None)
        rewards_seen = []
        for _ in range(self.policy_iters):
            probs = torch.sigmoid(self.scorer(x))
            with torch.no_grad():
                masks = torch.bernoulli(probs.detach().expand(self.policy_samples, -1), generator=self.generator)
                rewards = []
                for m in masks:
                    if float(m.sum()) == 0:
                        rewards.append(0.0)
                        continue
                    rewards.append(self.reward(base, loss_of((m[:, None] * updates).sum(0) / m.sum()))
                                   + self.inclusion_bonus * float(m.mean()))
                r = torch.tensor(rewards)
            rewards_seen += rewards
            adv = r - r.mean()  # not divided by the spread: rewards that barely differ must barely move the policy
            logp = (masks * probs.clamp_min(1e-6).log() + (1 - masks) * (1 - probs).clamp_min(1e-6).log()).sum(1)
            loss = -(adv * logp).mean() + self.tether * sum(
                (p - p0).pow(2).sum() for p, p0 in zip(self.scorer.parameters(), self.start, strict=True))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return {"mean_reward": float(sum(rewards_seen) / max(1, len(rewards_seen)))}

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor,
                  references: torch.Tensor, loss_of: Callable[[torch.Tensor | None], float]) -> tuple[torch.Tensor, dict]:
        """The round's applied update and what was decided (trust per site, fingerprints, reward)."""
        raw = self.fingerprints(updates, reference, references, loss_of)
        x = scorer_inputs(raw)
        info = self.learn(x, updates, loss_of)
        with torch.no_grad():
            trust = torch.sigmoid(self.scorer(x))
        keep = trust >= self.threshold
        norms = updates.norm(dim=1)
        clipped = updates * (norms.median() / norms.clamp_min(1e-12)).clamp(max=1.0)[:, None]
        w = trust * weights * keep
        agg = (w[:, None] * clipped).sum(0) / w.sum() if float(w.sum()) > 0 else torch.zeros_like(reference)
        proj = self.project(updates[keep]) if bool(keep.any()) else torch.zeros(0, PROJ_DIM)
        self.pool = (self.pool + list(proj))[-self.pool_size:]
        info.update({"trust": trust.tolist(), "kept": keep.tolist(), "fingerprints": raw.tolist()})
        self.history.append(info)
        return agg, info
