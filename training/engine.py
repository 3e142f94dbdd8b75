"""One training loop for every component, centrally and as a federated round's local step."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


def batches(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``([B, 1, H, W] float32, [B] int64)`` from in-memory arrays ``[N, H, W]`` / ``[N]``."""
    x = torch.as_tensor(images)
    y = torch.as_tensor(labels).long()
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        xb = x[idx].float()
        yield (xb[:, None] if xb.dim() == 3 else xb), y[idx]


def make_optimizer(params, opt, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer an ``OptimConfig`` names (AdamW, or SGD with momentum), at ``lr`` or the config's."""
    lr = opt.lr if lr is None else lr
    if opt.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=opt.weight_decay)


def cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up then cosine decay to 1 % of ``base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@contextmanager
def channels_last(model: nn.Module, enabled: bool = True):
    """Train ``model``'s convolutions in the channels-last layout, and hand it back in the default one.

    oneDNN's channels-last kernels take 0.73x the time of an edge classifier
    training step on one core (0.76x for the demo's; ``benchmarks/channels_last.py``);
    the U-Net denoiser does not gain, so callers enable it for the classifier.
    Checkpoints and the arrays a site sends are written in the default layout.
    """
    if not enabled:
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


def train_one_epoch(
    model: nn.Module,
    loader,
    objective: Callable,
    optimizer: torch.optim.Optimizer,
    *,
    generator: torch.Generator,
    augment: Callable | None = None,
    lr_at: Callable[[int], float] | None = None,
    start_step: int = 0,
    grad_clip: float | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_backward: Callable[[nn.Module], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict:
    """Run one pass over ``loader`` (an iterable of ``(x, y)`` batches).

    ``objective(model, x, y, generator) -> (loss, metrics)``; ``lr_at(step)``
    sets the learning rate per optimiser step; ``extra_loss(model)`` is added
    to the loss (e.g. a proximal term in a federated round);
    ``after_backward(model)`` sees (and may change) the gradients before
    clipping and the step (e.g. SCAFFOLD's correction). Returns the
    sample-weighted means of the loss and metrics, the number of steps and
    samples, and the wall time.
    """
    model.train()
    sums: dict[str, float] = {}
    seen, step, t0 = 0, start_step, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch")
    for x, y in bar:
        if augment is not None:
            x = augment(x, generator)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        loss, metrics = objective(model, x, y, generator)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        step += 1
        b = x.shape[0]
        seen += b
        for k, v in {"loss": loss.item(), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v * b
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}")
    out = {k: v / max(seen, 1) for k, v in sums.items()}
    out.update(steps=step - start_step, samples=seen, seconds=time.perf_counter() - t0)
    return out


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities ``[N, C]`` of a classifier on in-memory images ``[N, H, W]``."""
    model.eval()
    outs = [model(x).softmax(1) for x, _ in batches(images, np.zeros(len(images)), batch_size, shuffle=False)]
    return torch.cat(outs)
