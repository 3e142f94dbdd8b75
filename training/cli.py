"""``python -m training <command>``: the training side's entry point (thin; the work is in modules)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from runtime.imageio import ImageReadError
from training import config as cfgmod


def _profile(args) -> cfgmod.Profile:
    if getattr(args, "config", None):
        return cfgmod.load_toml(args.config, profile=args.profile)
    return cfgmod.get_profile(args.profile)


def cmd_train(args) -> int:
    from training.data.datasets import load_dataset
    from training.train import train_component

    profile = _profile(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, profile.preprocess, seed=profile.seed, skip_bad=args.skip_bad, progress=not args.quiet)
    print(data.summary())
    cfg_file = out / "config.toml"
    text = cfgmod.dump_toml(profile)
    if cfg_file.exists() and cfg_file.read_text() != text and not args.no_resume:
        print(f"error: {cfg_file} holds another configuration; use a new --out or --no-resume", file=sys.stderr)
        return 2
    cfg_file.write_text(text)
    (out / "data.txt").write_text(f"source = {args.data}\nsplit_digest = {data.digest}\n")
    components = cfgmod.COMPONENTS if args.component == "all" else (args.component,)
    for comp in components:
        t0 = time.perf_counter()
        train_component(comp, profile, data, out, epochs=args.epochs, resume=not args.no_resume, progress=not args.quiet)
        print(f"[{comp}] done in {time.perf_counter() - t0:.0f} s -> {out / comp}")
    return 0


def cmd_synth(args) -> int:
    from training.data.phantom import write_dataset

    profiles = tuple(args.profiles.split(","))
    counts = write_dataset(args.out, args.n, size=args.size, seed=args.seed, profiles=profiles, progress=not args.quiet)
    print(f"wrote {counts} to {args.out}")
    return 0


def cmd_report(args) -> int:
    from training.report import write_report

    md = write_report(args.run, args.data, out_dir=args.out, progress=not args.quiet, quick=args.quick)
    print(f"report written: {md}")
    return 0


def cmd_demo(args) -> int:
    from training.demo import run_demo

    return run_demo(args.out, profile=args.profile, n=args.n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a component (centrally) on a data set")
    t.add_argument("--component", choices=(*cfgmod.COMPONENTS, "all"), default="all")
    t.add_argument("--profile", choices=sorted(cfgmod.PROFILES), default="edge")
    t.add_argument("--config", help="TOML file of overrides (see training/config.py)")
    t.add_argument("--data", default="synth", help="folder (Br35H with split.csv, or class-per-folder) or synth[:N]")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--epochs", type=int, help="override the profile's epochs")
    t.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable images (they are listed) instead of stopping")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("synth", help="write synthetic brain-MRI phantoms as PNG (class-per-folder)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--profiles", default="default", help="comma-separated scanner profiles")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_synth)

    r = sub.add_parser("report", help="measure a trained run on the test split; write report.md/json")
    r.add_argument("--run", required=True)
    r.add_argument("--data", help="data source (default: the one the run was trained on)")
    r.add_argument("--out", help="report folder (default RUN/report)")
    r.add_argument("--quick", action="store_true", help="fewer scans for the costly purification figures")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="the main job end to end on synthetic phantoms")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--profile", choices=sorted(cfgmod.PROFILES), default="tiny")
    d.add_argument("--n", type=int, default=600, help="number of phantoms")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImageReadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last finished epoch", file=sys.stderr)
        return 130
