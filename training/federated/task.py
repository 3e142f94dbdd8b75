"""What one site does in a federated round, in plain PyTorch (no Flower here).

The Flower apps (``client_app.py``, ``server_app.py``) only move arrays and
configuration; every computation on scans happens in this module, at the
site that holds them.

- :func:`site_data`: the site's own train / val / test scans. In simulation
  the shared data set is partitioned (``partition``, by seed) and site k keeps
  part k; a real site passes its own folder and uses all of it.
- :func:`build_model` and :func:`shared_keys`: what is averaged across sites
  and what stays at the site (the gates; batch-norm with FedBN; everything
  for ``local``).
- :func:`local_train`: E local epochs of one phase through the one training
  loop (:func:`training.engine.train_one_epoch`), with the method's
  additions: PGD adversarial training on a fraction of each batch (FAT,
  pFedDef), purification of flagged scans (MedFedPure, Algorithm 3 lines
  10-13), a proximal term (FedProx).
- :func:`evaluate_site`: clean and PGD accuracy on the site's test scans;
  for MedFedPure through the whole defense, with tau calibrated on the site's
  own clean validation scans. Beside them balanced accuracy and sensitivity,
  validation figures, and (last round) the site's system on the pooled test
  set of every site's scans (simulation; PROTOCOL.md rule 8).
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from training import config as cfgmod
from training.attacks.pgd import pgd
from training.data.augment import augmentation
from training.data.datasets import SPLITS, Dataset, Split, load_dataset
from training.data.partition import class_shares, partition, partition_like
from training.defense import DefensePipeline, calibrate_tau, detection_scores
from training.diffusion import GaussianDiffusion
from training.engine import batches, channels_last, cosine_lr, make_optimizer, train_one_epoch
from training.metrics import balanced_accuracy, positive_class, sensitivity
from training.models import create_model
from training.models.moe import site_local_keys
from training.objectives import (  # noqa: F401
    AdversarialObjective,
    PurifiedAugmentObjective,
    PurifyingObjective,
    adjusted_log_prior,
    make_objective,
)
from training.train import VAL_METRIC, evaluate


@dataclass
class SiteData:
    site: int
    n_sites: int
    class_names: list[str]
    digest: str
    splits: dict[str, Split]
    # Simulation only: the shared data set's whole ``val`` and ``test`` splits (every site's scans), for the
    # pooled figures of PROTOCOL.md rule 8; None at a real site, which holds its own scans only.
    pooled: dict[str, Split] | None = None

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]


def subset(split: Split, idx: np.ndarray) -> Split:
    return Split(
        split.images[idx], split.labels[idx], split.groups[idx], [split.paths[i] for i in idx],
        None if split.profiles is None else split.profiles[idx],
        None if split.original_sizes is None else split.original_sizes[idx],
    )


@functools.lru_cache(maxsize=4)
def _dataset(source: str, preprocess: cfgmod.PreprocessConfig, seed: int) -> Dataset:
    return load_dataset(source, preprocess, seed=seed, progress=False)


def site_partitions(data: Dataset, profile: cfgmod.Profile) -> dict[str, list[np.ndarray]]:
    """Index arrays per split and site: training by the profile's scheme, val/test following it.

    With the ``profile`` scheme every split is partitioned by scanner profile;
    otherwise val and test are dealt so that each site's label mix follows
    its training share (:func:`partition_like`).
    """
    fed = profile.federated
    tr = data["train"]
    parts = {"train": partition(tr.labels, fed.sites, fed.partition, profile.seed, groups=tr.groups, profiles=tr.profiles)}
    shares = class_shares(parts["train"], tr.labels, len(data.class_names))
    for name in ("val", "test"):
        s = data[name]
        if fed.partition == "profile":
            parts[name] = partition(s.labels, fed.sites, "profile", profile.seed, groups=s.groups, profiles=s.profiles, min_size=1)
        else:
            parts[name] = partition_like(s.labels, shares, profile.seed, groups=s.groups)
    return parts


def site_data(source: str, profile: cfgmod.Profile, site: int | None, n_sites: int | None) -> SiteData:
    """Site ``site``'s part of ``source`` (simulation), or all of it when ``site`` is None (a real site)."""
    data = _dataset(source, profile.preprocess, profile.seed)
    if site is None:
        return SiteData(0, 1, data.class_names, data.digest, dict(data.splits))
    if n_sites != profile.federated.sites:
        raise ValueError(f"{n_sites} simulated sites but the run is configured for {profile.federated.sites}")
    parts = site_partitions(data, profile)
    splits = {s: subset(data[s], parts[s][site]) for s in SPLITS}
    if profile.federated.feature_skew:
        splits = {s: rescan(split, site, profile.seed, s) for s, split in splits.items()}
    # The pooled splits are the raw shared ones, also with ``feature_skew``: every site is then measured on the
    # same scans, as acquired before any site's scanner is simulated (rescanning them per site would make the
    # pooled figure a different test set at every site).
    pooled = {s: data[s] for s in ("val", "test")}
    return SiteData(site, n_sites, data.class_names, data.digest, splits, pooled)


SKEW_SCANNERS = ("A", "B", "C", "D")


def rescan(split: Split, site: int, seed: int, name: str) -> Split:
    """``split`` as site ``site``'s scanner would have acquired it (``feature_skew``; seeded per scan)."""
    from training.data.phantom import SCANNER_PROFILES, acquire

    scanner = SCANNER_PROFILES[SKEW_SCANNERS[site % len(SKEW_SCANNERS)]]
    images = np.empty_like(split.images)
    for i, img in enumerate(split.images):
        rng = np.random.default_rng(zlib.crc32(f"rescan/{seed}/{site}/{name}/{i}".encode()))
        images[i] = acquire(rng, img.astype(np.float32), scanner)
    return replace(split, images=images, profiles=np.full(len(split), scanner.name))


# --------------------------------------------------------------------------- models and what is shared


def classifier_profile(profile: cfgmod.Profile) -> cfgmod.Profile:
    """``fedavg`` and ``fat`` train one backbone (a mixture of one expert is that backbone)."""
    if profile.federated.method in ("fedavg", "fat"):
        return replace(profile, classifier=replace(profile.classifier, num_experts=1))
    return profile


def build_model(phase: str, profile: cfgmod.Profile) -> nn.Module:
    torch.manual_seed(profile.seed)  # identical initialisation at every site
    if phase == "classifier":
        return create_model("classifier", classifier_profile(profile))
    return create_model(phase, profile)


def local_keys(phase: str, model: nn.Module, profile: cfgmod.Profile) -> set[str]:
    """State-dict keys that never leave the site in this phase."""
    fed = profile.federated
    keys = set(model.state_dict())
    if fed.method == "local":
        return keys
    bn_local = fed.fedbn or (phase == "classifier" and bn_kept_local(fed))
    if phase != "classifier" or fed.method in ("fedavg", "fat"):
        # One expert: its single gate weight is the constant 1, nothing to personalise.
        return site_local_keys(model, keep_bn_local=True) - _gate_keys(keys) if bn_local else set()
    return site_local_keys(model, keep_bn_local=bn_local)


def bn_kept_local(fed: cfgmod.FederatedConfig) -> bool:
    """Batch-norm stays at the sites with FedBN, with OptiGradTrust (its design) and with Fed-Safe noise.

    Batch-norm running statistics are computed from the scans; under
    ``dp_sigma`` > 0 they would leave the site without noise, so they stay.
    """
    return fed.fedbn or fed.aggregation == "optigradtrust" or fed.dp_sigma > 0


def _gate_keys(keys) -> set[str]:
    return {k for k in keys if k.startswith("gates.")}


def shared_keys(phase: str, model: nn.Module, profile: cfgmod.Profile) -> list[str]:
    local = local_keys(phase, model, profile)
    return [k for k in model.state_dict() if k not in local]


def root_set(source: str, profile: cfgmod.Profile) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The server's root set: ``root_size`` clean training scans, half of each class where possible (seeded).

    In simulation it is drawn from the shared training split, so these scans
    also stay in the sites' data (the server is assumed to have obtained a
    small clean sample of the same distribution; docs/training-defenses.md).
    """
    data = _dataset(source, profile.preprocess, profile.seed)
    tr = data["train"]
    n = min(profile.federated.root_size, len(tr))
    rng = np.random.default_rng(profile.seed + 31337)
    classes = np.unique(tr.labels)
    per = [rng.permutation(np.flatnonzero(tr.labels == c)) for c in classes]
    take = [p[: n // len(classes)] for p in per]
    idx = np.concatenate(take)
    rest = np.setdiff1d(np.arange(len(tr)), idx)
    idx = np.sort(np.concatenate([idx, rng.permutation(rest)[: n - len(idx)]]))
    return tr.images[idx], tr.labels[idx], data.class_names


# --------------------------------------------------------------------------- local training


def classifier_objective(profile: cfgmod.Profile, defense: DefensePipeline | None = None, labels=None,
                         server_round: int | None = None):
    """The classifier's local objective for the run's method (see ``FederatedConfig``).

    ``labels``: the site's training labels, for logit adjustment (``classifier.logit_adjust``).
    ``server_round``: with ``robust_rounds``, the rounds before the robust ones train on clean scans only.
    """
    fed, d, c = profile.federated, profile.defense, profile.classifier
    objective = make_objective("classifier", classifier_profile(profile))
    if labels is not None and c.logit_adjust > 0:
        objective = replace(objective, log_prior=adjusted_log_prior(labels, c.num_classes, c.logit_adjust))
    if server_round is not None and not fed.robust("classifier", server_round):
        return objective
    if fed.method in ("fat", "pfeddef") and fed.adv_fraction > 0:
        return AdversarialObjective(objective, fed.train_attack, fed.adv_fraction)
    if fed.method != "medfedpure":
        return objective
    if defense is not None and fed.purify_fraction > 0:
        objective = PurifiedAugmentObjective(objective, defense.denoiser, defense.diffusion, fed.purify_fraction,
                                             d.t_min, d.t_max, d.steps)
    if defense is not None and fed.purify_train:
        objective = PurifyingObjective(objective, defense)
    if fed.adv_fraction > 0 and (fed.adversarial or (defense is not None and fed.purify_fraction > 0)):
        if fed.through_purifier and defense is None:
            raise ValueError("through_purifier: the site has no denoiser to craft the examples through")
        through = (defense.denoiser, defense.diffusion, d.t_min, d.t_max, d.steps) if fed.through_purifier else None
        objective = AdversarialObjective(objective, fed.train_attack, fed.adv_fraction, through, fed.textured_fraction)
    return objective


def proximal_term(model: nn.Module, reference: dict[str, torch.Tensor], mu: float):
    """``extra_loss`` for FedProx: mu/2 * ||w - w_global||^2 over the shared parameters."""
    params = [(p, reference[n]) for n, p in model.named_parameters() if n in reference]

    def term(_model):
        return 0.5 * mu * sum((p - r).pow(2).sum() for p, r in params)

    return term


OPTIM_PREFIX = "optim/"  # the site's optimizer moments among its personal arrays: optim/<parameter>/<slot>


def optimizer_arrays(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat named arrays (``optim/<parameter>/<slot>``)."""
    out = {}
    for name, p in model.named_parameters():
        for slot, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{OPTIM_PREFIX}{name}/{slot}"] = v.detach().clone()
    return out


def load_optimizer_arrays(model: nn.Module, optimizer: torch.optim.Optimizer, arrays: dict[str, torch.Tensor]) -> int:
    """Give ``optimizer`` the per-parameter state saved by :func:`optimizer_arrays`; returns the parameters restored."""
    slots: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in arrays.items():
        if key.startswith(OPTIM_PREFIX):
            name, slot = key[len(OPTIM_PREFIX):].rsplit("/", 1)
            slots.setdefault(name, {})[slot] = v.clone()
    n = 0
    for name, p in model.named_parameters():
        st = slots.get(name)
        if st and all(t.shape == p.shape for k, t in st.items() if k != "step"):
            optimizer.state[p] = st
            n += 1
    return n


def _run_schedule(phase: str, profile: cfgmod.Profile, n_train: int, server_round: int):
    """(lr_at, first step of this round): one cosine schedule over the phase's whole run, as centrally.

    With ``robust_rounds`` the classifier's last rounds have a schedule of their own (from
    ``robust_lr_scale`` x the rate, no warm-up) and the rounds before them one over those rounds only."""
    fed, opt = profile.federated, getattr(profile, phase).optim
    steps_per_epoch = max(1, math.ceil(n_train / opt.batch_size))
    epochs = fed.phase_epochs[phase]
    rounds, first, lr = fed.phase_rounds[phase], 1, opt.lr
    warmup = max(1, int(opt.warmup_epochs * steps_per_epoch))
    if phase == "classifier" and fed.robust_rounds:
        clean = fed.rounds - fed.robust_rounds
        if fed.robust(phase, server_round):
            rounds, first, lr, warmup = fed.robust_rounds, clean + 1, opt.lr * fed.robust_lr_scale, 0
        else:
            rounds = clean
    total = rounds * epochs * steps_per_epoch
    return (lambda step: cosine_lr(step, total, warmup, lr)), (server_round - first) * epochs * steps_per_epoch


def local_train(
    phase: str,
    model: nn.Module,
    data: SiteData,
    profile: cfgmod.Profile,
    server_round: int,
    *,
    defense: DefensePipeline | None = None,
    global_shared: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    correction=None,
    progress: bool = False,
) -> dict:
    """E local epochs of ``phase`` on the site's training scans; returns mean metrics and sample count.

    ``optimizer_state`` (``keep_optimizer_state``): the optimizer starts from
    these arrays (the site's moments after its previous round) and the dict is
    replaced in place by the moments after this round. ``correction``: called
    on the model after every backward pass (SCAFFOLD's
    :class:`~training.federated.scaffold.ScaffoldCorrection`).
    """
    fed = profile.federated
    opt = getattr(profile, phase).optim
    epochs = fed.phase_epochs[phase]
    train = data["train"]
    lr_at, start = _run_schedule(phase, profile, len(train), server_round)
    objective = (classifier_objective(profile, defense, train.labels, server_round) if phase == "classifier"
                 else make_objective(phase, profile))
    extra = proximal_term(model, global_shared, fed.proximal_mu) if fed.proximal_mu > 0 and global_shared else None
    optimizer = make_optimizer(model.parameters(), opt)
    if optimizer_state:
        load_optimizer_arrays(model, optimizer, optimizer_state)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{profile.seed}/{phase}/{data.site}/{server_round}".encode()))
    bs = min(opt.batch_size, len(train))
    sums: dict[str, float] = {}
    step, seen = start, 0
    warmup = phase == "classifier" and server_round <= fed.gate_warmup_rounds and hasattr(model, "uniform_mixing")
    augment = augmentation(profile, phase)
    # gate warm-up: the gates left as they are
    with model.uniform_mixing() if warmup else contextlib.nullcontext(), channels_last(model, phase == "classifier"):
        for epoch in range(epochs):
            stats = train_one_epoch(
                model, batches(train.images, train.labels, bs, True, generator, drop_last=True),
                objective, optimizer, generator=generator, augment=augment, lr_at=lr_at, start_step=step,
                grad_clip=opt.grad_clip, extra_loss=extra, after_backward=correction, progress=progress,
                desc=f"site {data.site} {phase} r{server_round} e{epoch + 1}/{epochs}",
            )
            step += stats["steps"]
            seen += stats["samples"]
            for k, v in stats.items():
                if k not in ("steps", "samples", "seconds"):
                    sums[k] = sums.get(k, 0.0) + v * stats["samples"]
            sums["seconds"] = sums.get("seconds", 0.0) + stats["seconds"]
    out = {k: (v if k == "seconds" else v / max(seen, 1)) for k, v in sums.items()}
    out["num-examples"] = len(train)
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(optimizer_arrays(model, optimizer))
    return out


# --------------------------------------------------------------------------- batch-norm statistics


@torch.no_grad()
def bn_statistics(model: nn.Module, split: Split, keys: set[str] | list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The batch-norm layers' statistics on ``split`` (those whose buffers are among ``keys``).

    The model runs in training mode over the scans in order (no augmentation),
    as batch-norm does when it trains, and each layer averages the batch means
    and variances it sees: ``<layer>.running_mean`` and ``<layer>.running_var``.
    Nothing else in ``model`` changes.
    """
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{n}.running_mean" in keys}
    if not layers or len(split) == 0:
        return {}
    saved = {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
             for n, m in layers.items()}
    was_training = model.training
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for x, _ in batches(split.images, split.labels, batch_size, False):
        model(x)
    out = {}
    for n, m in layers.items():
        out[f"{n}.running_mean"], out[f"{n}.running_var"] = m.running_mean.clone(), m.running_var.clone()
        m.running_mean.copy_(saved[n][0])
        m.running_var.copy_(saved[n][1])
        m.num_batches_tracked.copy_(saved[n][2])
        m.momentum = saved[n][3]
    model.train(was_training)
    return out


def combine_bn_statistics(parts: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The pooled statistics of the sites' ``(scans, bn_statistics)``: the mean of the means, and the
    mean of the variances plus the variance of the means (the law of total variance), weighted by scans."""
    parts = [(n, st) for n, st in parts if n > 0 and st]
    if not parts:
        return {}
    total = float(sum(n for n, _ in parts))
    out = {}
    for key in parts[0][1]:
        if not key.endswith(".running_mean"):
            continue
        layer = key[: -len(".running_mean")]
        mean = sum(n * st[key] for n, st in parts) / total
        second = sum(n * (st[f"{layer}.running_var"] + st[key] ** 2) for n, st in parts) / total
        out[key], out[f"{layer}.running_var"] = mean, (second - mean**2).clamp_min(0.0)
    return out


# --------------------------------------------------------------------------- evaluation


def make_defense(classifier, detector, denoiser, profile: cfgmod.Profile, val: Split) -> DefensePipeline:
    """The site's pipeline, tau calibrated on its own clean validation scans."""
    if len(val) == 0:
        raise ValueError("the site has no validation scans to calibrate the detector threshold on")
    d = profile.detector
    scores = detection_scores(detector, val.images, profile.defense, d.mask_ratio, d.mask_seed)
    tau = calibrate_tau(scores, profile.defense.flag_rate)
    return DefensePipeline(classifier, detector, denoiser, GaussianDiffusion.from_config(profile.denoiser), tau,
                           profile.defense, d.mask_ratio, d.mask_seed).eval()


CLINICAL_KEYS = ("clean_balanced_acc", "clean_sensitivity", "pgd_balanced_acc", "val_acc", "val_balanced_acc",
                 "pooled_val_balanced_acc", "pooled_acc", "pooled_balanced_acc", "pooled_sensitivity")


@torch.no_grad()
def predict_clean(model: nn.Module, defense: DefensePipeline | None, split: Split, generator: torch.Generator,
                  batch_size: int = 64) -> np.ndarray:
    """Predicted classes ``[N]`` of ``split``'s clean scans: through ``defense`` when given, else ``model`` alone."""
    preds = [(defense.run(x, generator)["probs"] if defense is not None else model(x)).argmax(1).numpy()
             for x, _ in batches(split.images, split.labels, batch_size, False)]
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def _score_batch(model: nn.Module, defense: DefensePipeline | None, x: torch.Tensor, x_adv: torch.Tensor,
                 y: torch.Tensor, g: torch.Generator, hits: dict, preds: dict) -> None:
    """Add one batch's clean and attacked hits, flags and predictions to ``hits`` and ``preds``."""
    clean_cls, adv_cls = model(x).argmax(1), model(x_adv).argmax(1)
    hits["clean_acc_classifier"] += int((clean_cls == y).sum())
    hits["pgd_acc_classifier"] += int((adv_cls == y).sum())
    if defense is not None:
        for name, xs in (("clean", x), ("pgd", x_adv)):
            res = defense.run(xs, g)
            pred = res["probs"].argmax(1)
            hits[f"{name}_acc"] += int((pred == y).sum())
            hits[f"flag_rate_{name}"] += int(res["flagged"].sum())
            preds[name].append(pred.numpy())
    else:
        preds["clean"].append(clean_cls.numpy())
        preds["pgd"].append(adv_cls.numpy())


def _test_figures(model: nn.Module, data: SiteData, profile: cfgmod.Profile, defense: DefensePipeline | None,
                  n: int, batch_size: int, pos: int) -> dict:
    """Clean and PGD accuracy (with the defense: flag rates and tau) and clinical figures on ``n`` test scans."""
    test = data["test"]
    g = torch.Generator().manual_seed(profile.seed + 7919 * data.site)
    hits = {"clean_acc": 0, "pgd_acc": 0, "clean_acc_classifier": 0, "pgd_acc_classifier": 0,
            "flag_rate_clean": 0, "flag_rate_pgd": 0}
    preds: dict[str, list[np.ndarray]] = {"clean": [], "pgd": []}
    labels: list[np.ndarray] = []
    idx = np.random.default_rng(0).permutation(len(test))[:n]  # a sample of both classes (splits list by class)
    for x, y in batches(test.images[idx], test.labels[idx], batch_size, False):
        x_adv = pgd(model, x, y, profile.federated.eval_attack, g)
        labels.append(y.numpy())
        _score_batch(model, defense, x, x_adv, y, g, hits, preds)
    if defense is None:
        hits["clean_acc"], hits["pgd_acc"] = hits["clean_acc_classifier"], hits["pgd_acc_classifier"]
        del hits["flag_rate_clean"], hits["flag_rate_pgd"]
    out = {k: v / n for k, v in hits.items()}
    if defense is not None:
        out["tau"] = defense.tau
    y_all = np.concatenate(labels)
    clean_pred, pgd_pred = np.concatenate(preds["clean"]), np.concatenate(preds["pgd"])
    out["clean_balanced_acc"] = balanced_accuracy(y_all, clean_pred)
    out["clean_sensitivity"] = sensitivity(y_all, clean_pred, pos)
    out["pgd_balanced_acc"] = balanced_accuracy(y_all, pgd_pred)
    return out


def _clean_figures(model: nn.Module, data: SiteData, profile: cfgmod.Profile, defense: DefensePipeline | None,
                   pooled: bool, pos: int) -> dict:
    """Clean-scan figures: the site's validation split, the pooled validation split, and with ``pooled`` the pooled test split.

    Each set has its own seeded generator, so that the test figures do not
    depend on whether these are computed.
    """
    out: dict = {}
    seed = profile.seed + 7919 * data.site
    val = data["val"]
    if len(val):
        pred = predict_clean(model, defense, val, torch.Generator().manual_seed(seed + 1))
        out["val_acc"] = float((pred == val.labels).mean())
        out["val_balanced_acc"] = balanced_accuracy(val.labels, pred)
    if data.pooled is not None and len(data.pooled["val"]):
        pv = data.pooled["val"]
        pred = predict_clean(model, defense, pv, torch.Generator().manual_seed(seed + 2))
        out["pooled_val_balanced_acc"] = balanced_accuracy(pv.labels, pred)
    if pooled and data.pooled is not None and len(data.pooled["test"]):
        pt = data.pooled["test"]
        pred = predict_clean(model, defense, pt, torch.Generator().manual_seed(seed + 3))
        out["pooled_acc"] = float((pred == pt.labels).mean())
        out["pooled_balanced_acc"] = balanced_accuracy(pt.labels, pred)
        out["pooled_sensitivity"] = sensitivity(pt.labels, pred, pos)
    return out


def evaluate_site(
    model: nn.Module, data: SiteData, profile: cfgmod.Profile, defense: DefensePipeline | None = None,
    batch_size: int = 32, *, pooled: bool = False,
) -> dict:
    """Clean and paper-setting PGD accuracy on the site's test scans (capped at ``eval_max``), and clinical figures.

    The attack is PGD on the site's classifier (PROTOCOL.md, paper setting);
    with a ``defense`` the clean and adversarial scans then go through the
    whole pipeline, and the classifier-only figures are reported beside.

    Beside accuracy (PROTOCOL.md rule 8): balanced accuracy and sensitivity
    (tumor recall) on the same test scans; ``val_acc`` / ``val_balanced_acc``
    on the site's own clean validation scans and ``pooled_val_balanced_acc``
    on the pooled validation split (for choosing recipes, rule 10); and with
    ``pooled=True`` (the phase's last round) ``pooled_acc``,
    ``pooled_balanced_acc``, ``pooled_sensitivity`` of the site's system on
    every scan of the pooled test split (no ``eval_max`` cap). Every key is
    always present (NaN when not computed): Flower checks that replies agree.
    """
    fed = profile.federated
    test = data["test"]
    pos = positive_class(data.class_names)
    n = len(test) if fed.eval_max <= 0 else min(len(test), fed.eval_max)
    model.eval()
    out: dict = {k: float("nan") for k in CLINICAL_KEYS}
    if n == 0:  # the same keys as always (Flower checks replies agree), no invented figure
        keys = ["clean_acc", "pgd_acc", "clean_acc_classifier", "pgd_acc_classifier"]
        keys += ["flag_rate_clean", "flag_rate_pgd", "tau"] if defense is not None else []
        out.update({k: float("nan") for k in keys})
    else:
        out.update(_test_figures(model, data, profile, defense, n, batch_size, pos))
    out.update(_clean_figures(model, data, profile, defense, pooled, pos))
    out["num-examples"] = n
    return out


def evaluate_phase(phase: str, model: nn.Module, data: SiteData, profile: cfgmod.Profile) -> dict:
    """Validation figure of a defense phase on the site's clean validation scans."""
    val = data["val"]
    if len(val) == 0:
        return {VAL_METRIC[phase][0]: float("nan"), "num-examples": 0}
    out = evaluate(phase, model, val, profile)
    out["num-examples"] = len(val)
    return out
