"""``python -m training <command>``: the training side's entry point (thin; the work is in modules)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

from runtime.imageio import ImageReadError
from training import config as cfgmod
from training.runs import write_data_record


def _profile(args) -> cfgmod.Profile:
    if getattr(args, "config", None):
        return cfgmod.load_toml(args.config, profile=args.profile)
    return cfgmod.get_profile(args.profile or "edge")


def _no_cache(args) -> None:
    """``--no-cache``: the loads inside the command (and the simulation's worker processes) skip the cache."""
    if getattr(args, "no_cache", False):
        os.environ["MEDFEDPURE_NO_CACHE"] = "1"


@dataclass(frozen=True)
class FedFlag:
    """The command-line flag of one ``FederatedConfig`` field (``--field-name``; its type is the field's)."""

    help: str
    group: str = "federated"  # "federated" | "defenses": the argument group it is listed in
    choices: tuple[str, ...] | None = None


FED_FLAGS: dict[str, FedFlag] = {  # every scalar FederatedConfig field, in the order of --help
    "method": FedFlag("federated method", choices=cfgmod.METHODS),
    "sites": FedFlag("number of sites (simulated, or the registered sites the server waits for every round)"),
    "rounds": FedFlag("rounds of the classifier phase"),
    "local_epochs": FedFlag("local epochs per round (classifier)"),
    "defense_rounds": FedFlag("rounds of the denoiser and detector phases (default: --rounds)"),
    "defense_local_epochs": FedFlag("their local epochs (default: --local-epochs)"),
    "partition": FedFlag("simulation: iid | dirichlet:ALPHA | quantity:ALPHA | profile"),
    "fedbn": FedFlag("keep batch-norm statistics and affine parameters at the sites"),
    "proximal_mu": FedFlag("FedProx term mu/2 ||w - w_global||^2 in every local objective"),
    "keep_optimizer_state": FedFlag("keep each site's optimizer moments from round to round"),
    "bn_recalibrate": FedFlag("pool the sites' batch-norm statistics of the aggregated classifier before each evaluation"),
    "gate_warmup_rounds": FedFlag("medfedpure: first N classifier rounds with uniform gates (experts all trained)"),
    "adv_fraction": FedFlag("fraction of each batch trained adversarially (fat, pfeddef; medfedpure with "
                            "--purify-fraction or --adversarial)"),
    "purify_train": FedFlag("medfedpure: purify flagged training scans (Alg. 3)"),
    "purify_fraction": FedFlag("medfedpure: fraction of each batch purified (purification-consistent training)"),
    "adversarial": FedFlag("medfedpure: train on --adv-fraction PGD examples in every robust round, without "
                           "purifying (pFedDef's adversarial training on the mixture)"),
    "through_purifier": FedFlag("medfedpure: craft the --adv-fraction examples through the purifier (exact "
                                "gradients), not on the classifier alone"),
    "textured_fraction": FedFlag("medfedpure: fraction of the --adv-fraction examples that perturb only textured "
                                 "pixels (the flattest 20 %% left alone)"),
    "robust_rounds": FedFlag("the classifier's last N rounds train robustly (adversarial/purified scans, their own "
                             "learning-rate schedule); earlier rounds on clean scans"),
    "robust_lr_scale": FedFlag("learning rate of the robust rounds, times the profile's (default 0.25)"),
    "eval_every": FedFlag("evaluate every N rounds"),
    "eval_max": FedFlag("at most N test scans per site in per-round evaluation (0: all)"),
    "aggregation": FedFlag("how the server combines the classifier updates", "defenses", cfgmod.AGGREGATIONS),
    "byzantine": FedFlag("malicious sites Krum/MultiKrum/Bulyan assume (-1: ceil(0.4 n), within limits)", "defenses"),
    "trim_beta": FedFlag("trimmed mean: fraction cut at each end", "defenses"),
    "root_size": FedFlag("FLTrust/OptiGradTrust: clean training scans the server holds", "defenses"),
    "poison": FedFlag("experiments: what the malicious sites do", "defenses", cfgmod.POISONS),
    "malicious_fraction": FedFlag("experiments: fraction of malicious sites", "defenses"),
    "poison_scale": FedFlag("lambda of the scaling attacks", "defenses"),
    "dp_clip": FedFlag("Fed-Safe: clip every site's update to this L2 norm", "defenses"),
    "dp_sigma": FedFlag("Fed-Safe: noise multiplier (noise std = sigma * clip)", "defenses"),
    "dp_weight_sigma": FedFlag("Fed-Safe: noise std on the weights a site receives", "defenses"),
    "dp_delta": FedFlag("delta of the reported epsilon", "defenses"),
    "feature_skew": FedFlag("simulation: each site's scans re-acquired by its own scanner profile (A-D)", "defenses"),
    "server_opt": FedFlag("classifier phase: how the server applies the averaged update (Flower's FedAvgM, FedAdam, "
                          "FedYogi; default fedavg)", choices=cfgmod.SERVER_OPTS),
    "scaffold": FedFlag("classifier phase: SCAFFOLD control variates (each local step corrected by the "
                        "federation's mean gradient minus the site's)"),
    "swa_rounds": FedFlag("classifier phase: the sites keep the mean of the last N rounds' aggregated classifiers "
                          "(weight averaging across rounds; batch-norm statistics measured again)"),
    "server_lr": FedFlag("server step size of --server-opt"),
    "server_momentum": FedFlag("server momentum (FedAvgM) or beta_1 (FedAdam, FedYogi)"),
}


def add_federated_flags(federated: argparse._ArgumentGroup, defenses: argparse._ArgumentGroup) -> None:
    """Add one flag per ``FED_FLAGS`` entry to its group; a flag left out is ``None`` (the profile's value stays)."""
    types = get_type_hints(cfgmod.FederatedConfig)
    groups = {"federated": federated, "defenses": defenses}
    for name, flag in FED_FLAGS.items():
        group, option = groups[flag.group], "--" + name.replace("_", "-")
        if types[name] is bool:
            group.add_argument(option, action="store_true", default=None, help=flag.help)
        else:
            group.add_argument(option, type=types[name], choices=flag.choices, help=flag.help)


def federated_overrides(args) -> dict:
    """The ``FederatedConfig`` fields the command line sets (``resolve(profile, {"federated": ...})``)."""
    return {name: getattr(args, name) for name in FED_FLAGS if getattr(args, name) is not None}


CENTRAL_ONLY = ("component", "epochs", "skip_bad")
SIMULATION_ONLY = ("threads_per_site", "parallel_sites", "backend", "continue_from")


def _given(args, names) -> list[str]:
    """The flags among ``names`` that are on the command line (their defaults are None or False)."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) is not None and getattr(args, n) is not False]


def _check_mode(args) -> None:
    """Refuse the flags that do not apply to the mode ``--method`` picks (central or federated training)."""
    if args.method is None:
        wrong = _given(args, (*FED_FLAGS, *SIMULATION_ONLY))
        if wrong:
            raise cfgmod.UsageError(f"{', '.join(wrong)} appl{'ies' if len(wrong) == 1 else 'y'} only to federated "
                                    f"training (--method {'|'.join(cfgmod.METHODS)})")
    else:
        wrong = _given(args, CENTRAL_ONLY)
        if wrong:
            raise cfgmod.UsageError(f"{', '.join(wrong)} do{'es' if len(wrong) == 1 else ''} not apply to federated "
                                    "training; use --rounds/--local-epochs (every phase is trained in turn)")


def cmd_train(args) -> int:
    _check_mode(args)
    if args.method is not None:
        return cmd_federated(args)
    from training.data.datasets import load_dataset
    from training.train import train_component

    profile = _profile(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, profile.preprocess, seed=profile.seed, skip_bad=args.skip_bad,
                        cache=not args.no_cache, progress=not args.quiet)
    print(data.summary())
    cfg_file = out / "config.toml"
    text = cfgmod.dump_toml(profile)
    if cfg_file.exists() and cfgmod.load_toml(cfg_file) != profile and not args.no_resume:
        raise cfgmod.UsageError(f"{cfg_file} holds another configuration; use a new --out or --no-resume")
    cfg_file.write_text(text)
    write_data_record(out, args.data, data.digest)
    components = cfgmod.COMPONENTS if args.component in (None, "all") else (args.component,)
    for comp in components:
        t0 = time.perf_counter()
        train_component(comp, profile, data, out, epochs=args.epochs, resume=not args.no_resume, progress=not args.quiet)
        print(f"[{comp}] done in {time.perf_counter() - t0:.0f} s -> {out / comp}")
    return 0


def cmd_federated(args) -> int:
    from training.federated.run import run_federated

    _no_cache(args)
    if args.continue_from:
        from training.federated.run import continue_run, run_config

        if args.profile or args.config:
            raise cfgmod.UsageError("--continue-from takes the run's own settings; --profile and --config do not apply "
                                    "(change the federated ones with their flags)")
        profile = cfgmod.resolve(run_config(args.continue_from), {"federated": federated_overrides(args)})
        continue_run(args.continue_from, args.out, profile)
        print(f"continuing {args.continue_from} in {args.out}")
    else:
        profile = cfgmod.resolve(_profile(args), {"federated": federated_overrides(args)})
    summary = run_federated(profile, args.data, args.out, resume=not args.no_resume,
                            threads_per_site=1 if args.threads_per_site is None else args.threads_per_site,
                            parallel_sites=args.parallel_sites, backend=args.backend or "ray")
    print(f"\n{summary['method']}: mean clean accuracy {summary['mean_clean_acc']:.4f}, "
          f"mean PGD accuracy {summary['mean_pgd_acc']:.4f} over {summary['sites']} sites -> {args.out}/summary.md")
    return 0


def cmd_synth(args) -> int:
    from training.data.phantom import write_dataset

    profiles = tuple(args.profiles.split(","))
    counts = write_dataset(args.out, args.n, size=args.size, seed=args.seed, profiles=profiles, progress=not args.quiet)
    print(f"wrote {counts} to {args.out}")
    return 0


def cmd_report(args) -> int:
    from training.report import write_report

    _no_cache(args)
    md = write_report(args.run, args.data, out_dir=args.out, progress=not args.quiet, quick=args.quick,
                      command=args.command_line)
    print(f"report written: {md}")
    return 0


def cmd_finetune(args) -> int:
    from training.finetune import finetune_classifier

    _no_cache(args)
    attack = cfgmod.AttackConfig(eps=args.attack_eps, step=args.attack_step, steps=args.attack_steps)
    res = finetune_classifier(args.run, args.out, epochs=args.epochs, lr_scale=args.lr_scale,
                              adv_fraction=args.adv_fraction, purify_fraction=args.purify_fraction, attack=attack,
                              defense=cfgmod.defense_overrides(args.defense),
                              through_purifier=args.through_purifier, textured_fraction=args.textured_fraction,
                              keep=args.keep, source=args.data, progress=not args.quiet)
    print(f"fine-tuned classifier in {res['out']}/classifier (best validation score "
          f"{res['best_val_score']:.4f}); evaluate it with: python -m training evaluate --run {res['out']}")
    return 0


def cmd_evaluate(args) -> int:
    from training.attacks.adaptive import AdaptiveConfig
    from training.evaluate import THREATS, evaluate_run

    _no_cache(args)
    threats = THREATS if args.threat == "all" else (args.threat,)
    defense = cfgmod.defense_overrides(args.defense)
    adaptive = AdaptiveConfig(
        attack=cfgmod.AttackConfig(eps=args.adaptive_eps, step=args.adaptive_step, steps=args.adaptive_steps),
        eot=args.eot, gradient=args.gradient, attack_purify_steps=args.attack_purify_steps or 2,
        support=args.adaptive_support, flat_fraction=args.flat_fraction,
    )
    if args.threat == "suite":
        return _suite(args, defense)
    if args.sweep or args.sweep_only:
        from training.evaluate import sweep_run

        sweep_run(args.run, max_scans=args.sweep_max, seed=args.seed, source=args.data, defense=defense, tag=args.tag)
        print(f"wrote {args.run}/reports/sweep{'-' + args.tag if args.tag else ''}.md")
        if args.sweep_only:
            return 0
    report = evaluate_run(args.run, threats, command=args.command_line, max_scans=args.max_scans,
                          adaptive_max=args.adaptive_max,
                          adaptive=adaptive, seed=args.seed, source=args.data, defense=defense, tag=args.tag)
    print(f"\nwrote {args.run}/reports/{report['files'][0]}")
    for k, v in report["mean"].items():
        print(f"  {k:14s} accuracy {100 * v['acc']:.2f} % over {v['n']} scans")
    return 0


def _suite(args, defense: dict) -> int:
    from training.attacks.suite import ATTACKS, SuiteConfig
    from training.evaluate import suite_run

    attacks = tuple(a for a in args.suite_attacks.split(",") if a) if args.suite_attacks else ATTACKS
    try:
        cfg = SuiteConfig(long_steps=args.suite_steps, restarts=args.restarts, apgd_steps=args.apgd_steps,
                          eot=args.suite_eot, adaptive_steps=args.suite_adaptive_steps,
                          adaptive_eot=args.suite_adaptive_eot, purify_steps=args.attack_purify_steps or 0,
                          draws=args.draws, attacks=attacks)
    except ValueError as err:
        raise cfgmod.UsageError(str(err)) from None
    r = suite_run(args.run, cfg, max_scans=args.suite_max, cheap_max=args.max_scans, seed=args.seed,
                  source=args.data, defense=defense, tag=args.tag, command=args.command_line, split=args.split)
    w = r["worst_case"]
    print(f"\nwrote {args.run}/reports/suite{'-' + args.tag if args.tag else ''}.md")
    print(f"  clean {100 * r['clean']['robust_acc']:.2f} %; worst case over the suite {100 * w['robust_acc']:.2f} % "
          f"(worst of {cfg.draws} draws {100 * w['worst_of_n']:.2f} %) on {w['scans']} scans; "
          f"strongest attack {w['strongest']}")
    return 0


def cmd_tables(args) -> int:
    from training.evaluate import paper_tables

    print(f"wrote {paper_tables(args.runs, args.out)}")
    return 0


def cmd_plot(args) -> int:
    from training.federated.plot import convergence_plot

    for r in args.runs:
        if not (Path(r) / "metrics" / "rounds.jsonl").exists():
            raise FileNotFoundError(f"{r}: no federated metrics (metrics/rounds.jsonl) in this folder")
    out = convergence_plot(args.runs, args.out)
    if out is None:
        raise cfgmod.UsageError("none of the runs has a classifier evaluation yet")
    print(f"wrote {out} (and {out.with_suffix('.json').name})")
    return 0


def cmd_html(args) -> int:
    from training.html_report import write_html_report

    out = write_html_report(args.run, bench=args.bench, infer=args.infer, out=args.out, grid=not args.no_grid)
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from training.demo import run_demo

    return run_demo(args.out, profile=args.profile, n=args.n, resume=args.resume)


DEBUG_HELP = "show the traceback of every error, a mistake in the command line or settings too"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a component (centrally) on a data set")
    t.add_argument("--component", choices=(*cfgmod.COMPONENTS, "all"), help="component to train (default: all)")
    t.add_argument("--profile", choices=sorted(cfgmod.PROFILES), help="model sizes and schedule (default: edge)")
    t.add_argument("--config", help="TOML file of overrides (see training/config.py)")
    t.add_argument("--data", default="synth", help="folder (Br35H with split.csv, or class-per-folder) or synth[:N]")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--epochs", type=int, help="override the profile's epochs")
    t.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a checkpoint")
    t.add_argument("--skip-bad", action="store_true", help="skip unreadable images (they are listed) instead of stopping")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--no-cache", action="store_true", help="do not read or write the preprocessed-scan cache (~/.cache/medfedpure)")
    f = t.add_argument_group("federated training (--method runs a Flower simulation; leave it out for centralised "
                             "training)")
    g = t.add_argument_group("training-time defenses (docs/training-defenses.md)")
    add_federated_flags(f, g)
    f.add_argument("--continue-from", metavar="RUN",
                   help="start --out (a new folder) from RUN's trained state and train on under these settings, "
                        "e.g. --rounds R+N --robust-rounds N --purify-fraction 1 --adv-fraction 0.5")
    f.add_argument("--threads-per-site", type=int, help="torch threads per simulated site (default 1)")
    f.add_argument("--parallel-sites", type=int, help="sites trained at the same time (default: cores / threads)")
    f.add_argument("--backend", choices=("ray", "inprocess"),
                   help="simulation engine: ray (sites in parallel, the default) or inprocess (one at a time, "
                        "no Ray start-up)")
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
    r.add_argument("--no-cache", action="store_true", help="do not read or write the preprocessed-scan cache (~/.cache/medfedpure)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_report)

    ft = sub.add_parser("finetune", help="adapt a centralised run's classifier to its purifier (new run folder)")
    ft.add_argument("--run", required=True, help="trained centralised run (classifier, detector, denoiser)")
    ft.add_argument("--out", required=True, help="new run folder")
    ft.add_argument("--data", help="data source (default: the one the run was trained on)")
    ft.add_argument("--epochs", type=int, default=3)
    ft.add_argument("--lr-scale", type=float, default=0.25, help="fraction of the profile's classifier learning rate")
    ft.add_argument("--adv-fraction", type=float, default=0.5, help="PGD examples per batch")
    ft.add_argument("--purify-fraction", type=float, default=0.5, help="purified scans per batch")
    ft.add_argument("--attack-eps", type=float, default=0.015)
    ft.add_argument("--attack-step", type=float, default=0.006)
    ft.add_argument("--attack-steps", type=int, default=3)
    ft.add_argument("--through-purifier", action="store_true",
                    help="craft the PGD examples through the purification (exact gradients, fresh noise per step): "
                         "an attacker who knows the purifier")
    ft.add_argument("--textured-fraction", type=float, default=0.0,
                    help="fraction of the PGD examples that perturb only textured pixels (the flattest 20 %% left "
                         "alone: the suite's adaptive-textured attacker)")
    ft.add_argument("--keep", choices=("best", "last"), default="best",
                    help="the checkpoint kept: best on purified validation accuracy, or the last epoch's "
                         "(to choose afterwards on the validation attack suite)")
    ft.add_argument("--defense", action="append", metavar="KEY=VALUE", help="defense settings (t* range, steps) to train for")
    ft.add_argument("--no-cache", action="store_true", help="do not read or write the preprocessed-scan cache (~/.cache/medfedpure)")
    ft.add_argument("--quiet", action="store_true")
    ft.set_defaults(func=cmd_finetune)

    e = sub.add_parser("evaluate", help="robustness of a trained run under PROTOCOL.md; writes RUN/reports/robustness.md")
    e.add_argument("--run", required=True)
    e.add_argument("--threat", choices=("paper", "adaptive", "transfer", "all", "suite"), default="paper",
                   help="suite: every attack of training/attacks/suite.py, worst case per scan, N purification draws "
                        "(writes reports/suite.md/json)")
    e.add_argument("--data", help="data source (default: the one the run was trained on)")
    e.add_argument("--max-scans", type=int, default=0, help="test scans per site (0: all)")
    e.add_argument("--adaptive-max", type=int, default=64, help="test scans per site for the adaptive attack (0: all)")
    e.add_argument("--adaptive-eps", type=float, default=0.015)
    e.add_argument("--adaptive-step", type=float, default=0.003)
    e.add_argument("--adaptive-steps", type=int, default=20)
    e.add_argument("--eot", type=int, default=4, help="purification noise samples per adaptive step")
    e.add_argument("--gradient", choices=("exact", "bpda"), default="exact")
    e.add_argument("--attack-purify-steps", type=int, default=0,
                   help="DDIM steps of the purification the attack differentiates (default: 2 for --threat adaptive; "
                        "the defense's own steps for the suite)")
    e.add_argument("--adaptive-support", choices=("all", "textured"), default="all",
                   help="textured: the adaptive attacker leaves the flattest pixels alone (evades the noise-floor score)")
    e.add_argument("--flat-fraction", type=float, default=0.2, help="pixels left alone with --adaptive-support textured")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-cache", action="store_true", help="do not read or write the preprocessed-scan cache (~/.cache/medfedpure)")
    e.add_argument("--sweep", action="store_true", help="also sweep flag rate x purification steps (robustness vs. compute)")
    e.add_argument("--sweep-only", action="store_true", help="only the sweep")
    e.add_argument("--sweep-max", type=int, default=64, help="test scans per site in the sweep")
    e.add_argument("--defense", action="append", metavar="KEY=VALUE",
                   help="override the run's defense settings, e.g. --defense t_min=150,t_max=250,steps=1 "
                        "(keys: score, flag_rate, t_min, t_max, ref_ratio, quantum, steps, rule, kappa, floor_fraction)")
    e.add_argument("--tag", default="", help="write reports/robustness-TAG.* (and sweep-TAG.*) instead")
    su = e.add_argument_group("attack suite (--threat suite)")
    su.add_argument("--suite-max", type=int, default=256,
                    help="class-balanced pooled test scans for the costly attacks (0: all; --max-scans: for the cheap ones)")
    su.add_argument("--split", choices=("test", "val"), default="test",
                    help="val: run the suite on validation scans, to choose a defense; report on test")
    su.add_argument("--suite-attacks", default="", help="comma-separated subset of the suite's attacks (default: all)")
    su.add_argument("--suite-steps", type=int, default=100, help="steps of the long PGD on the classifier")
    su.add_argument("--restarts", type=int, default=2, help="restarts of the long PGD and the adaptive attacks")
    su.add_argument("--apgd-steps", type=int, default=50)
    su.add_argument("--suite-eot", type=int, default=20, help="purification draws per APGD step")
    su.add_argument("--suite-adaptive-steps", type=int, default=50)
    su.add_argument("--suite-adaptive-eot", type=int, default=4)
    su.add_argument("--draws", type=int, default=10, help="purifications per attacked scan when scoring (worst / majority of N)")
    e.set_defaults(func=cmd_evaluate)

    tb = sub.add_parser("tables", help="the paper's Tables I and II from evaluated runs (one row per method)")
    tb.add_argument("runs", nargs="+", help="run folders evaluated with `evaluate --threat paper`")
    tb.add_argument("--out", default="reports", help="folder for tables.md")
    tb.set_defaults(func=cmd_tables)

    pl = sub.add_parser("plot", help="convergence plot of federated runs, one line per run (method)")
    pl.add_argument("runs", nargs="+", help="federated run folders")
    pl.add_argument("--out", required=True, help="PNG file")
    pl.set_defaults(func=cmd_plot)

    h = sub.add_parser("html", help="one self-contained HTML page for a run (RUN/report.html)")
    h.add_argument("--run", required=True, help="run folder")
    h.add_argument("--bench", help="a runtime bench report folder (or its bench.json) to include")
    h.add_argument("--infer", help="a JSON summary of runtime infer on held-out files (the demo writes one)")
    h.add_argument("--out", help="HTML file (default RUN/report.html)")
    h.add_argument("--no-grid", action="store_true", help="leave out the purification grid")
    h.set_defaults(func=cmd_html)

    from training.federated import certs, deploy

    certs.add_parser(sub)
    deploy.add_parser(sub)

    d = sub.add_parser("demo", help="the main job end to end on synthetic phantoms")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--profile", choices=sorted(cfgmod.PROFILES), default="demo")
    d.add_argument("--n", type=int, default=1200, help="number of phantoms")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo instead of starting over")
    d.set_defaults(func=cmd_demo)

    for command in sub.choices.values():  # --debug before or after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return p


USER_ERRORS = (cfgmod.UsageError, FileNotFoundError, ImageReadError)  # one line, exit 2 (--debug: the traceback)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["python -m training", *argv])  # recorded in the reports
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last finished epoch", file=sys.stderr)
        return 130
