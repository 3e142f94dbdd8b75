"""The training-time defense studies: robust aggregation under poisoning, FedBN-Prox, Fed-Safe.

Each study is a set of federated runs of one configuration (by default
``benchmarks/configs/td-sweep.toml``: small models on 48 px scans, 10 sites,
Dirichlet 0.5, 5 rounds; for ``robustness`` ``td-robustness.toml``, the same
for 10 rounds, evaluated on whole test sets), simulated in this process (``--backend inprocess``). Every
run has its own folder under ``--runs``; a finished run is read back, not
repeated, so an interrupted study continues where it stopped::

    python -m benchmarks.training_defenses robustness --data ../shared/data/br35h --out benchmarks/results/training-defenses
    python -m benchmarks.training_defenses fedbn      --data ../shared/data/br35h --out benchmarks/results/training-defenses
    python -m benchmarks.training_defenses fedsafe    --data ../shared/data/br35h --out benchmarks/results/training-defenses

- ``robustness``: accuracy at the honest sites of every aggregation under
  every poisoning at each malicious fraction, and with no attack; for
  FLTrust and OptiGradTrust the precision and recall of malicious-site
  detection (an update the aggregation left out: FLTrust trust 0,
  OptiGradTrust trust below 0.5).
- ``fedbn``: FedAvg, FedProx, FedBN and FedBN-Prox under feature skew (each
  site's scans re-acquired by its own scanner profile): accuracy per round
  and the rounds each needs to reach 95 % of its final accuracy.
- ``fedsafe``: accuracy and paper-setting PGD accuracy against the noise
  multiplier sigma, with the privacy spent, and FAT read off at the round
  where its training time matches Fed-Safe's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.markdown import table as md_table
from training import config as cfgmod

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "td-sweep.toml"
STUDY_CONFIG = {"robustness": Path(__file__).parent / "configs" / "td-robustness.toml"}


def run_one(name: str, profile: cfgmod.Profile, data: str, runs: Path, log=print) -> dict:
    """The summary of run ``name`` (trained now unless a finished run with this configuration is there)."""
    from training.federated.run import run_federated
    from training.federated.server_app import RunState

    out = runs / name
    summary_file = out / "summary.json"
    if summary_file.exists() and RunState(out).done("classifier") >= profile.federated.rounds \
            and (out / "config.toml").exists() and cfgmod.load_toml(out / "config.toml") == profile:
        return json.loads(summary_file.read_text())
    t0 = time.perf_counter()
    log(f"  {name} ...")
    summary = run_federated(profile, data, out, backend="inprocess", log=lambda *_: None)
    log(f"  {name}: honest-site clean accuracy {summary.get('honest_clean_acc', float('nan')):.4f} "
        f"({time.perf_counter() - t0:.0f} s)")
    return summary


def _fed(profile: cfgmod.Profile, **fed) -> cfgmod.Profile:
    return cfgmod.resolve(profile, {"federated": fed})


def _pct(v) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


# --------------------------------------------------------------------------- robust aggregation


def robustness(base: cfgmod.Profile, data: str, runs: Path, out: Path, aggregations, poisons, fractions, log=print) -> Path:
    results = []
    cells = [("none", 0.0)] + [(p, f) for p in poisons for f in fractions]
    for agg in aggregations:
        for poison, frac in cells:
            name = f"{agg}-{poison}" + (f"-{int(round(100 * frac))}" if poison != "none" else "")
            s = run_one(name, _fed(base, aggregation=agg, poison=poison, malicious_fraction=frac), data, runs, log)
            results.append({"aggregation": agg, "poison": poison, "fraction": frac, **{
                k: s.get(k) for k in ("honest_clean_acc", "detection_precision", "detection_recall",
                                      "mean_trust_malicious", "mean_trust_honest", "malicious_sites",
                                      "wall_seconds_this_session")}})
            _write_robustness(results, base, out, cells, aggregations)
    return out / "robustness.md"


def _write_robustness(results, base, out: Path, cells, aggregations) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(results, indent=1, default=float))
    head = ["no attack"] + [f"{p} {int(round(100 * f))} %" for p, f in cells[1:]]
    fed = base.federated
    lines = ["# Robust aggregation under poisoning", "",
             f"Accuracy (%) at the honest sites after {fed.rounds} rounds ({fed.sites} sites, `{fed.partition}`, "
             f"profile `{base.name}` at {base.preprocess.size} px, {fed.local_epochs} local epoch(s)); "
             "mean over honest sites, weighted by test scans. The malicious sites are fixed by the seed.", ""]
    by = {(r["aggregation"], r["poison"], r["fraction"]): r for r in results}
    lines += md_table(["aggregation", *head], [
        [agg, *(_pct(by[(agg, p, f)]["honest_clean_acc"]) if (agg, p, f) in by else "" for p, f in cells)]
        for agg in aggregations])
    trust = [r for r in results if r["aggregation"] in ("fltrust", "optigradtrust") and r["poison"] != "none"]
    if trust:
        lines += ["", "Detection of malicious sites (update left out of the aggregate: FLTrust trust 0, OptiGradTrust trust < 0.5; "
                  "over all rounds): precision / recall (%), mean trust malicious / honest.", ""]
        lines += md_table(
            ["aggregation", "poisoning", "malicious", "precision", "recall", "trust malicious", "trust honest"],
            [(r["aggregation"], r["poison"], f"{int(round(100 * r['fraction']))} %", _pct(r["detection_precision"]),
              _pct(r["detection_recall"]), f"{r['mean_trust_malicious']:.2f}", f"{r['mean_trust_honest']:.2f}")
             for r in trust], align="llrrrrr")
    (out / "robustness.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- FedBN-Prox


def rounds_to(curve: list[float], fraction: float = 0.95) -> int | None:
    """First round (1-based) whose accuracy reaches ``fraction`` of the final one."""
    if not curve:
        return None
    goal = fraction * curve[-1]
    return next(i + 1 for i, v in enumerate(curve) if v >= goal)


def fedbn(base: cfgmod.Profile, data: str, runs: Path, out: Path, mus, rounds: int = 0, log=print) -> Path:
    from training.federated.plot import curves

    variants = {"fedavg": {"fedbn": False}, "fedbn": {"fedbn": True}}
    for mu in mus:
        variants[f"fedprox-{mu:g}"] = {"fedbn": False, "proximal_mu": mu}
        variants[f"fedbn-prox-{mu:g}"] = {"fedbn": True, "proximal_mu": mu}
    extra = {"rounds": rounds} if rounds > 0 else {}
    results = {}
    for name, fed in variants.items():
        profile = _fed(base, feature_skew=True, eval_every=1, eval_max=0, **extra, **fed)
        run_one(f"skew-{name}-r{profile.federated.rounds}", profile, data, runs, log)
        _, rnds, clean, _ = curves(runs / f"skew-{name}-r{profile.federated.rounds}")
        results[name] = {"rounds": rnds, "clean_acc": clean, "rounds_to_95": rounds_to(clean),
                         "best": float(max(clean)) if clean else None,
                         "last3": float(np.mean(clean[-3:])) if clean else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fedbn.json").write_text(json.dumps(results, indent=1))
    _curve_plot(results, out / "fedbn.png")
    n = max(len(r["rounds"]) for r in results.values())
    fed = base.federated
    lines = ["# FedBN-Prox under feature skew", "",
             f"{fed.sites} sites, `{fed.partition}`, profile `{base.name}` at {base.preprocess.size} px, "
             f"{fed.local_epochs} local epoch(s) per round. Each site's scans re-acquired by its own scanner "
             "profile (A-D). Mean clean accuracy (%) over the sites' whole test sets, per round; then the mean of "
             "the last three rounds, and the first round at 95 % of the run's final accuracy.", "",
             *md_table(["method", *(f"r{i + 1}" for i in range(n)), "last 3", "rounds to 95 %"],
                       [[name, *(_pct(v) for v in r["clean_acc"]), _pct(r["last3"]), r["rounds_to_95"]]
                        for name, r in results.items()]),
             "", "![accuracy per round](fedbn.png)"]
    (out / "fedbn.md").write_text("\n".join(lines) + "\n")
    return out / "fedbn.md"


# --------------------------------------------------------------------------- Fed-Safe


def _paper_attack(base: cfgmod.Profile) -> tuple[cfgmod.Profile, cfgmod.AttackConfig]:
    """``base`` evaluated every round under the paper-setting PGD, and that attack."""
    paper = cfgmod.AttackConfig()  # PGD L-inf 0.015, 7 steps of 0.003
    base = _fed(base, eval_every=1, eval_attack=cfgmod.to_dict(base)["federated"]["eval_attack"] | {"steps": paper.steps,
                                                                                                   "step": paper.step,
                                                                                                   "eps": paper.eps})
    return base, paper


def _auto_clip(runs: Path, log) -> float:
    """The median update norm of the un-noised run."""
    from training.federated.server_app import read_rows

    norms = [r["update_norm"] for r in read_rows(runs / "fedsafe-none") if r["kind"] == "train" and "update_norm" in r]
    if not norms:
        raise RuntimeError("--clip 0 (auto) needs the un-noised run's update norms (runs/.../fedsafe-none)")
    clip = float(np.median(norms))
    log(f"  clip C = {clip:.4g}: the median update norm of the un-noised run")
    return clip


def _noise_runs(base: cfgmod.Profile, data: str, runs: Path, sigmas, clip: float, log) -> tuple[list[dict], float]:
    """One Fed-Safe run per noise multiplier (and one without noise); the results and the clip norm used."""
    from training.federated.server_app import read_rows

    results = []
    for sigma in sorted(set(sigmas) | {0.0}):  # the un-noised run first: it sets C when clip is 0 (auto)
        if sigma > 0 and clip <= 0:
            clip = _auto_clip(runs, log)
        fed = {"dp_clip": clip, "dp_sigma": sigma} if sigma > 0 else {}
        name = f"fedsafe-{sigma:g}" if sigma > 0 else "fedsafe-none"
        s = run_one(name, _fed(base, **fed), data, runs, log)
        rows = read_rows(runs / name)
        results.append({"run": name, "sigma": sigma, "clip": clip if sigma > 0 else None,
                        "clean_acc": s["honest_clean_acc"], "pgd_acc": s["honest_pgd_acc"],
                        "epsilon": s.get("dp_epsilon"), "train_seconds": _train_seconds(rows)})
    return results, clip


def _fat_results(name: str, rows: list[dict], budget: float) -> list[dict]:
    """FAT at the last round whose cumulative training time fits ``budget``, and after all its rounds."""
    from training.federated.server_app import nanmean

    spent, at = 0.0, 1
    per_round = {}
    for r in rows:
        if r["kind"] == "train":
            per_round[r["round"]] = per_round.get(r["round"], 0.0) + r.get("seconds", 0.0)
    for rnd in sorted(per_round):
        if spent + per_round[rnd] > budget:
            break
        spent += per_round[rnd]
        at = rnd
    ev = [r for r in rows if r["kind"] == "eval" and r["round"] == at]
    matched = {"run": f"{name} @ round {at}", "sigma": None, "clip": None,
               "clean_acc": nanmean(ev, "clean_acc"), "pgd_acc": nanmean(ev, "pgd_acc"), "epsilon": None,
               "train_seconds": spent}
    final = max(per_round) if per_round else 0
    ev = [r for r in rows if r["kind"] == "eval" and r["round"] == final]
    return [matched, {"run": f"{name} (all {final} rounds)", "sigma": None, "clip": None,
                      "clean_acc": nanmean(ev, "clean_acc"), "pgd_acc": nanmean(ev, "pgd_acc"), "epsilon": None,
                      "train_seconds": sum(per_round.values())}]


@dataclass(frozen=True)
class FedSafeReport:
    """What ``fedsafe.md`` shows: the clip norm C, the privacy delta, the attack and one row per run."""

    clip: float
    delta: float
    attack: str
    rows: list[dict]

    def intro(self) -> list[str]:
        return ["# Fed-Safe: distributed noise against privacy and robustness", "",
                f"Clip C = {self.clip:.4g}; noise N(0, (sigma C)^2) per coordinate of every site's update. Epsilon per site at "
                f"delta = {self.delta:g} after all rounds (Flower's RDP accountant). PGD: {self.attack}, "
                "on each site's classifier. FAT is read off at the last round whose cumulative training time fits the "
                "Fed-Safe runs' (matched cost).", ""]

    def table(self) -> list[str]:
        return md_table(
            ["run", "sigma", "clean acc (%)", "PGD acc (%)", "epsilon", "training s (sum over sites)"],
            [(r["run"], "–" if r["sigma"] is None else f"{r['sigma']:g}", _pct(r["clean_acc"]), _pct(r["pgd_acc"]),
              "–" if r["epsilon"] is None else f"{r['epsilon']:.1f}", f"{r['train_seconds']:.0f}")
             for r in self.rows])

    def markdown(self) -> str:
        return "\n".join(self.intro() + self.table() + ["", "![accuracy and privacy against sigma](fedsafe.png)"]) + "\n"


def fedsafe(base: cfgmod.Profile, data: str, runs: Path, out: Path, sigmas, clip: float, log=print) -> Path:
    from training.federated.server_app import read_rows

    base, paper = _paper_attack(base)
    results, clip = _noise_runs(base, data, runs, sigmas, clip, log)
    fat_name = "fedsafe-fat"
    run_one(fat_name, _fed(base, method="fat"), data, runs, log)
    budget = max(r["train_seconds"] for r in results if r["sigma"] > 0) if any(r["sigma"] > 0 for r in results) else 0
    results += _fat_results(fat_name, read_rows(runs / fat_name), budget)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fedsafe.json").write_text(json.dumps(results, indent=1, default=float))
    _fedsafe_plot(results, out / "fedsafe.png", base.federated.dp_delta)
    report = FedSafeReport(clip=clip, delta=base.federated.dp_delta, attack=paper.describe(), rows=results)
    (out / "fedsafe.md").write_text(report.markdown())
    return out / "fedsafe.md"


def _curve_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(r["rounds"], r["clean_acc"], "o-", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("mean clean accuracy over sites")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _train_seconds(rows: list[dict]) -> float:
    return float(sum(r.get("seconds", 0.0) for r in rows if r["kind"] == "train"))


def _fedsafe_plot(results, path: Path, delta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in results if r["sigma"] is not None]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    s = [r["sigma"] for r in pts]
    ax.plot(s, [r["clean_acc"] for r in pts], "o-", label="clean")
    ax.plot(s, [r["pgd_acc"] for r in pts], "s-", label="PGD (paper)")
    for r in results:
        if r["sigma"] is None and "@" in r["run"]:
            ax.axhline(r["pgd_acc"], ls="--", c="gray", label="FAT PGD, matched cost")
    positive = [v for v in s if v > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlim(0, 1.5 * max(positive))
    ax.set_xlabel("noise multiplier sigma (0: no noise)")
    ax.set_ylabel("accuracy at honest sites")
    ax.set_ylim(0, 1)
    ax2 = ax.twiny()
    ax2.set_xscale(ax.get_xscale(), **({"linthresh": min(positive)} if positive else {}))
    ax2.set_xlim(ax.get_xlim())
    ax2.set_xticks(s)
    ax2.set_xticklabels(["∞" if r["epsilon"] is None else f"{r['epsilon']:.2g}" for r in pts], fontsize=8)
    ax2.set_xlabel(f"epsilon per site (delta {delta:g})")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training_defenses", description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=("robustness", "fedbn", "fedsafe"))
    p.add_argument("--data", required=True, help="data source (Br35H folder or synth[:N])")
    p.add_argument("--config", default="", help="TOML of the runs' profile (default: td-robustness.toml for "
                   "robustness, td-sweep.toml for the others)")
    p.add_argument("--runs", default="runs/training-defenses", help="folder of the runs")
    p.add_argument("--out", default="benchmarks/results/training-defenses")
    p.add_argument("--aggregations", default="fedavg,optigradtrust,fltrust,median,trimmed,krum,multikrum,bulyan")
    p.add_argument("--poisons", default="scaling,partial,signflip,gaussian,labelflip")
    p.add_argument("--fractions", default="0.3,0.4")
    p.add_argument("--mus", default="0.01,0.1", help="FedProx / FedBN-Prox mu values")
    p.add_argument("--rounds", type=int, default=0, help="federated rounds (fedbn study; 0: the config's)")
    p.add_argument("--sigmas", default="0.001,0.01,0.1", help="noise multipliers (0, no noise, always runs)")
    p.add_argument("--clip", type=float, default=0.0, help="clip norm C (0: the median update norm of the un-noised run)")
    args = p.parse_args(argv)
    try:
        base = cfgmod.load_toml(args.config or STUDY_CONFIG.get(args.study, DEFAULT_CONFIG))
        runs, out = Path(args.runs), Path(args.out)
        if args.study == "robustness":
            aggs = [a for a in args.aggregations.split(",") if a]
            poisons = [x for x in args.poisons.split(",") if x]
            for a in aggs:
                _fed(base, aggregation=a)
            for x in poisons:
                _fed(base, poison=x)
            md = robustness(base, args.data, runs, out, aggs, poisons, [float(f) for f in args.fractions.split(",")])
        elif args.study == "fedbn":
            md = fedbn(base, args.data, runs, out, [float(m) for m in args.mus.split(",") if m], args.rounds)
        else:
            md = fedsafe(base, args.data, runs, out, [float(s) for s in args.sigmas.split(",")], args.clip)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
