"""Flower ClientApp: one hospital. Scans never leave this process; only model arrays do.

Messages from the ServerApp carry, in their ``config`` record, the phase
(``denoiser`` | ``detector`` | ``classifier``), the resolved profile (JSON)
and, in simulation, the data source and run folder. The site finds its data:

- **simulation**: ``node_config["partition-id"]`` / ``["num-partitions"]``
  pick its part of the shared data source; its state lives in
  ``RUN/sites/site-<k>/``;
- **a real site** (``flower-supernode --node-config``): ``data-dir`` is the
  site's own folder (Br35H layout or one sub-folder per class), ``state-dir``
  where it keeps its personal state (default ``<data-dir>/../medfedpure-state``),
  ``threads`` the CPU threads torch may use.

Personal state (the gates, and batch-norm with FedBN; everything for
``local``) is kept in ``context.state`` and on disk as
``<state-dir>/<phase>-local-round<r>.pt``, so a restarted site continues with
its own gates. The personalized classifier (shared experts + own gates) is
written to ``<state-dir>/classifier.pt`` after every evaluation.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from training import config as cfgmod
from training.checkpoint import save_checkpoint
from training.federated import poison, privacy, scaffold, task

app = ClientApp()


# --------------------------------------------------------------------------- where the site is


def _site(context: Context, cfg: ConfigRecord) -> tuple[str, int | None, int | None, Path]:
    """(data source, site index or None, number of sites or None, state folder)."""
    nc = context.node_config
    if "data-dir" in nc:
        data_dir = Path(str(nc["data-dir"])).expanduser()
        state = Path(str(nc.get("state-dir", data_dir.parent / "medfedpure-state"))).expanduser()
        return str(data_dir), None, None, state
    if "partition-id" not in nc:
        raise ValueError("this SuperNode has no data: start it with --node-config \"data-dir='/path/to/scans'\"")
    k, n = int(nc["partition-id"]), int(nc["num-partitions"])
    return str(cfg["data"]), k, n, Path(str(cfg["run-dir"])) / "sites" / f"site-{k}"


def _threads(context: Context, cfg: ConfigRecord) -> None:
    n = int(context.node_config.get("threads", cfg.get("threads-per-site", 0)) or 0)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _profile(cfg: ConfigRecord) -> cfgmod.Profile:
    return cfgmod.from_dict(json.loads(str(cfg["profile"])))


# --------------------------------------------------------------------------- personal state


def _local_file(state_dir: Path, phase: str, rnd: int) -> Path:
    return state_dir / f"{phase}-local-round{rnd}.pt"


def _load_local(context: Context, state_dir: Path, phase: str, rnd: int) -> dict[str, torch.Tensor] | None:
    """The site's personal arrays as they were after round ``rnd`` (memory first, then disk)."""
    if rnd < 1:
        return None
    meta = context.state.get(f"{phase}.local.meta")
    if meta is not None and int(meta["round"]) == rnd:
        return context.state[f"{phase}.local"].to_torch_state_dict()
    f = _local_file(state_dir, phase, rnd)
    if f.exists():
        return torch.load(f, map_location="cpu", weights_only=True)
    return None


def _save_local(context: Context, state_dir: Path, phase: str, rnd: int, local: dict[str, torch.Tensor]) -> None:
    context.state[f"{phase}.local"] = ArrayRecord(local)
    context.state[f"{phase}.local.meta"] = ConfigRecord({"round": rnd})
    state_dir.mkdir(parents=True, exist_ok=True)
    f = _local_file(state_dir, phase, rnd)
    tmp = f.with_suffix(".tmp")
    torch.save(local, tmp)
    os.replace(tmp, f)
    for old in state_dir.glob(f"{phase}-local-round*.pt"):  # keep this round and the one before (resume)
        r = int(old.stem.rsplit("round", 1)[1])
        if r < rnd - 1:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------- model assembly


def _assemble(phase: str, profile, msg: Message, local: dict | None):
    model = task.build_model(phase, profile)
    keys = task.local_keys(phase, model, profile)
    state = model.state_dict()
    shared = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else {}
    state.update({k: v for k, v in shared.items() if k in state})
    if local:
        state.update({k: v for k, v in local.items() if k in keys})
    model.load_state_dict(state)
    return model, keys


def _defense(msg: Message, profile, classifier, data: task.SiteData):
    """The site's pipeline from the global detector and denoiser carried by the message (MedFedPure)."""
    if "denoiser" not in msg.content:
        return None
    parts = {"detector": None}  # no MAE phase when the detection score does not use it
    for name in ("detector", "denoiser"):
        if name not in msg.content:
            continue
        m = task.build_model(name, profile)
        m.load_state_dict(msg.content[name].to_torch_state_dict())
        parts[name] = m.eval()
    return task.make_defense(classifier, parts["detector"], parts["denoiser"], profile, data["val"])


def _metrics(values: dict, site: int) -> MetricRecord:
    clean = {k: (float(v) if isinstance(v, float) else int(v)) for k, v in values.items() if isinstance(v, (int, float))}
    clean["site"] = site
    return MetricRecord(clean)


# --------------------------------------------------------------------------- handlers


def _prepare(msg: Message, context: Context, local_round_offset: int):
    """What both handlers start from: the phase, round, profile, the site's data, and its model.

    The model is the message's shared arrays plus the site's personal state of
    round ``rnd - local_round_offset`` (the previous round before training,
    this round's after it, for evaluation), returned last as well.
    """
    cfg = msg.content["config"]
    _threads(context, cfg)
    phase, rnd = str(cfg["phase"]), int(cfg["server-round"])
    profile = _profile(cfg)
    source, k, n, state_dir = _site(context, cfg)
    data = task.site_data(source, profile, k, n)
    local = _load_local(context, state_dir, phase, rnd - local_round_offset)
    model, keys = _assemble(phase, profile, msg, local)
    return phase, rnd, profile, k, state_dir, data, model, keys, local or {}


def _malicious(profile, k: int | None, phase: str) -> bool:
    """Whether this simulated site poisons the classifier phase (experiments only; a real site never does)."""
    fed = profile.federated
    if k is None or phase != "classifier" or fed.poison == "none":
        return False
    return k in poison.malicious_sites(fed.sites, fed.malicious_fraction, profile.seed)


def _outgoing(profile, phase: str, rnd: int, site: int, model, state: dict, start: dict, received: dict,
              malicious: bool) -> dict:
    """The shared arrays the site sends: ``received`` + its update, poisoned (malicious) or privatised (Fed-Safe).

    The update is taken against ``start``, the weights training began from
    (``received`` plus Fed-Safe's weight noise, if any). Arrays that are not
    floating point (batch counters) go as trained.
    """
    fed = profile.federated
    floats = [k2 for k2 in received if state[k2].is_floating_point()]
    update = {k2: state[k2] - start[k2] for k2 in floats}
    if malicious and fed.poison != "labelflip":
        params = {n for n, _ in model.named_parameters()}
        bad = poison.poison_update(fed.poison, {k2: v for k2, v in update.items() if k2 in params}, fed.poison_scale,
                                   poison.poison_generator(profile.seed, site, rnd))
        update.update(bad)
    elif phase == "classifier" and fed.dp_clip > 0:
        g = torch.Generator().manual_seed(zlib.crc32(f"dp/{profile.seed}/{site}/{rnd}".encode()))
        update = privacy.privatize(update, fed.dp_clip, fed.dp_sigma, g)
    out = {k2: state[k2] for k2 in received}
    out.update({k2: received[k2] + v for k2, v in update.items()})
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    phase, rnd, profile, k, state_dir, data, model, keys, local = _prepare(msg, context, local_round_offset=1)
    fed = profile.federated
    site = data.site if k is not None else -1
    malicious = _malicious(profile, k, phase)
    if malicious and fed.poison == "labelflip":
        tr = data["train"]
        data = replace(data, splits={**data.splits, "train": replace(tr, labels=poison.flip_labels(tr.labels, len(data.class_names)))})
    received = {k2: v.clone() for k2, v in model.state_dict().items() if k2 not in keys}
    if phase == "classifier" and fed.dp_weight_sigma > 0:  # Fed-Safe: noise on the weights received, too
        g = torch.Generator().manual_seed(zlib.crc32(f"dpw/{profile.seed}/{site}/{rnd}".encode()))
        model.load_state_dict({**model.state_dict(), **privacy.noisy_weights(received, fed.dp_weight_sigma, g)})
    defense = _defense(msg, profile, model, data) if phase == "classifier" else None
    global_shared = {k2: v.clone() for k2, v in model.state_dict().items() if k2 not in keys}
    # the site's optimizer moments after its previous round, if any
    moments = {k2: v for k2, v in local.items() if k2.startswith(task.OPTIM_PREFIX)} if fed.keep_optimizer_state else None
    correction = None
    if phase == "classifier" and fed.scaffold:  # c from the server, c_i from the site's previous round
        server_c = (msg.content[scaffold.SERVER_RECORD].to_torch_state_dict()
                    if scaffold.SERVER_RECORD in msg.content else {})
        correction = scaffold.ScaffoldCorrection(model, global_shared, server_c, scaffold.site_control(local or {}))
    stats = task.local_train(phase, model, data, profile, rnd, defense=defense, global_shared=global_shared,
                             optimizer_state=moments, correction=correction)
    state = model.state_dict()
    control = scaffold.saved_control(correction.control()) if correction is not None else {}
    _save_local(context, state_dir, phase, rnd,
                {**{k2: v for k2, v in state.items() if k2 in keys}, **(moments or {}), **control})
    shared = _outgoing(profile, phase, rnd, site, model, state, global_shared, received, malicious)
    stats["update_norm"] = privacy.update_norm({k2: state[k2] - global_shared[k2] for k2 in received
                                                if state[k2].is_floating_point()})  # before clipping / poisoning
    if fed.poison != "none" and phase == "classifier":
        stats["malicious"] = int(malicious)
    info = ConfigRecord({"split-digest": data.digest, "state-dir": str(state_dir)})
    content = RecordDict({"arrays": ArrayRecord(shared), "metrics": _metrics(stats, data.site if k is not None else -1),
                          "site-info": info})
    if correction is not None:
        content[scaffold.DELTA_RECORD] = ArrayRecord(correction.delta())
    return Message(content=content, reply_to=msg)


def _bn_statistics_reply(msg: Message, data: task.SiteData, model, k: int | None) -> Message:
    """The shared batch-norm layers' statistics of the received model on the site's training scans."""
    shared = set(msg.content["arrays"].keys()) if "arrays" in msg.content else set()
    stats = task.bn_statistics(model, data["train"], shared)
    metrics = _metrics({"num-examples": len(data["train"])}, data.site if k is not None else -1)
    return Message(content=RecordDict({"arrays": ArrayRecord(stats), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    phase, rnd, profile, k, state_dir, data, model, keys, _ = _prepare(msg, context, local_round_offset=0)
    if bool(msg.content["config"].get("bn-statistics", False)):  # before the evaluation proper (bn_recalibrate)
        return _bn_statistics_reply(msg, data, model, k)
    t0 = time.perf_counter()
    if phase == "classifier":
        defense = _defense(msg, profile, model, data)
        # The pooled test set (every site's scans) only once, in the phase's last round: it costs a pass over all of them.
        values = task.evaluate_site(model, data, profile, defense,
                                    pooled=rnd == profile.federated.phase_rounds[phase])
        save_checkpoint(
            state_dir / "classifier.pt", component="classifier", model=model.state_dict(),
            config=cfgmod.to_dict(task.classifier_profile(profile)), split_digest=data.digest,
            class_names=data.class_names, metrics=values, epoch=rnd, site=data.site,
            local_keys=sorted(keys), shared_source="federated",
        )
    else:
        values = task.evaluate_phase(phase, model, data, profile)
    values["eval_seconds"] = time.perf_counter() - t0
    content = RecordDict({"metrics": _metrics(values, data.site if k is not None else -1)})
    return Message(content=content, reply_to=msg)

