"""Training-step time of each component in the default and the channels-last memory layout, in one run.

``python -m benchmarks.channels_last --profile edge --threads 1 --steps 10 --repeats 3``

One training step (forward, loss, backward, AdamW step) on random scans at the profile's size and its
federated batch size (the classifier at ``--classifier-batch``, the denoiser at its training crop). The two
layouts alternate ``--repeats`` times, so that drift of the machine falls on both; the medians and their
ratio are printed. The training loops use channels-last where it is faster (``training.engine.channels_last``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from runtime.markdown import table
from training import config as cfgmod
from training.engine import channels_last
from training.models import create_model


def _step_fn(component: str, model: torch.nn.Module, x: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = torch.randint(0, 300, (len(x),))
    y = torch.randint(0, 2, (len(x),))

    def step() -> None:
        out = model(x, t) if component == "denoiser" else model(x)
        loss = out.pow(2).mean() if component == "denoiser" else torch.nn.functional.nll_loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def time_layouts(component: str, profile: cfgmod.Profile, batch: int, steps: int, repeats: int) -> dict:
    """Median seconds per training step in each layout (``default``, ``channels_last``) and their ratio."""
    torch.manual_seed(0)
    model = create_model(component, profile).train()
    size = profile.preprocess.size
    if component == "denoiser" and profile.denoiser.train_crop:
        size = profile.denoiser.train_crop
    x = torch.rand(batch, 1, size, size)
    step = _step_fn(component, model, x)
    times: dict[str, list[float]] = {"default": [], "channels_last": []}
    for _ in range(repeats):
        for layout in times:
            with channels_last(model, layout == "channels_last"):
                step()  # warm-up: the layout's kernels chosen
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                times[layout].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"component": component, "batch": batch, "size": size, **{f"{k}_ms": 1e3 * v for k, v in med.items()},
            "ratio": med["channels_last"] / med["default"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="edge", choices=sorted(cfgmod.PROFILES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per federated site here)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the two layouts")
    ap.add_argument("--classifier-batch", type=int, default=8)
    args = ap.parse_args(argv)
    if args.threads < 1 or args.steps < 1 or args.repeats < 1:
        print("error: --threads, --steps and --repeats must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    profile = cfgmod.PROFILES[args.profile]
    rows = [time_layouts("classifier", profile, args.classifier_batch, args.steps, args.repeats),
            time_layouts("denoiser", profile, profile.denoiser.optim.batch_size, args.steps, args.repeats)]
    print(f"{args.profile} profile, {args.threads} thread(s), median of {args.repeats} x {args.steps} steps")
    print("\n".join(table(["component", "batch", "px", "default ms/step", "channels-last ms/step", "ratio"],
                          [[r["component"], r["batch"], r["size"], f"{r['default_ms']:.1f}",
                            f"{r['channels_last_ms']:.1f}", f"{r['ratio']:.2f}"] for r in rows])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
