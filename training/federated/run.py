"""One command for a whole federated run, simulated on this machine (``flwr.simulation``).

``python -m training train --method medfedpure --sites 10 --rounds R ...``
prepares the run folder (resolved config, split digest, the partition table)
and runs the ServerApp against N simulated sites. Running the same command
again resumes from the last finished round. ``--continue-from RUN`` starts a
new run folder from another run's state (:func:`continue_run`), e.g. to add
robust rounds (``--robust-rounds``) to a finished run.

Two backends simulate the sites: ``ray`` (Flower's simulation engine, sites in
parallel) and ``inprocess`` (``inprocess.InProcessGrid``: one site after
another in this process, without Ray's start-up).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from functools import partial
from pathlib import Path

from training import config as cfgmod
from training.data.partition import describe
from training.runs import data_record, write_data_record


def prepare_run(profile: cfgmod.Profile, data_source: str, out: str | Path, *, resume: bool = True,
                log=print) -> Path:
    """Write ``config.toml`` and ``data.txt``; refuse a folder that holds another configuration."""
    from training.federated import task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.toml"
    text = cfgmod.dump_toml(profile)
    if cfg_file.exists() and cfgmod.load_toml(cfg_file) != profile:
        if resume:
            raise cfgmod.UsageError(f"{cfg_file} holds another configuration; use a new --out (or --no-resume to start over)")
    if not resume:
        for f in ("server/state.json", "metrics/rounds.jsonl"):
            (out / f).unlink(missing_ok=True)
    cfg_file.write_text(text)
    data = task._dataset(data_source, profile.preprocess, profile.seed)
    if resume and (out / "data.txt").is_file():
        before = data_record(out).get("split_digest")
        if before and before != data.digest:
            raise cfgmod.UsageError(f"{out} was trained on other data (split digest {before[:12]}, this one "
                                    f"{data.digest[:12]}); use its --data, or a new --out")
    log(data.summary())
    parts = task.site_partitions(data, profile)
    for split in ("train", "test"):
        log(f"\n{split} scans per site ({profile.federated.partition}):")
        log(describe(parts[split], data[split].labels, data.class_names))
    write_data_record(out, data_source, data.digest)
    return out


# What may differ between a run and its continuation: how many classifier rounds, and what the last ones train on.
CONTINUABLE = ("rounds", "robust_rounds", "robust_lr_scale", "adv_fraction", "purify_fraction", "purify_train",
               "adversarial", "through_purifier", "textured_fraction", "train_attack", "eval_attack", "eval_every", "eval_max")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def run_config(run: str | Path) -> cfgmod.Profile:
    """The configuration a run folder was trained with (``RUN/config.toml``)."""
    f = Path(run) / "config.toml"
    if not f.is_file():
        raise cfgmod.UsageError(f"--continue-from {run}: not a run folder (no config.toml)")
    return cfgmod.load_toml(f)


def continue_run(source: str | Path, out: str | Path, profile: cfgmod.Profile) -> Path:
    """Copy the run folder ``source`` into the new folder ``out``, so that ``profile`` trains on from its state.

    Only the ``CONTINUABLE`` federated settings may differ, and the rounds trained before the robust ones
    (``rounds - robust_rounds``) must be those of ``source``: its finished rounds are then exactly the first
    rounds of ``profile``'s run, and the result is what training ``profile`` in one go gives.
    """
    from training.federated.server_app import RunState

    source, out = Path(source), Path(out)
    old = run_config(source)
    if out.exists() and any(out.iterdir()):
        raise cfgmod.UsageError(f"--continue-from writes a new run folder; {out} is not empty")
    fed, ofed = profile.federated, old.federated
    kept = dataclasses.replace(profile, federated=dataclasses.replace(
        fed, **{k: getattr(ofed, k) for k in CONTINUABLE}))
    if kept != old:
        a, b = _flat(cfgmod.to_dict(old)), _flat(cfgmod.to_dict(kept))
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise cfgmod.UsageError(f"--continue-from {source}: trained with other settings ({', '.join(diff)}); only "
                                f"federated {', '.join(CONTINUABLE)} may change")
    done = RunState(source).done("classifier")
    clean, old_clean = fed.rounds - fed.robust_rounds, ofed.rounds - ofed.robust_rounds
    if done and (clean != old_clean or done > clean):
        raise cfgmod.UsageError(f"--continue-from {source}: its {done} classifier round(s) were trained as the first "
                                f"of {old_clean} clean rounds; set --rounds and --robust-rounds so that rounds - "
                                f"robust_rounds = {old_clean}")
    shutil.copytree(source, out, dirs_exist_ok=True)
    record = out / "continued.json"
    record.write_text(json.dumps({"from_run": str(source), "classifier_rounds_done": done}, indent=1))
    (out / "config.toml").write_text(cfgmod.dump_toml(profile))
    return out


def run_federated(profile: cfgmod.Profile, data_source: str, out: str | Path, *, resume: bool = True,
                  threads_per_site: int = 1, parallel_sites: int | None = None, backend: str = "ray",
                  log=print) -> dict:
    """Simulate ``profile.federated.sites`` sites with ``backend`` (``ray`` | ``inprocess``); returns the run summary.

    ``parallel_sites`` applies to ``ray`` only; ``inprocess`` trains one site at a time.
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from training.federated.client_app import app as client_app
    from training.federated.server_app import run_server

    if backend not in ("ray", "inprocess"):
        raise ValueError(f"unknown simulation backend {backend!r} (ray | inprocess)")
    out = prepare_run(profile, data_source, out, resume=resume, log=log)
    fed = profile.federated
    server_log = partial(print, flush=True)
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(max(logging.WARNING, flwr_log.level))  # a caller may have asked for less (the demo)
    if backend == "inprocess":
        from training.federated.inprocess import InProcessGrid

        log(f"\nsimulating {fed.sites} sites in this process, one at a time ({threads_per_site} thread(s)) -> {out}")
        return run_server(InProcessGrid(client_app, fed.sites), out, profile, data_source, threads_per_site,
                          log=server_log)

    from flwr.simulation import run_simulation

    cpus = os.cpu_count() or 1
    parallel = max(1, min(parallel_sites or max(1, cpus // max(1, threads_per_site)), fed.sites))
    result: dict = {}
    errors: list[BaseException] = []

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            result.update(run_server(grid, out, profile, data_source, threads_per_site, log=server_log))
        except BaseException as err:  # noqa: BLE001 - surfaced after the simulation stops
            errors.append(err)
            raise

    log(f"\nsimulating {fed.sites} sites ({parallel} at a time, {threads_per_site} thread(s) each) -> {out}")
    ray_config = {
        "client_resources": {"num_cpus": max(1, cpus // parallel), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "error", "log_to_driver": True,
                      "include_dashboard": False},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.sites, backend_config=ray_config)
    if errors:
        raise errors[0]
    if not result:
        raise RuntimeError("the federated run stopped before it finished; run the same command again to resume")
    return result
