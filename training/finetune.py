"""Adapt a trained classifier to the purifier in front of it (purification-consistent fine-tuning).

A purified scan is not a clean scan: the one-shot or few-step reverse
diffusion smooths texture, and a classifier trained only on clean scans
reads some purified "no" scans as "yes". This fine-tuning shows the
classifier, in every batch,

- PGD examples (``adv_fraction`` of the batch, crafted on the current
  classifier, as in FAT / pFedDef), and
- purified scans (``purify_fraction`` of the batch, adversarial or clean,
  each purified from a t* drawn uniformly from the defense's
  ``[t_min, t_max]`` with the defense's number of steps),

so that what the pipeline feeds it after purification is in its training
distribution. Only training scans are used; the checkpoint is chosen on
validation scans, never on test: the mean of clean accuracy and accuracy
through the same purification (every validation scan purified at the middle
of the t* range, fixed noise), or the purified accuracy alone when the
defense purifies every scan (``mode = "always"``). ``--keep last`` keeps the
last epoch instead, for a choice made afterwards on validation scans by
another measure (the attack suite's, ``evaluate --threat suite --split val``).

``--through-purifier`` crafts the PGD examples through the purification
itself (:class:`training.objectives.PurifiedClassifier`: exact gradients
through the denoiser, a fresh t* and noise at every step), i.e. against an
attacker who knows the purifier, instead of on the classifier alone.
``--textured-fraction F``: a fraction F of those examples perturb only the
textured pixels (the flattest fifth and their neighbours left alone), as the
suite's ``adaptive-textured`` attacker does.

``python -m training finetune --run RUN --out RUN2 [--epochs 3] [--defense KEY=VALUE]``
writes a new run folder: the fine-tuned classifier, the same detector and
denoiser (copied), the defense settings used, and the data record. It is
evaluated and exported like any run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from training import config as cfgmod
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data.augment import augmentation
from training.data.datasets import Split
from training.diffusion import GaussianDiffusion, purify
from training.engine import batches, channels_last, cosine_lr, make_optimizer, train_one_epoch
from training.models import create_model
from training.objectives import AdversarialObjective, PurifiedAugmentObjective, make_objective


@torch.no_grad()
def purified_val_accuracy(model, denoiser, diffusion, split: Split, t: int, steps: int, batch_size: int = 64,
                          purified_only: bool = False) -> dict:
    """Clean and purified (all scans at ``t``, fixed noise) validation accuracy.

    ``val_score``, the selection figure: their mean, or the purified accuracy alone when ``purified_only`` (a
    defense that purifies every scan never shows the classifier an unpurified one).
    """
    model.eval()
    g = torch.Generator().manual_seed(0)
    hits_clean = hits_pur = 0
    for i in range(0, len(split), batch_size):
        x = torch.as_tensor(split.images[i : i + batch_size])[:, None].float()
        y = torch.as_tensor(split.labels[i : i + batch_size]).long()
        hits_clean += int((model(x).argmax(1) == y).sum())
        xp = purify(denoiser, diffusion, x, t, steps or None, None, g)
        hits_pur += int((model(xp).argmax(1) == y).sum())
    n = max(len(split), 1)
    return {"val_acc": hits_clean / n, "val_acc_purified": hits_pur / n,
            "val_score": hits_pur / n if purified_only else 0.5 * (hits_clean + hits_pur) / n}


def _checked_profile(run: Path, out: Path, defense: dict | None, epochs: int, adv_fraction: float,
                     purify_fraction: float) -> cfgmod.Profile:
    """The run's profile with ``defense`` applied, once the run, ``out`` and the fractions are checked."""
    if not (run / "config.toml").exists():
        raise FileNotFoundError(f"{run}: not a run folder (no config.toml)")
    if (run / "sites").is_dir():
        raise cfgmod.UsageError(f"{run} is a federated run; fine-tune its sites with the federated options instead")
    profile = cfgmod.with_defense(cfgmod.load_toml(run / "config.toml"), defense)
    needed = ("classifier", "denoiser") + (("detector",) if profile.defense.score == "mae" else ())
    for comp in needed:  # the MAE only where the detection score is its reconstruction error
        if not (run / comp / "best.pt").exists():
            raise FileNotFoundError(f"{run / comp / 'best.pt'} is missing; train the run first")
    if out.exists() and any(out.iterdir()):
        raise cfgmod.UsageError(f"{out} exists and is not empty; choose a new --out")
    if not 0.0 <= adv_fraction <= 1.0 or not 0.0 <= purify_fraction <= 1.0 or epochs < 1:
        raise cfgmod.UsageError("adv_fraction and purify_fraction must be in [0, 1], epochs >= 1")
    return profile


def _load_models(run: Path, profile: cfgmod.Profile):
    """(classifier, frozen denoiser, diffusion) of the run's best checkpoints."""
    ck = load_checkpoint(run / "classifier" / "best.pt")
    model = create_model("classifier", profile)
    model.load_state_dict(ck["model"])
    dck = load_checkpoint(run / "denoiser" / "best.pt")
    denoiser = create_model("denoiser", profile)
    denoiser.load_state_dict(dck["model"])
    denoiser.eval().requires_grad_(False)
    return model, denoiser, GaussianDiffusion.from_config(profile.denoiser)


def _start_run_folder(run: Path, out: Path, profile: cfgmod.Profile, record: dict) -> Path:
    """``out`` with the run's detector and denoiser, its config, data record and ``finetune.json``; the classifier folder."""
    out.mkdir(parents=True, exist_ok=True)
    for comp in ("denoiser", "detector"):
        if (run / comp / "best.pt").exists():
            (out / comp).mkdir(exist_ok=True)
            shutil.copy2(run / comp / "best.pt", out / comp / "best.pt")
    (out / "config.toml").write_text(cfgmod.dump_toml(profile))
    (out / "data.txt").write_text((run / "data.txt").read_text())
    (out / "finetune.json").write_text(json.dumps(record, indent=1))
    cdir = out / "classifier"
    cdir.mkdir(exist_ok=True)
    return cdir


def _save_best(cdir: Path, model, profile: cfgmod.Profile, data, row: dict, epoch: int, step: int, best: float,
               history: list) -> None:
    save_checkpoint(cdir / "best.pt", component="classifier", model=model.state_dict(), config=cfgmod.to_dict(profile),
                    split_digest=data.digest, class_names=data.class_names, metrics=row, epoch=epoch, step=step,
                    best=best, history=history)


def _finetune_epochs(model, objective, denoiser, diffusion, data, profile: cfgmod.Profile, cdir: Path, *,
                     epochs: int, lr_scale: float, t_val: int, progress: bool, log,
                     keep: str = "best") -> tuple[dict, float, list]:
    """Fine-tune for ``epochs``, keeping the best on purified validation (or the last epoch's, ``keep="last"``);
    (before, kept score, history)."""
    train, val, steps = data["train"], data["val"], profile.defense.steps
    opt_cfg = profile.classifier.optim
    lr = opt_cfg.lr * lr_scale
    optimizer = make_optimizer(model.parameters(), opt_cfg, lr)
    generator = torch.Generator().manual_seed(profile.seed + 7)
    total = epochs * math.ceil(len(train) / opt_cfg.batch_size)

    def lr_at(step: int) -> float:
        return cosine_lr(step, total, 0, lr)

    purified_only = profile.defense.mode == "always"
    before = purified_val_accuracy(model, denoiser, diffusion, val, t_val, steps, purified_only=purified_only)
    log(f"[finetune] before: val clean {before['val_acc']:.4f}, purified at t={t_val} {before['val_acc_purified']:.4f}")
    best, step, history = before["val_score"], 0, [{"epoch": 0, **before}]
    _save_best(cdir, model, profile, data, history[0], 0, 0, best, history)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        with channels_last(model):
            stats = train_one_epoch(
                model, batches(train.images, train.labels, opt_cfg.batch_size, True, generator, drop_last=True),
                objective, optimizer, generator=generator, augment=augmentation(profile, "classifier"), lr_at=lr_at, start_step=step,
                grad_clip=opt_cfg.grad_clip, desc=f"finetune {epoch + 1}/{epochs}", progress=progress,
            )
        step += stats["steps"]
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()},
               **purified_val_accuracy(model, denoiser, diffusion, val, t_val, steps, purified_only=purified_only),
               "epoch_seconds": time.perf_counter() - t0}
        history.append(row)
        with open(cdir / "history.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        improved = row["val_score"] > best or keep == "last"
        if improved:
            best = row["val_score"]
            _save_best(cdir, model, profile, data, row, epoch + 1, step, best, history)
        log(f"[finetune] epoch {epoch + 1}/{epochs}: val clean {row['val_acc']:.4f}, purified {row['val_acc_purified']:.4f}"
            f"{' (best)' if improved else ''} ({row['epoch_seconds']:.0f} s)")
    return before, best, history


def finetune_classifier(run: str | Path, out: str | Path, *, epochs: int = 3, lr_scale: float = 0.25,
                        adv_fraction: float = 0.5, purify_fraction: float = 0.5,
                        attack: cfgmod.AttackConfig | None = None, defense: dict | None = None,
                        through_purifier: bool = False, textured_fraction: float = 0.0, keep: str = "best",
                        source: str | None = None, progress: bool = True, log=print) -> dict:
    from training.federated import task
    from training.runs import read_source

    run, out = Path(run), Path(out)
    profile = _checked_profile(run, out, defense, epochs, adv_fraction, purify_fraction)
    if keep not in ("best", "last"):
        raise cfgmod.UsageError(f"keep must be 'best' or 'last', got {keep!r}")
    if textured_fraction > 0 and adv_fraction == 0:
        raise cfgmod.UsageError("textured_fraction needs adv_fraction > 0")
    attack = attack or cfgmod.AttackConfig(step=0.006, steps=3)
    source = source or read_source(run)
    data = task.site_data(source, profile, None, None)
    model, denoiser, diffusion = _load_models(run, profile)
    d = profile.defense
    t_val = int(round((d.t_min + d.t_max) / 2))

    objective = make_objective("classifier", profile)
    objective = PurifiedAugmentObjective(objective, denoiser, diffusion, purify_fraction, d.t_min, d.t_max, d.steps)
    if adv_fraction > 0:
        through = (denoiser, diffusion, d.t_min, d.t_max, d.steps) if through_purifier else None
        objective = AdversarialObjective(objective, attack, adv_fraction, through, textured_fraction)

    cdir = _start_run_folder(run, out, profile, {
        "from_run": str(run), "epochs": epochs, "lr_scale": lr_scale, "adv_fraction": adv_fraction,
        "purify_fraction": purify_fraction, "attack": asdict(attack), "through_purifier": through_purifier,
        "textured_fraction": textured_fraction, "keep": keep, "defense": cfgmod.to_dict(profile)["defense"],
        "selection": ("the last epoch" if keep == "last" else
                      f"{'purified' if d.mode == 'always' else 'clean + purified'} (t={t_val}) val accuracy"),
    })
    before, best, history = _finetune_epochs(model, objective, denoiser, diffusion, data, profile, cdir, epochs=epochs,
                                             lr_scale=lr_scale, t_val=t_val, progress=progress, log=log, keep=keep)
    return {"out": str(out), "best_val_score": best, "history": history,
            "val_acc_before": before, "t_val": t_val, "n_train": int(len(data["train"])), "seconds": float(np.sum(
                [h.get("epoch_seconds", 0.0) for h in history]))}
