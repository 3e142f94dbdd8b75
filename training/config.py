"""Typed configuration: one frozen dataclass per component, named profiles, TOML in and out.

A profile (``tiny``, ``edge``, ``paper``) fixes the model sizes and the
training schedule of each component. A TOML file may override any field::

    profile = "edge"
    [classifier]
    epochs = 20
    [detector]
    mask_ratio = 0.75

The resolved configuration is written next to every run (``config.toml``) and
inside every checkpoint, so a run can always be reproduced from its folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from runtime.preprocess import PreprocessConfig
from training.data.partition import parse_scheme


class UsageError(ValueError):
    """A mistake in what the user asked for (a flag, a setting, a path): reported in one line, not a traceback."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation schedule of one component: ``optimizer`` (``"adamw"``, or
    ``"sgd"`` with heavy-ball ``momentum``) and cosine decay with warm-up."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 1.0
    eval_every: int = 1
    optimizer: str = "adamw"
    momentum: float = 0.9

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise UsageError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.lr <= 0 or self.batch_size < 1 or not 0.0 <= self.momentum < 1.0:
            raise UsageError("optim: lr must be > 0, batch_size >= 1 and momentum in [0, 1)")


@dataclass(frozen=True)
class ClassifierConfig:
    """Personalized mixture of experts (paper Eq. 9).

    Each of ``num_experts`` experts is a timm backbone (``backbone`` with
    ``backbone_kwargs``, ``in_chans=1``) plus a 2-layer MLP head with
    ``head_hidden`` units. The gates score psi(x), the mean of the experts'
    pooled features, with ``num_experts`` MLPs of ``gate_hidden`` units.
    Loss = CE(mixture) + beta * ||gate params||^2 + gamma * H(gate weights).

    ``norm``: ``"batch"`` (batch-norm, the backbone's own) or ``"group"``
    (GroupNorm with ``norm_groups`` groups: no running statistics, so nothing
    computed from one site's label mix is averaged into the others).
    ``logit_adjust`` > 0 trains with logit adjustment (Menon et al., 2021):
    the cross-entropy sees the mixture's log-probabilities plus
    ``logit_adjust`` * log(class prior of the training scans), so a site that
    holds (almost) one class does not push the shared experts towards it;
    prediction uses the unadjusted mixture.
    ``gate_balance`` > 0 adds ``gate_balance`` * (log K - H(batch-mean gate)):
    a load-balancing term that keeps every expert in use at every site (the
    entropy term acts per scan and lets a site route all its scans to one expert).
    ``decorrelation`` > 0 adds ``decorrelation`` * the mean squared off-diagonal correlation of each
    expert's pooled features over the batch (FedDecorr, Shi et al., ICLR 2023: against the dimensional
    collapse that training on one site's label mix causes).
    ``augment_kwargs``: keyword arguments of the training augmentation (:class:`training.data.augment.Augment`:
    ``max_degrees``, ``p_hflip``, ``p_vflip``, ``brightness``, ``scale``, ``translate``, ``noise``); empty:
    the paper's rotations, flips and brightness.
    """

    backbone: str = "resnet18"
    backbone_kwargs: dict = field(default_factory=dict)
    num_experts: int = 3
    head_hidden: int = 256
    gate_hidden: int = 64
    num_classes: int = 2
    drop: float = 0.1
    beta: float = 1e-4
    gamma: float = 0.01
    norm: str = "batch"
    norm_groups: int = 8
    logit_adjust: float = 0.0
    gate_balance: float = 0.0
    decorrelation: float = 0.0
    augment_kwargs: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        if self.norm not in ("batch", "group"):
            raise UsageError(f"classifier norm must be 'batch' or 'group', got {self.norm!r}")
        if self.norm_groups < 1:
            raise UsageError(f"classifier norm_groups must be >= 1, got {self.norm_groups}")
        if self.logit_adjust < 0:
            raise UsageError(f"classifier logit_adjust must be >= 0, got {self.logit_adjust}")
        if self.gate_balance < 0:
            raise UsageError(f"classifier gate_balance must be >= 0, got {self.gate_balance}")
        if self.decorrelation < 0:
            raise UsageError(f"classifier decorrelation must be >= 0, got {self.decorrelation}")
        self.make_augment()  # refuses unknown keys and out-of-range values here, not at the first batch

    def make_augment(self):
        """The training augmentation this configuration asks for."""
        from training.data.augment import Augment

        fields = set(Augment.__dataclass_fields__)
        unknown = sorted(set(self.augment_kwargs) - fields)
        if unknown:
            raise UsageError(f"classifier augment_kwargs: unknown key(s) {', '.join(unknown)}; choose from {', '.join(sorted(fields))}")
        try:
            return Augment(**{k: float(v) for k, v in self.augment_kwargs.items()})
        except (TypeError, ValueError) as err:
            raise UsageError(f"classifier {err}") from None


@dataclass(frozen=True)
class DetectorConfig:
    """ViT masked autoencoder for detection (patch ``patch`` on a square image)."""

    patch: int = 16
    enc_depth: int = 12
    enc_width: int = 512
    enc_heads: int = 8
    dec_depth: int = 8
    dec_width: int = 512
    dec_heads: int = 8
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    mask_seed: int = 1234
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class DenoiserConfig:
    """DDPM U-Net (4 down / 4 up DoubleConv blocks) and its linear schedule.

    ``t_max_train`` limits the timesteps sampled in training to 1..t_max_train:
    purification only ever starts from small t*, so the capacity goes where it
    is used. 0 trains on the full 1..T range. ``train_crop`` > 0 trains on
    random square crops of that size (a multiple of 16): the network is fully
    convolutional and purification still runs on whole scans, at a fraction
    of the training cost.
    """

    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    time_dim: int = 256
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    t_max_train: int = 0
    train_crop: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class AttackConfig:
    """PGD in [0, 1] pixel space (PROTOCOL.md): ``norm`` linf | l2, budget ``eps``, ``steps`` of size ``step``."""

    norm: str = "linf"
    eps: float = 0.015
    step: float = 0.003
    steps: int = 7
    random_start: bool = True

    def __post_init__(self):
        if self.norm not in ("linf", "l2"):
            raise UsageError(f"attack norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.eps < 0 or self.step < 0 or self.steps < 0:
            raise UsageError("attack eps, step and steps must be non-negative")

    def describe(self) -> str:
        return f"PGD-{self.norm} eps={self.eps} step={self.step} steps={self.steps} random_start={self.random_start}"


@dataclass(frozen=True)
class DefenseConfig:
    """detect -> purify if flagged -> classify (see ``training/defense.py``).

    tau is the (1 - ``flag_rate``) quantile of clean validation scores. A
    flagged scan is purified from t* = ``t_min`` (score at tau) rising linearly
    to ``t_max`` (score at ``ref_ratio`` * tau), rounded to a multiple of
    ``quantum``, with ``steps`` DDIM steps (0: every ancestral DDPM step).
    The defaults (t* 100..150, one step: the denoiser's one-shot estimate)
    were chosen on Br35H validation scans, docs/detection.md.

    ``score`` is the detection statistic: ``"floor"`` (default), the noise
    floor of the scan -- the mean of the lowest ``floor_fraction`` of its
    absolute discrete-Laplacian values, i.e. how rough its flattest regions
    are -- or ``"mae"``, the paper's masked-autoencoder reconstruction error.
    On Br35H the MAE error cannot tell paper-setting PGD (L-inf 0.015) from
    clean scans (validation ROC AUC 0.49) while the noise floor can (0.99);
    see docs/detection.md.

    ``rule = "kappa"`` is the paper's rank-based rule: in each batch the
    ``kappa`` fraction of scans with the highest scores is flagged. It needs
    a batch of test inputs and its decision for one scan depends on the
    others, so it cannot run per scan at a scanner; ``"tau"`` (the default)
    decides every scan alone.

    ``mode = "always"`` purifies every scan (t* from its score, at least
    ``t_min``) instead of the flagged ones only: an attacker can no longer win
    by staying under tau. ``draws`` purifications of a scan are averaged
    (their probabilities), which makes the answer depend less on one noise
    draw. Both travel with the bundle (``purification.mode`` / ``.draws``).
    """

    flag_rate: float = 0.05
    t_min: int = 100
    t_max: int = 150
    ref_ratio: float = 2.0
    quantum: int = 10
    steps: int = 1
    rule: str = "tau"
    kappa: float = 0.5
    score: str = "floor"
    floor_fraction: float = 0.1
    mode: str = "adaptive"
    draws: int = 1

    def __post_init__(self):
        if self.mode not in ("adaptive", "always"):
            raise UsageError(f"defense mode must be 'adaptive' or 'always', got {self.mode!r}")
        if not 1 <= self.draws <= 16:
            raise UsageError(f"defense draws must be in 1..16, got {self.draws}")
        if self.rule not in ("tau", "kappa"):
            raise UsageError(f"defense rule must be 'tau' or 'kappa', got {self.rule!r}")
        if self.score not in ("floor", "mae"):
            raise UsageError(f"defense score must be 'floor' or 'mae', got {self.score!r}")
        if not 0.0 < self.floor_fraction <= 1.0:
            raise UsageError(f"defense floor_fraction must be in (0, 1], got {self.floor_fraction}")
        if not 0.0 <= self.kappa <= 1.0:
            raise UsageError(f"defense kappa must be in [0, 1], got {self.kappa}")
        if not 0.0 < self.flag_rate < 1.0:
            raise UsageError(f"defense flag_rate must be in (0, 1), got {self.flag_rate}")
        if not 1 <= self.t_min <= self.t_max:
            raise UsageError(f"defense needs 1 <= t_min <= t_max, got {self.t_min}, {self.t_max}")
        if self.ref_ratio <= 1.0 or self.quantum < 1 or self.steps < 0:
            raise UsageError("defense needs ref_ratio > 1, quantum >= 1, steps >= 0")


METHODS = ("local", "fedavg", "fat", "pfeddef", "medfedpure")
AGGREGATIONS = ("fedavg", "krum", "multikrum", "bulyan", "median", "trimmed", "fltrust", "optigradtrust")
POISONS = ("none", "scaling", "partial", "signflip", "gaussian", "labelflip")
SERVER_OPTS = ("fedavg", "fedavgm", "fedadam", "fedyogi")


@dataclass(frozen=True)
class FederatedConfig:
    """A federated run (``python -m training train --method ...``).

    ``method``: ``local`` (no federation), ``fedavg`` (one backbone, all shared),
    ``fat`` (fedavg + PGD adversarial training), ``pfeddef`` (mixture of
    experts with personal gates + adversarial training on a fraction
    ``adv_fraction`` of each batch), ``medfedpure`` (mixture of experts with
    personal gates, trained after a federated denoiser and detector).
    ``purify_fraction`` > 0 (medfedpure): purification-consistent training --
    that fraction of every local batch is purified by the federated denoiser
    (t* uniform in the defense's range, the defense's steps), and
    ``adv_fraction`` of it is PGD examples made first, so the classifier sees
    what the pipeline feeds it (see ``training/finetune.py``).
    ``adversarial`` (medfedpure): ``adv_fraction`` of every local batch is PGD examples even without
    ``purify_fraction`` (pFedDef's adversarial training on the MedFedPure mixture; the scans are not purified).
    ``through_purifier`` (medfedpure, with ``adv_fraction`` and ``purify_fraction`` or ``adversarial``): the PGD examples are
    crafted through the purification (exact gradients through the denoiser, a fresh t* and noise at every
    step), i.e. against an attacker who knows the purifier, as ``finetune --through-purifier`` does.
    ``textured_fraction`` of those examples perturb only the textured pixels (the flattest fifth and their
    neighbours left alone: the suite's ``adaptive-textured`` attacker), as ``finetune --textured-fraction`` does.
    ``robust_rounds`` > 0: only the classifier phase's last ``robust_rounds`` rounds train robustly -- the
    adversarial examples (``adv_fraction``) and purified scans (``purify_fraction``, ``purify_train``) are
    used in them only, under their own cosine learning-rate schedule from ``robust_lr_scale`` x the
    profile's rate (a fine-tuning stage, as ``finetune`` does centrally); the rounds before them train on
    clean scans under a schedule of their own. A finished run can be continued into such rounds with
    ``train --continue-from RUN`` (same result as training it in one go).
    ``purify_train`` (medfedpure): the scans the detector flags are purified
    before each step (the paper's Algorithm 3, lines 10-13).
    ``defense_rounds`` / ``defense_local_epochs`` (0: as ``rounds`` /
    ``local_epochs``) schedule the denoiser and detector phases. ``fedbn`` keeps
    batch-norm at the sites; ``proximal_mu`` > 0 adds mu/2 ||w - w_global||^2
    to every local objective. ``keep_optimizer_state`` keeps each site's local
    optimizer moments (AdamW's, or SGD's momentum) from one round to the next
    instead of starting the optimizer afresh every round. ``gate_warmup_rounds``
    (MedFedPure): in the classifier phase's first rounds every expert is
    weighted 1/K and the gates are not trained, so that all experts learn
    before the gates choose among them. ``bn_recalibrate``: before each
    evaluation of the classifier, the sites measure the shared batch-norm
    layers' statistics of the aggregated model on their training scans and
    the server pools them (instead of averaging the running statistics each
    site kept while training, which follow its own label mix). ``eval_max`` > 0 caps the test scans per site in
    the per-round evaluation (0: all).

    Training-time defenses (docs/training-defenses.md):
    ``aggregation`` picks how the server combines the sites' updates
    (:data:`AGGREGATIONS`; ``byzantine`` is the number of malicious sites
    Krum / MultiKrum / Bulyan assume, -1: the most each tolerates up to
    ``ceil(0.4 * sites)``; ``trim_beta`` the fraction cut at each end by the
    trimmed mean; ``root_size`` the server's root set of clean training scans
    for FLTrust and OptiGradTrust). ``poison`` makes ``malicious_fraction``
    of the sites attack (:data:`POISONS`, ``poison_scale`` the lambda of the
    scaling attacks). ``dp_clip`` > 0 clips every site's update to that L2
    norm and ``dp_sigma`` adds N(0, (sigma * clip)^2) noise to it at the
    site (Fed-Safe's distributed noise); ``dp_weight_sigma`` adds noise of
    that standard deviation to the weights the server sends as well;
    ``dp_delta`` is the delta of the reported epsilon. ``feature_skew``
    (simulation) re-acquires every scan of site k through scanner profile
    ``SKEW_SCANNERS[k % 4]`` (gamma, blur, Rician noise, bias field; see
    ``training/data/phantom.py``): the same anatomy looks different at each
    site, as with different scanners.

    ``scaffold`` (classifier phase, ``fedavg`` aggregation, any ``server_opt``): SCAFFOLD's control
    variates -- every local step's gradient is corrected by the federation's mean gradient minus the
    site's own (``training/federated/scaffold.py``), against the drift of label-skewed sites.

    ``swa_rounds`` > 0 (classifier phase): stochastic weight averaging across rounds -- the classifier the
    sites keep is the mean of the shared arrays the server aggregated in the phase's last ``swa_rounds``
    rounds, its batch-norm statistics measured again at the sites (``training/federated/swa.py``); the rounds
    themselves train on from the unaveraged arrays.

    ``server_opt`` (classifier phase, ``fedavg`` aggregation): how the server
    applies the sites' averaged update -- ``fedavg`` (replace the global
    weights by the average), or Flower's ``fedavgm`` (server momentum
    ``server_momentum``, step ``server_lr``), ``fedadam`` / ``fedyogi``
    (adaptive server step ``server_lr``). Batch-norm buffers are always
    averaged plainly. The optimizer's state is saved with every round.
    """

    method: str = "medfedpure"
    sites: int = 10
    rounds: int = 20
    local_epochs: int = 1
    defense_rounds: int = 0
    defense_local_epochs: int = 0
    partition: str = "dirichlet:0.5"
    fedbn: bool = False
    proximal_mu: float = 0.0
    keep_optimizer_state: bool = False
    gate_warmup_rounds: int = 0
    bn_recalibrate: bool = False
    adv_fraction: float = 0.5
    purify_train: bool = False
    purify_fraction: float = 0.0
    adversarial: bool = False
    through_purifier: bool = False
    textured_fraction: float = 0.0
    robust_rounds: int = 0
    robust_lr_scale: float = 0.25
    eval_every: int = 1
    eval_max: int = 0
    train_attack: AttackConfig = field(default_factory=AttackConfig)
    eval_attack: AttackConfig = field(default_factory=AttackConfig)
    aggregation: str = "fedavg"
    byzantine: int = -1
    trim_beta: float = 0.2
    root_size: int = 64
    poison: str = "none"
    malicious_fraction: float = 0.0
    poison_scale: float = 10.0
    dp_clip: float = 0.0
    dp_sigma: float = 0.0
    dp_weight_sigma: float = 0.0
    dp_delta: float = 1e-5
    feature_skew: bool = False
    server_opt: str = "fedavg"
    scaffold: bool = False
    swa_rounds: int = 0
    server_lr: float = 1.0
    server_momentum: float = 0.9

    def __post_init__(self):
        if self.server_opt not in SERVER_OPTS:
            raise UsageError(f"unknown server optimizer {self.server_opt!r}; choose one of {SERVER_OPTS}")
        if self.server_opt != "fedavg" and self.aggregation != "fedavg":
            raise UsageError(f"server_opt {self.server_opt!r} applies to the fedavg aggregation only, "
                             f"not {self.aggregation!r}")
        if self.scaffold and (self.method == "local" or self.aggregation != "fedavg"):
            raise UsageError("scaffold needs a federated method with the fedavg aggregation")
        if self.scaffold and (self.dp_clip > 0 or self.dp_weight_sigma > 0):
            raise UsageError("scaffold sends each site's mean gradient, which the privacy accounting does not "
                             "cover: use it without dp_clip / dp_weight_sigma")
        if not 0 <= self.swa_rounds <= self.rounds:
            raise UsageError(f"swa_rounds must be in [0, rounds], got {self.swa_rounds}")
        if self.swa_rounds and self.method == "local":
            raise UsageError("swa_rounds averages the federation's shared arrays: not with method local")
        if self.server_lr <= 0 or not 0.0 <= self.server_momentum < 1.0:
            raise UsageError("server_lr must be > 0 and server_momentum in [0, 1)")
        if self.aggregation not in AGGREGATIONS:
            raise UsageError(f"unknown aggregation {self.aggregation!r}; choose one of {AGGREGATIONS}")
        if self.poison not in POISONS:
            raise UsageError(f"unknown poisoning {self.poison!r}; choose one of {POISONS}")
        if not 0.0 <= self.malicious_fraction < 1.0:
            raise UsageError(f"malicious_fraction must be in [0, 1), got {self.malicious_fraction}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise UsageError(f"trim_beta must be in [0, 0.5), got {self.trim_beta}")
        if self.dp_clip < 0 or self.dp_sigma < 0 or self.dp_weight_sigma < 0:
            raise UsageError("dp_clip, dp_sigma and dp_weight_sigma must be non-negative")
        if self.dp_sigma > 0 and self.dp_clip <= 0:
            raise UsageError("dp_sigma needs dp_clip > 0 (the noise is sigma * clip)")
        if not 0.0 < self.dp_delta < 1.0:
            raise UsageError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.root_size < 1:
            raise UsageError("root_size must be >= 1")
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.gate_warmup_rounds < 0:
            raise UsageError(f"gate_warmup_rounds must be >= 0, got {self.gate_warmup_rounds}")
        if self.sites < 1 or self.rounds < 1 or self.local_epochs < 1:
            raise UsageError("sites, rounds and local_epochs must be >= 1")
        if not 0.0 <= self.adv_fraction <= 1.0:
            raise UsageError(f"adv_fraction must be in [0, 1], got {self.adv_fraction}")
        if not 0.0 <= self.purify_fraction <= 1.0:
            raise UsageError(f"purify_fraction must be in [0, 1], got {self.purify_fraction}")
        if not 0 <= self.robust_rounds < self.rounds:
            raise UsageError(f"robust_rounds must be in [0, rounds), got {self.robust_rounds}")
        if self.robust_lr_scale <= 0:
            raise UsageError(f"robust_lr_scale must be > 0, got {self.robust_lr_scale}")
        if not 0.0 <= self.textured_fraction <= 1.0:
            raise UsageError(f"textured_fraction must be in [0, 1], got {self.textured_fraction}")
        if self.adversarial and not (self.method == "medfedpure" and self.adv_fraction > 0):
            raise UsageError("adversarial needs method medfedpure and adv_fraction > 0 (fat and pfeddef always "
                             "train adversarially)")
        if self.through_purifier and not (self.method == "medfedpure" and (self.purify_fraction > 0 or self.adversarial)
                                          and self.adv_fraction > 0):
            raise UsageError("through_purifier needs method medfedpure with adv_fraction > 0 and purify_fraction > 0 "
                             "or adversarial")
        try:
            parse_scheme(self.partition)
        except ValueError as err:
            raise UsageError(str(err)) from None

    @property
    def phase_rounds(self) -> dict[str, int]:
        d = self.defense_rounds or self.rounds
        return {"denoiser": d, "detector": d, "classifier": self.rounds}

    def robust(self, phase: str, server_round: int) -> bool:
        """Whether ``server_round`` of ``phase`` trains robustly (adversarial / purified scans, when set)."""
        return phase == "classifier" and (self.robust_rounds == 0 or server_round > self.rounds - self.robust_rounds)

    @property
    def phase_epochs(self) -> dict[str, int]:
        d = self.defense_local_epochs or self.local_epochs
        return {"denoiser": d, "detector": d, "classifier": self.local_epochs}



@dataclass(frozen=True)
class Profile:
    """Everything that fixes the size of a run."""

    name: str
    preprocess: PreprocessConfig
    classifier: ClassifierConfig
    detector: DetectorConfig
    denoiser: DenoiserConfig
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    seed: int = 0

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    @property
    def phases(self) -> tuple[str, ...]:
        """Federated training phases in order.

        MedFedPure trains the denoiser, then the detector (the paper's MAE),
        then the classifier; the MAE phase is skipped when the defense's
        score does not use it (``defense.score = "floor"``, the default).
        """
        if self.federated.method != "medfedpure":
            return ("classifier",)
        return ("denoiser", "detector", "classifier") if self.defense.score == "mae" else ("denoiser", "classifier")


COMPONENTS = ("classifier", "detector", "denoiser")


def _tiny() -> Profile:
    """Tests and smoke runs: the smallest models that still train."""
    return Profile(
        name="tiny",
        preprocess=PreprocessConfig(size=32),
        classifier=ClassifierConfig(
            backbone="resnet18",
            backbone_kwargs={"channels": [8, 16, 32, 64]},
            head_hidden=32,
            gate_hidden=16,
            optim=OptimConfig(epochs=2, batch_size=16, lr=2e-3),
        ),
        detector=DetectorConfig(
            patch=8, enc_depth=2, enc_width=32, enc_heads=2, dec_depth=1, dec_width=32, dec_heads=2,
            optim=OptimConfig(epochs=2, batch_size=16, lr=2e-3, weight_decay=0.05),
        ),
        denoiser=DenoiserConfig(
            base_channels=8, channel_mults=(1, 2, 2, 2), time_dim=32, t_max_train=300,
            optim=OptimConfig(epochs=2, batch_size=16, lr=2e-3),
        ),
        defense=DefenseConfig(steps=2),
        federated=FederatedConfig(sites=3, rounds=2, partition="iid", eval_max=16,
                                  train_attack=AttackConfig(steps=2, step=0.0075),
                                  eval_attack=AttackConfig(steps=3, step=0.005)),
    )


def _edge() -> Profile:
    """The measured profile: 112 px, narrow backbones, a CPU-sized U-Net."""
    return Profile(
        name="edge",
        preprocess=PreprocessConfig(size=112),
        classifier=ClassifierConfig(
            backbone="resnet18",
            backbone_kwargs={"channels": [16, 32, 64, 128]},
            head_hidden=256,
            gate_hidden=64,
            optim=OptimConfig(epochs=30, batch_size=32, lr=2e-3, weight_decay=5e-4),
        ),
        detector=DetectorConfig(
            patch=8, enc_depth=4, enc_width=128, enc_heads=4, dec_depth=2, dec_width=96, dec_heads=4,
            optim=OptimConfig(epochs=30, batch_size=64, lr=1.5e-3, weight_decay=0.05, warmup_epochs=2),
        ),
        denoiser=DenoiserConfig(
            base_channels=16, channel_mults=(1, 2, 4, 4), time_dim=64, t_max_train=300, train_crop=64,
            optim=OptimConfig(epochs=20, batch_size=32, lr=2e-3, weight_decay=0.0, warmup_epochs=1),
        ),
    )


def _paper() -> Profile:
    """The paper's sizes: 224 px, ResNet-18 experts, the paper's epochs."""
    return Profile(
        name="paper",
        preprocess=PreprocessConfig(size=224),
        classifier=ClassifierConfig(
            backbone="resnet18",
            optim=OptimConfig(epochs=15, batch_size=32, lr=1e-3, weight_decay=5e-4),
        ),
        detector=DetectorConfig(optim=OptimConfig(epochs=100, batch_size=64, lr=1.5e-4, weight_decay=0.05)),
        denoiser=DenoiserConfig(optim=OptimConfig(epochs=100, batch_size=32, lr=2e-4, weight_decay=0.0)),
    )


def _demo(tiny: Profile) -> Profile:
    """The embedded default's profile (``make demo``): small models on 64 px phantoms, four sites with
    one scanner profile each, a few rounds; under 5 minutes of training on a 2-core CPU."""
    return replace(
        tiny,
        name="demo",
        preprocess=PreprocessConfig(size=64),
        # The recipe chosen on the sites' own validation scans (benchmarks/results/demo-recipe/README.md): 64 px and
        # a backbone twice as wide as tiny's (the lesions are read, not guessed), a denoiser trained for 4 rounds
        # (its purification keeps a flagged clean scan's diagnosis), each site keeps its batch-norm statistics
        # (its scanner's), more rounds of fewer local epochs, server momentum.
        classifier=replace(tiny.classifier, backbone_kwargs={"channels": [16, 32, 64, 128]}, head_hidden=64,
                           optim=replace(tiny.classifier.optim, lr=3e-3)),
        federated=replace(tiny.federated, method="medfedpure", sites=4, partition="profile", rounds=20, local_epochs=2,
                          defense_rounds=4, defense_local_epochs=2, eval_max=0, eval_every=8, fedbn=True,
                          server_opt="fedavgm", server_momentum=0.5,
                          train_attack=AttackConfig(steps=3, step=0.006), eval_attack=AttackConfig()),
    )


def _profiles() -> dict[str, Profile]:
    tiny = _tiny()
    return {p.name: p for p in (tiny, _demo(tiny), _edge(), _paper())}


PROFILES: dict[str, Profile] = _profiles()


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None


# --------------------------------------------------------------------------- overrides


def _override(obj: Any, values: dict, where: str) -> Any:
    """Return ``obj`` (a dataclass) with ``values`` applied, recursing into nested dataclasses."""
    known = {f.name: f for f in fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise UsageError(f"unknown setting {where}{key!r}; known: {sorted(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"{where}{key} must be a table")
            changes[key] = _override(current, value, f"{where}{key}.")
        elif isinstance(current, tuple) and isinstance(value, list):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return replace(obj, **changes)


def resolve(profile: str | Profile = "edge", overrides: dict | None = None) -> Profile:
    """A profile by name, with a nested dict of overrides applied (as read from TOML)."""
    base = get_profile(profile) if isinstance(profile, str) else profile
    overrides = dict(overrides or {})
    name = overrides.pop("profile", None)
    if name is not None:
        base = get_profile(name)
    return _override(base, overrides, "")


def load_toml(path: str | Path, profile: str | None = None) -> Profile:
    """Read a TOML file of overrides (``profile = "edge"`` picks the base)."""
    with open(path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{path}: not valid TOML ({err})") from None
    if profile is not None and "profile" not in data:
        data["profile"] = profile
    return resolve(data.pop("profile", "edge"), data)


def to_dict(profile: Profile) -> dict:
    """Plain nested dict (tuples as lists) for JSON/TOML and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(profile)))


def from_dict(data: dict) -> Profile:
    """Inverse of :func:`to_dict`."""
    data = dict(data)
    return resolve(data.pop("name"), data)


def dump_toml(profile: Profile) -> str:
    """Serialise a resolved profile as TOML that :func:`load_toml` reads back."""
    data = to_dict(profile)
    lines = [f'profile = "{data.pop("name")}"']
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) or k.endswith("kwargs")}
        lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict) and not k.endswith("kwargs"):
                table(f"{prefix}.{k}", v)

    for k, v in data.items():
        if isinstance(v, dict):
            table(k, v)
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if v is None:
        raise ValueError("TOML has no null; leave the key out")
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def defense_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["t_min=150", "score=floor"]`` -> typed ``DefenseConfig`` field values (for ``--defense`` options)."""
    types = {f.name: f.type for f in fields(DefenseConfig)}
    out: dict[str, Any] = {}
    for item in items or []:
        for part in filter(None, item.split(",")):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in types:
                raise UsageError(f"--defense takes KEY=VALUE with KEY one of {sorted(types)}; got {part!r}")
            kind = {"int": int, "float": float, "str": str}[types[key] if isinstance(types[key], str) else types[key].__name__]
            try:
                out[key] = kind(value.strip())
            except ValueError:
                raise UsageError(f"--defense {key} needs a {kind.__name__}, got {value!r}") from None
    DefenseConfig(**out)  # validate the values on their own
    return out


def with_defense(profile: Profile, overrides: dict[str, Any] | None) -> Profile:
    """``profile`` with its defense settings replaced by ``overrides`` (validated)."""
    return replace(profile, defense=replace(profile.defense, **overrides)) if overrides else profile
