"""Centralised training of one component, with resume, history and checkpoints.

Layout of a run folder::

    RUN/config.toml                 resolved configuration
    RUN/<component>/last.pt         latest epoch (resumable)
    RUN/<component>/best.pt         best on the validation split
    RUN/<component>/history.jsonl   one line of metrics per epoch
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from training import config as cfgmod
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data.augment import augmentation
from training.data.datasets import Dataset, Split
from training.diffusion import GaussianDiffusion
from training.engine import (
    batches,
    channels_last,
    cosine_lr,
    make_optimizer,
    predict,
    train_one_epoch,
)
from training.models import create_model
from training.models.mae import complementary_masks
from training.objectives import DenoiserObjective, make_objective

# Validation metric per component and whether larger is better.
VAL_METRIC = {"classifier": ("val_acc", True), "detector": ("val_score", False), "denoiser": ("val_eps_mse", False)}


@torch.no_grad()
def mae_errors(model, images: np.ndarray, profile: cfgmod.Profile, batch_size: int = 64) -> np.ndarray:
    """The MAE's deterministic reconstruction errors ``[N]`` over the profile's complementary masks.

    This is the detector's own validation metric; the defense's detection
    score (which may be another statistic) is :func:`training.defense.detection_scores`.
    """
    model.eval()
    d = profile.detector
    masks, resp = complementary_masks(model.num_patches, d.mask_ratio, d.mask_seed)
    out = [model.score(x, masks, resp) for x, _ in batches(images, np.zeros(len(images)), batch_size, False)]
    return torch.cat(out).numpy()


@torch.no_grad()
def denoiser_val_loss(model, split: Split, profile: cfgmod.Profile, batch_size: int = 32) -> float:
    """Epsilon MSE on validation scans with fixed timesteps and noise (comparable across epochs)."""
    model.eval()
    d = profile.denoiser
    obj = DenoiserObjective(GaussianDiffusion.from_config(d), d.t_max_train or d.num_steps)
    g = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    for x, y in batches(split.images, split.labels, batch_size, False):
        loss, _ = obj(model, x, y, g)
        total, n = total + loss.item() * len(x), n + len(x)
    return total / max(n, 1)


def evaluate(component: str, model, split: Split, profile: cfgmod.Profile) -> dict:
    if component == "classifier":
        probs = predict(model, split.images)
        return {"val_acc": float((probs.argmax(1).numpy() == split.labels).mean())}
    if component == "detector":
        return {"val_score": float(mae_errors(model, split.images, profile).mean())}
    return {"val_eps_mse": denoiser_val_loss(model, split, profile)}


def _optim_cfg(component: str, profile: cfgmod.Profile) -> cfgmod.OptimConfig:
    return getattr(profile, component).optim


def _lr_schedule(opt_cfg: cfgmod.OptimConfig, epochs: int, n_train: int):
    """``lr_at(step)``: warmup then cosine decay over ``epochs`` of ``n_train`` scans."""
    steps_per_epoch = math.ceil(n_train / opt_cfg.batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, int(opt_cfg.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        return cosine_lr(step, total, warmup, opt_cfg.lr)

    return lr_at


def _resume(last: Path, component: str, profile: cfgmod.Profile, data: Dataset, model, optimizer, generator,
            epochs: int, log) -> tuple[int, int, float | None, list]:
    """Load ``last`` into the model, optimizer and generator; (epoch, step, best, history) it ended at."""
    ck = load_checkpoint(last)
    if cfgmod.from_dict(ck["config"]) != profile or ck["split_digest"] != data.digest:
        raise cfgmod.UsageError(f"{last} was trained with another configuration or data split; use a new --out or --no-resume")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    generator.set_state(ck["generator"])
    log(f"[{component}] resuming after epoch {ck['epoch']}/{epochs}")
    return ck["epoch"], ck["step"], ck["best"], ck["history"]


def _save_epoch(out: Path, component: str, profile: cfgmod.Profile, data: Dataset, model, optimizer, generator,
                row: dict, step: int, best, history: list, improved: bool) -> None:
    """``history.jsonl`` gets ``row``; ``last.pt`` (and ``best.pt`` when ``improved``) the epoch's state."""
    with open(out / "history.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    payload = dict(
        component=component, model=model.state_dict(), config=cfgmod.to_dict(profile), split_digest=data.digest,
        class_names=data.class_names, metrics=row, epoch=row["epoch"], step=step, best=best, history=history,
    )
    if improved:
        save_checkpoint(out / "best.pt", **payload)
    save_checkpoint(out / "last.pt", **payload, optimizer=optimizer.state_dict(), generator=generator.get_state())


def train_component(
    component: str,
    profile: cfgmod.Profile,
    data: Dataset,
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    resume: bool = True,
    progress: bool = True,
    log=print,
) -> dict:
    """Train ``component`` on ``data['train']``, validate on ``data['val']``; returns a summary dict."""
    out = Path(out_dir) / component
    out.mkdir(parents=True, exist_ok=True)
    opt_cfg = _optim_cfg(component, profile)
    epochs = epochs if epochs is not None else opt_cfg.epochs
    torch.manual_seed(profile.seed)
    model = create_model(component, profile)
    optimizer = make_optimizer(model.parameters(), opt_cfg)
    generator = torch.Generator().manual_seed(profile.seed)
    objective = make_objective(component, profile)
    augment = augmentation(profile, component)
    train, val = data["train"], data["val"]
    lr_at = _lr_schedule(opt_cfg, epochs, len(train))
    start_epoch, step, best, history = 0, 0, None, []
    if resume and (out / "last.pt").exists():
        start_epoch, step, best, history = _resume(out / "last.pt", component, profile, data, model, optimizer,
                                                   generator, epochs, log)
    metric, larger = VAL_METRIC[component]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{component}] {profile.name} profile, {n_params / 1e6:.2f} M parameters, {len(train)} train / {len(val)} val scans")
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        with channels_last(model, component == "classifier"):
            stats = train_one_epoch(
                model, batches(train.images, train.labels, opt_cfg.batch_size, True, generator, drop_last=True),
                objective, optimizer, generator=generator, augment=augment, lr_at=lr_at, start_step=step,
                grad_clip=opt_cfg.grad_clip, desc=f"{component} {epoch + 1}/{epochs}", progress=progress,
            )
        step += stats["steps"]
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()}, "train_seconds": stats["seconds"]}
        if (epoch + 1) % opt_cfg.eval_every == 0 or epoch + 1 == epochs:
            row.update(evaluate(component, model, val, profile))
        row["epoch_seconds"] = time.perf_counter() - t0
        history.append(row)
        improved = metric in row and (best is None or (row[metric] > best if larger else row[metric] < best))
        if improved:
            best = row[metric]
        _save_epoch(out, component, profile, data, model, optimizer, generator, row, step, best, history, improved)
        shown = ", ".join(f"{k}={row[k]:.4f}" for k in ("train_loss", metric) if k in row)
        log(f"[{component}] epoch {epoch + 1}/{epochs} {shown} ({row['epoch_seconds']:.0f} s)")
    return {"component": component, "epochs": epochs, "best": best, "history": history, "dir": str(out)}


def load_trained(component: str, run_dir: str | Path, which: str = "best"):
    """(model in eval mode, profile, checkpoint) of a trained component."""
    ck = load_checkpoint(Path(run_dir) / component / f"{which}.pt")
    profile = cfgmod.from_dict(ck["config"])
    model = create_model(component, profile)
    model.load_state_dict(ck["model"])
    return model.eval(), profile, ck
