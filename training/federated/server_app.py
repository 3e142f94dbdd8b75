"""Flower ServerApp: the three training phases, round by round, resumable.

The round loop is the one of Flower's ``Strategy.start`` (configure_train ->
send_and_receive -> aggregate_train -> configure_evaluate -> ...), written
out so that every finished round is saved and a restarted run continues from
the last one. Aggregation is the strategy's (FedAvg by default; see
``strategies.py``); the server never sees a scan.

Run folder::

    RUN/config.toml                       resolved configuration (profile + federated)
    RUN/server/state.json                 last finished round per phase
    RUN/server/<phase>.pt                 global shared arrays after that round
    RUN/server/classifier-swa.pt          with swa_rounds: the running mean across the last rounds
    RUN/server/classifier-kept.pt         with swa_rounds: that mean, batch-norm measured again (what sites keep)
    RUN/metrics/rounds.jsonl | .csv       per round, per site: train and evaluation figures
    RUN/{denoiser,detector}/best.pt       global models, in the centralised checkpoint format
    RUN/sites/site-<k>/classifier.pt      site k's classifier (shared experts + its gates)
    RUN/convergence.png, RUN/summary.json | .md
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from runtime.markdown import table
from training import config as cfgmod
from training.checkpoint import save_checkpoint
from training.federated import scaffold, swa, task
from training.federated.privacy import PrivacyLedger
from training.federated.strategies import RootSet, ServerOptimizer, make_strategy
from training.runs import data_record

ROUND_TIMEOUT = 24 * 3600.0


class RunState:
    """``RUN/server/state.json``: the last finished round of every phase."""

    def __init__(self, run_dir: Path):
        self.file = run_dir / "server" / "state.json"
        self.data = json.loads(self.file.read_text()) if self.file.exists() else {}

    def done(self, phase: str) -> int:
        return int(self.data.get(phase, 0))

    def mark(self, phase: str, rnd: int, seconds: float = 0.0) -> None:
        """Round ``rnd`` of ``phase`` is finished; ``seconds`` of training time are added to the phase's total."""
        self.data[phase] = rnd
        times = self.data.setdefault("phase_seconds", {})
        times[phase] = float(times.get(phase, 0.0)) + float(seconds)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.file)


def _save(path: Path, obj) -> None:
    """``torch.save`` through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_rows(run_dir: Path, rows: list[dict]) -> None:
    mdir = run_dir / "metrics"
    mdir.mkdir(parents=True, exist_ok=True)
    with open(mdir / "rounds.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def read_rows(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics" / "rounds.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def write_csv(run_dir: Path) -> Path:
    rows = read_rows(run_dir)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = Path(run_dir) / "metrics" / "rounds.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return out


def _rows_from(replies: list[Message], base: dict) -> list[dict]:
    rows = []
    for m in replies:
        if m.has_error():
            continue
        metrics = dict(next(iter(m.content.metric_records.values())))
        rows.append({**base, "node": int(m.metadata.src_node_id), **metrics, "site": _site_key(m)[0]})
    return sorted(rows, key=lambda r: (r["site"], r["node"]))


def _site_key(m: Message) -> tuple[int, int]:
    """(site, node) of a reply: the partition index a simulated site reports; a real site has none, and its
    node ID names it."""
    records = list(m.content.metric_records.values()) if m.content is not None else []
    site = int(records[0].get("site", -1)) if records else -1
    return (site if site >= 0 else int(m.metadata.src_node_id), int(m.metadata.src_node_id))


def nanmean(rows: list[dict], key: str, weighted: bool = True) -> float:
    """Mean of ``key`` over ``rows`` (NaN left out), weighted by each row's scans; ``weighted=False``: one row, one
    vote (figures every site measured on the same scans)."""
    ok = [r for r in rows if key in r and isinstance(r[key], (int, float)) and not math.isnan(r[key])]
    w = [r.get("num-examples", 1) if weighted else 1 for r in ok]
    return float(np.average([r[key] for r in ok], weights=w)) if ok and sum(w) > 0 else float("nan")


def _nanmin(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r and isinstance(r[key], (int, float)) and not math.isnan(r[key])]
    return float(min(vals)) if vals else float("nan")


def _f4(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _check(replies: list[Message], expected: int, what: str, log) -> list[Message]:
    """The replies without errors, in site order (not arrival order: aggregation then does not depend on timing)."""
    ok = sorted((m for m in replies if not m.has_error()), key=_site_key)
    for m in replies:
        if m.has_error():
            log(f"  site node {m.metadata.src_node_id} failed in {what}: {m.error.reason}")
    if not ok:
        raise RuntimeError(f"every site failed in {what}; see the messages above")
    if len(ok) < expected:
        log(f"  warning: {len(ok)} of {expected} sites answered in {what}")
    return ok


@dataclass
class _Phase:
    """What every round of one phase uses: its strategy, the config sent to sites, extra records, privacy ledger."""

    name: str
    rounds: int
    strategy: FedAvg
    base_cfg: dict
    extra: dict[str, ArrayRecord]
    ledger: PrivacyLedger | None
    opt_file: Path
    control: dict[str, torch.Tensor] | None = None  # SCAFFOLD's c (scaffold), saved with every round
    control_file: Path | None = None
    average: swa.RoundAverage | None = None  # the weight average across the last rounds (swa_rounds)
    average_file: Path | None = None


def _start_arrays(run_dir: Path, phase: str, model, shared: list[str], done: int, rounds: int, log) -> ArrayRecord:
    """The shared arrays the phase starts from: the model's, or those saved after its last finished round."""
    arrays = ArrayRecord({k: v for k, v in model.state_dict().items() if k in shared})
    if done:
        arrays = ArrayRecord(torch.load(run_dir / "server" / f"{phase}.pt", map_location="cpu", weights_only=True))
        if done >= rounds:
            log(f"[{phase}] all {rounds} rounds already done")
    return arrays


def _root_set(phase: str, profile: cfgmod.Profile, source: str, log) -> RootSet | None:
    """The server's clean root set, for the classifier under FLTrust or OptiGradTrust; else None."""
    fed = profile.federated
    if phase != "classifier" or fed.aggregation not in ("fltrust", "optigradtrust") or fed.method == "local":
        return None
    if not source:
        raise ValueError(f"{fed.aggregation} needs the server's root set: set run-config root-data='/path/to/scans'")
    root = RootSet(profile, *task.root_set(source, profile))
    log(f"[{phase}] {fed.aggregation}: server root set of {len(root.labels)} clean training scans")
    return root


def _privacy_ledger(phase: str, fed: cfgmod.FederatedConfig, done: int, rounds: int) -> PrivacyLedger | None:
    """The classifier's privacy ledger under DP, advanced past the finished rounds; else None."""
    if phase != "classifier" or fed.dp_sigma <= 0:
        return None
    ledger = PrivacyLedger(fed.dp_sigma, fed.sites, fed.dp_delta)
    if done:
        ledger.step(min(done, rounds))
    return ledger


def _prepare_phase(run_dir: Path, profile: cfgmod.Profile, phase: str, done: int, globals_: dict[str, ArrayRecord],
                   base_cfg: dict, root_source: str, log) -> tuple[_Phase, torch.nn.Module, ArrayRecord]:
    """(the phase's round settings, its model, the shared arrays it starts from), a saved optimizer state loaded."""
    fed = profile.federated
    rounds = fed.phase_rounds[phase]
    model = task.build_model(phase, profile)
    shared = task.shared_keys(phase, model, profile)
    params = {n for n, _ in model.named_parameters()}
    arrays = _start_arrays(run_dir, phase, model, shared, done, rounds, log)
    root = _root_set(phase, profile, root_source, log)
    strategy = make_strategy(phase, profile, grid_sites=fed.sites, root=root,
                             buffers=[k for k in shared if k not in params])
    opt_file = run_dir / "server" / f"{phase}-opt.pt"
    if done and isinstance(strategy, ServerOptimizer) and opt_file.exists():
        strategy.load_state(torch.load(opt_file, map_location="cpu", weights_only=True))
    ledger = _privacy_ledger(phase, fed, done, rounds)
    extra = {}
    if phase == "classifier" and fed.method == "medfedpure":
        extra = {name: globals_[name] for name in ("detector", "denoiser") if name in globals_}
    control, control_file = None, None
    if phase == "classifier" and fed.scaffold:
        control_file = run_dir / "server" / f"{phase}-control.pt"
        control = {}
        if done:
            if not control_file.exists():
                raise FileNotFoundError(f"{control_file} is missing: the run cannot resume SCAFFOLD's control "
                                        f"variate after round {done}")
            control = torch.load(control_file, map_location="cpu", weights_only=True)
    average, average_file = None, None
    if phase == "classifier" and fed.swa_rounds:
        average_file = run_dir / "server" / f"{phase}-swa.pt"
        average = swa.load(average_file, done, rounds, fed.swa_rounds)
    return (_Phase(phase, rounds, strategy, base_cfg, extra, ledger, opt_file, control, control_file, average,
                   average_file), model, arrays)


def _mark_trust(rows: list[dict], strategy) -> None:
    """Each site's trust and exclusion in the last aggregation, where the strategy reports them."""
    trust = getattr(strategy, "last_trust", {})
    excluded = getattr(strategy, "last_excluded", {})
    for r in rows:
        if r["node"] in trust:
            r["trust"] = trust[r["node"]]
        if r["node"] in excluded:
            r["excluded"] = excluded[r["node"]]


def _spend_privacy(ph: _Phase, fed: cfgmod.FederatedConfig, rnd: int, rows: list[dict], log) -> None:
    spent = ph.ledger.step()
    log(f"[{ph.name}] round {rnd}: privacy spent per site epsilon {spent['epsilon']:.2f} at delta {fed.dp_delta:g} "
        f"(aggregate {spent['epsilon_aggregate']:.2f})")
    for r in rows:
        r["dp_epsilon"], r["dp_epsilon_aggregate"] = spent["epsilon"], spent["epsilon_aggregate"]


def _train_round(grid: Grid, ph: _Phase, fed: cfgmod.FederatedConfig, rnd: int, arrays: ArrayRecord,
                 log) -> tuple[ArrayRecord, list[dict]]:
    """Send ``arrays`` to the sites to train on; (the aggregated arrays, one row per site)."""
    log(f"[{ph.name}] round {rnd}/{ph.rounds}: training at {fed.sites} sites ...")
    msgs = list(ph.strategy.configure_train(rnd, arrays, ConfigRecord(dict(ph.base_cfg)), grid))
    for m in msgs:
        for name, rec in ph.extra.items():
            if fed.purify_train or fed.purify_fraction > 0 or fed.through_purifier:
                m.content[name] = rec
        if ph.control:
            m.content[scaffold.SERVER_RECORD] = ArrayRecord(ph.control)
    replies = list(grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT))
    ok = _check(replies, len(msgs), f"{ph.name} round {rnd} training", log)
    if ph.control is not None:  # the sites' changes of c_i move c; the strategy sees the weights only
        deltas = []
        for m in ok:
            if scaffold.DELTA_RECORD not in m.content:
                raise RuntimeError(f"{ph.name} round {rnd}: a site sent no SCAFFOLD control change")
            deltas.append(m.content[scaffold.DELTA_RECORD].to_torch_state_dict())
            del m.content[scaffold.DELTA_RECORD]
        ph.control = scaffold.server_update(ph.control, deltas, fed.sites)
    new_arrays, _ = ph.strategy.aggregate_train(rnd, ok)
    if new_arrays is None:
        raise RuntimeError(f"{ph.name} round {rnd}: the strategy could not aggregate the sites' updates")
    rows = _rows_from(ok, {"phase": ph.name, "round": rnd, "kind": "train", "method": fed.method})
    _mark_trust(rows, ph.strategy)
    if ph.ledger is not None:
        _spend_privacy(ph, fed, rnd, rows, log)
    return new_arrays, rows


def _evaluate_round(grid: Grid, ph: _Phase, fed: cfgmod.FederatedConfig, rnd: int, arrays: ArrayRecord,
                    log) -> list[dict]:
    """Send ``arrays`` to the sites to evaluate; one row per site."""
    emsgs = list(ph.strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(ph.base_cfg)), grid))
    for m in emsgs:
        for name, rec in ph.extra.items():
            m.content[name] = rec
    ereplies = list(grid.send_and_receive(emsgs, timeout=ROUND_TIMEOUT))
    eok = _check(ereplies, len(emsgs), f"{ph.name} round {rnd} evaluation", log)
    return _rows_from(eok, {"phase": ph.name, "round": rnd, "kind": "eval", "method": fed.method})


def _recalibrate_bn(grid: Grid, ph: _Phase, fed: cfgmod.FederatedConfig, rnd: int, arrays: ArrayRecord,
                   log) -> ArrayRecord:
    """``arrays`` with the shared batch-norm statistics the sites measure on their training scans, pooled."""
    msgs = list(ph.strategy.configure_evaluate(rnd, arrays, ConfigRecord({**ph.base_cfg, "bn-statistics": True}),
                                               grid))
    ok = _check(list(grid.send_and_receive(msgs, timeout=ROUND_TIMEOUT)), len(msgs),
                f"{ph.name} round {rnd} batch-norm statistics", log)
    parts = [(int(m.content["metrics"]["num-examples"]), m.content["arrays"].to_torch_state_dict()) for m in ok]
    pooled = task.combine_bn_statistics(parts)
    state = arrays.to_torch_state_dict()
    state.update({k: v.to(state[k].dtype) for k, v in pooled.items() if k in state})
    return ArrayRecord(state)


def _run_round(grid: Grid, run_dir: Path, ph: _Phase, fed: cfgmod.FederatedConfig, state: RunState, rnd: int,
               arrays: ArrayRecord, log) -> ArrayRecord:
    """Train (and evaluate, when due) one round; its rows, arrays, optimizer state and time saved."""
    t0 = time.perf_counter()
    arrays, train_rows = _train_round(grid, ph, fed, rnd, arrays, log)
    if ph.average is not None and rnd >= swa.first_round(ph.rounds, fed.swa_rounds):
        ph.average.add(arrays.to_torch_state_dict())
    due = rnd % fed.eval_every == 0 or rnd == ph.rounds
    if due and ph.name == "classifier" and fed.bn_recalibrate:
        arrays = _recalibrate_bn(grid, ph, fed, rnd, arrays, log)
    kept = arrays  # what the sites evaluate and keep: the last round's arrays, or the average across rounds
    if ph.average is not None and rnd == ph.rounds:
        log(f"[{ph.name}] the sites keep the mean of rounds {swa.first_round(ph.rounds, fed.swa_rounds)}-{rnd}; "
            "measuring its batch-norm statistics ...")
        kept = _recalibrate_bn(grid, ph, fed, rnd, ArrayRecord(ph.average.averaged()), log)
        _save(run_dir / "server" / f"{ph.name}-kept.pt", kept.to_torch_state_dict())
    eval_rows = _evaluate_round(grid, ph, fed, rnd, kept, log) if due else []
    log(f"[{ph.name}] round {rnd}/{ph.rounds}: " + _round_line(ph.name, train_rows, eval_rows)
        + f" ({time.perf_counter() - t0:.0f} s)")
    _append_rows(run_dir, train_rows + eval_rows)
    _save(run_dir / "server" / f"{ph.name}.pt", arrays.to_torch_state_dict())
    if isinstance(ph.strategy, ServerOptimizer):
        _save(ph.opt_file, ph.strategy.state())
    if ph.control is not None:
        _save(ph.control_file, ph.control)
    if ph.average is not None:
        _save(ph.average_file, ph.average.state())
    state.mark(ph.name, rnd, time.perf_counter() - t0)
    return arrays


def run_server(grid: Grid, run_dir: str | Path, profile: cfgmod.Profile, data_source: str = "",
               threads_per_site: int = 0, log=print, root_source: str = "") -> dict:
    """Train every phase of ``profile.federated`` over the sites of ``grid``; returns the summary."""
    run_dir = Path(run_dir)
    fed = profile.federated
    state = RunState(run_dir)
    profile_json = json.dumps(cfgmod.to_dict(profile))
    globals_: dict[str, ArrayRecord] = {}
    t_run = time.perf_counter()
    for phase in profile.phases:
        done = state.done(phase)
        base_cfg = {"phase": phase, "profile": profile_json, "data": data_source, "run-dir": str(run_dir.resolve()),
                    "threads-per-site": int(threads_per_site)}
        ph, model, arrays = _prepare_phase(run_dir, profile, phase, done, globals_, base_cfg,
                                           root_source or data_source, log)
        for rnd in range(done + 1, ph.rounds + 1):
            arrays = _run_round(grid, run_dir, ph, fed, state, rnd, arrays, log)
        globals_[phase] = arrays
        if phase != "classifier":
            _save_global(run_dir, phase, profile, arrays, model)
    write_csv(run_dir)
    summary = write_summary(run_dir, profile, time.perf_counter() - t_run)
    return summary


def _round_line(phase: str, train_rows: list[dict], eval_rows: list[dict]) -> str:
    parts = [f"train loss {nanmean(train_rows, 'loss'):.4f}"]
    if phase == "classifier" and eval_rows:
        parts.append(f"clean acc {nanmean(eval_rows, 'clean_acc'):.3f}")
        parts.append(f"PGD acc {nanmean(eval_rows, 'pgd_acc'):.3f}")
    elif eval_rows:
        key = task.VAL_METRIC[phase][0]
        parts.append(f"{key} {nanmean(eval_rows, key):.5f}")
    return ", ".join(parts)


def _save_global(run_dir: Path, phase: str, profile: cfgmod.Profile, arrays: ArrayRecord, model) -> None:
    """The federated detector / denoiser in the centralised checkpoint format (report, export read it)."""
    state = model.state_dict()
    state.update({k: v for k, v in arrays.to_torch_state_dict().items() if k in state})
    digest = data_record(run_dir).get("split_digest", "") if (run_dir / "data.txt").exists() else ""
    save_checkpoint(run_dir / phase / "best.pt", component=phase, model=state, config=cfgmod.to_dict(profile),
                    split_digest=digest, class_names=[], metrics={}, epoch=profile.federated.phase_rounds[phase],
                    step=0, best=None, history=[])


def training_defense_summary(rows: list[dict], profile: cfgmod.Profile) -> dict:
    """Aggregation, poisoning and privacy figures of a run: accuracy at the honest sites, detection, epsilon.

    A site counts as detected in a round when the aggregation left its update
    out (FLTrust: trust 0, i.e. its update points away from the root set's;
    OptiGradTrust: trust below its threshold); precision and recall are over
    all rounds and sites. Which sites were malicious is known in simulation only.
    """
    from training.federated.poison import malicious_sites

    fed = profile.federated
    bad = malicious_sites(fed.sites, fed.malicious_fraction, profile.seed) if fed.poison != "none" else []
    out: dict = {"aggregation": fed.aggregation, "poison": fed.poison, "malicious_fraction": fed.malicious_fraction,
                 "malicious_sites": bad}
    cls = [r for r in rows if r["phase"] == "classifier"]
    ev = [r for r in cls if r["kind"] == "eval"]
    if ev:
        last = max(r["round"] for r in ev)
        honest = [r for r in ev if r["round"] == last and r["site"] not in bad]
        out["honest_clean_acc"] = nanmean(honest, "clean_acc")
        out["honest_pgd_acc"] = nanmean(honest, "pgd_acc")
        out["honest_clean_acc_per_round"] = {
            int(rnd): nanmean([r for r in ev if r["round"] == rnd and r["site"] not in bad], "clean_acc")
            for rnd in sorted({r["round"] for r in ev})}
    trusted = [r for r in cls if r["kind"] == "train" and "trust" in r]
    if trusted:
        flagged = [r for r in trusted if r.get("excluded", r["trust"] < 0.5)]
        hit = sum(1 for r in flagged if r["site"] in bad)
        positives = sum(1 for r in trusted if r["site"] in bad)
        out["detection_precision"] = hit / len(flagged) if flagged else float("nan")
        out["detection_recall"] = hit / positives if positives else float("nan")
        out["mean_trust_malicious"] = float(np.mean([r["trust"] for r in trusted if r["site"] in bad])) if positives else float("nan")
        out["mean_trust_honest"] = float(np.mean([r["trust"] for r in trusted if r["site"] not in bad]))
    eps = [r["dp_epsilon"] for r in cls if "dp_epsilon" in r]
    if eps:
        out["dp_epsilon"] = max(eps)
        out["dp_epsilon_aggregate"] = max(r["dp_epsilon_aggregate"] for r in cls if "dp_epsilon_aggregate" in r)
        out["dp"] = {"clip": fed.dp_clip, "sigma": fed.dp_sigma, "weight_sigma": fed.dp_weight_sigma, "delta": fed.dp_delta}
    return out


def _final_eval_rows(rows: list[dict], profile: cfgmod.Profile) -> dict[str, list[dict]]:
    """Per phase, the evaluation rows of its last evaluated round."""
    final = {}
    for phase in profile.phases:
        ev = [r for r in rows if r["phase"] == phase and r["kind"] == "eval"]
        if not ev:
            continue
        last = max(r["round"] for r in ev)
        final[phase] = [r for r in ev if r["round"] == last]
    return final


def _summary(profile: cfgmod.Profile, cls: list[dict], seconds: float) -> dict:
    """The run's settings and the classifier's final figures, mean over sites and per site."""
    fed = profile.federated
    return {
        "method": fed.method, "profile": profile.name, "sites": fed.sites,
        "rounds": {ph: fed.phase_rounds[ph] for ph in profile.phases},
        "local_epochs": {ph: fed.phase_epochs[ph] for ph in profile.phases}, "partition": fed.partition, "fedbn": fed.fedbn,
        "eval_attack": cfgmod.to_dict(profile)["federated"]["eval_attack"],
        "mean_clean_acc": nanmean(cls, "clean_acc"), "mean_pgd_acc": nanmean(cls, "pgd_acc"),
        # PROTOCOL.md rule 8: beside the scan-weighted mean, figures a label-skewed site cannot flatter
        "mean_balanced_acc": nanmean(cls, "clean_balanced_acc"), "mean_sensitivity": nanmean(cls, "clean_sensitivity"),
        "min_site_clean_acc": _nanmin(cls, "clean_acc"),
        # every site is measured on the same pooled scans: one site, one vote (weight 1)
        "mean_pooled_balanced_acc": nanmean(cls, "pooled_balanced_acc", weighted=False),
        "min_pooled_balanced_acc": _nanmin(cls, "pooled_balanced_acc"),
        # for choosing recipes on validation scans (rule 10)
        "mean_val_balanced_acc": nanmean(cls, "val_balanced_acc"),
        "mean_pooled_val_balanced_acc": nanmean(cls, "pooled_val_balanced_acc", weighted=False),
        "per_site": [{k: r.get(k) for k in ("site", "num-examples", "clean_acc", "pgd_acc", "clean_acc_classifier",
                                            "pgd_acc_classifier", "flag_rate_clean", "flag_rate_pgd", "tau",
                                            *task.CLINICAL_KEYS) if k in r}
                     for r in cls],
        "wall_seconds_this_session": seconds,
    }


def _summary_markdown(summary: dict, profile: cfgmod.Profile, plot: Path | None) -> str:
    """``summary.md``: the means, clinical figures, time per phase and a table per site."""
    fed = profile.federated
    lines = [f"# Federated run: {fed.method}", "",
             f"{fed.sites} sites, partition `{fed.partition}`, profile `{profile.name}`, rounds {summary['rounds']}, "
             f"local epochs {summary['local_epochs']}; PGD for evaluation: {profile.federated.eval_attack.describe()}", "",
             f"Mean over sites (weighted by test scans): clean accuracy **{summary['mean_clean_acc']:.4f}**, "
             f"PGD accuracy **{summary['mean_pgd_acc']:.4f}**", "",
             f"Clinical figures (PROTOCOL.md rule 8): balanced accuracy {summary['mean_balanced_acc']:.4f}, "
             f"sensitivity (tumor recall) {summary['mean_sensitivity']:.4f}, worst site's clean accuracy "
             f"{summary['min_site_clean_acc']:.4f}; each site's system on the pooled test set (all sites' scans), "
             f"balanced accuracy: mean {summary['mean_pooled_balanced_acc']:.4f}, worst site "
             f"{summary['min_pooled_balanced_acc']:.4f}", "",
             f"Validation (for choosing recipes): balanced accuracy {summary['mean_val_balanced_acc']:.4f} on the "
             f"sites' own scans, {summary['mean_pooled_val_balanced_acc']:.4f} on the pooled validation set", ""]
    if "phase_seconds" in summary:
        lines += ["Time per phase: " + ", ".join(f"{ph} {sec / 60:.1f} min" for ph, sec in summary["phase_seconds"].items())
                  + f" (total {sum(summary['phase_seconds'].values()) / 60:.1f} min)", ""]
    figures = ("clean_acc", "pgd_acc", "clean_acc_classifier", "pgd_acc_classifier", "clean_balanced_acc",
               "clean_sensitivity", "pooled_balanced_acc")
    lines += table(["site", "test scans", "clean acc", "PGD acc", "clean acc (classifier only)",
                    "PGD acc (classifier only)", "balanced acc", "sensitivity", "pooled balanced acc"],
                   [[r["site"], r.get("num-examples", 0), *(_f4(r.get(k)) for k in figures)]
                    for r in summary["per_site"]],
                   align="r" * 9)
    if plot:
        lines += ["", f"![convergence]({plot.name})"]
    return "\n".join(lines) + "\n"


def write_summary(run_dir: Path, profile: cfgmod.Profile, seconds: float) -> dict:
    """``summary.json`` / ``summary.md``: final per-site figures and the convergence plot."""
    from training.federated.plot import convergence_plot

    rows = read_rows(run_dir)
    final = _final_eval_rows(rows, profile)
    summary = _summary(profile, final.get("classifier", []), seconds)
    phase_seconds = RunState(run_dir).data.get("phase_seconds")
    if isinstance(phase_seconds, dict) and phase_seconds:
        summary["phase_seconds"] = {str(k): float(v) for k, v in phase_seconds.items()}
    for phase in ("denoiser", "detector"):
        if phase in final:
            key = task.VAL_METRIC[phase][0]
            summary[f"{phase}_{key}"] = nanmean(final[phase], key)
    summary.update(training_defense_summary(rows, profile))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    plot = convergence_plot([run_dir], run_dir / "convergence.png")
    (run_dir / "summary.md").write_text(_summary_markdown(summary, profile, plot))
    return summary


# --------------------------------------------------------------------------- the app for real deployments

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run`` entry: ``run-config`` gives ``run-dir`` (a folder made by ``python -m training deploy-prepare``)."""
    rc = context.run_config
    if not str(rc.get("run-dir", "")).strip():
        raise ValueError("set run-config \"run-dir='/path/to/run'\" (prepared with: python -m training deploy-prepare)")
    run_dir = Path(str(rc["run-dir"])).expanduser()
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.toml'} not found on the SuperLink machine "
                                "(prepare the run folder there with: python -m training deploy-prepare)")
    profile = cfgmod.load_toml(run_dir / "config.toml")
    run_server(grid, run_dir, profile, data_source="", log=lambda s: print(s, flush=True),
               root_source=str(rc.get("root-data", "")))

