"""Federated training on Flower: partitions per split, what is shared, a whole simulated run, resume."""

import json

import numpy as np
import pytest
import torch

from training import config as C
from training.data.partition import class_shares, partition, partition_like
from training.federated import task


def test_partition_like_follows_training_shares():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 2, 600)
    test = rng.integers(0, 2, 300)
    parts = partition(train, 5, "dirichlet:0.5", seed=1)
    shares = class_shares(parts, train, 2)
    tparts = partition_like(test, shares, seed=1)
    allidx = np.concatenate(tparts)
    assert sorted(allidx.tolist()) == list(range(300))  # exhaustive and disjoint
    got = class_shares(tparts, test, 2)
    assert np.abs(got - shares).max() < 0.02  # within rounding of one scan per class


def test_partition_like_keeps_groups_together():
    labels = np.repeat([0, 1, 0, 1], 5)
    groups = np.repeat(np.arange(4), 5)
    parts = partition_like(labels, np.array([[0.5, 0.5], [0.5, 0.5]]), groups=groups)
    for g in range(4):
        assert sum(np.isin(np.flatnonzero(groups == g), p).any() for p in parts) == 1


@pytest.mark.parametrize("method", C.METHODS)
def test_shared_and_local_keys(method):
    p = C.resolve("tiny", {"federated": {"method": method}})
    model = task.build_model("classifier", p)
    keys = set(model.state_dict())
    local = task.local_keys("classifier", model, p)
    shared = set(task.shared_keys("classifier", model, p))
    assert local | shared == keys and not local & shared
    if method == "local":
        assert not shared
    elif method in ("pfeddef", "medfedpure"):
        assert local == {k for k in keys if k.startswith("gates.")}
        assert len(model.experts) == 3
    else:
        assert not local and len(model.experts) == 1
    fedbn = C.resolve(p, {"federated": {"fedbn": True}})
    if method != "local":
        assert any("bn" in k or "running_mean" in k for k in task.local_keys("classifier", model, fedbn))


def test_adversarial_local_training_runs_and_learns_nothing_from_labels_at_eval():
    p = C.resolve("tiny", {"federated": {"method": "pfeddef", "sites": 2, "partition": "iid", "adv_fraction": 0.5}})
    data = task.site_data("synth:120", p, 0, 2)
    model = task.build_model("classifier", p)
    stats = task.local_train("classifier", model, data, p, 1)
    assert stats["num-examples"] == len(data["train"]) and np.isfinite(stats["loss"])
    ev = task.evaluate_site(model, data, p)
    assert 0.0 <= ev["pgd_acc"] <= 1.0 and ev["num-examples"] == min(len(data["test"]), p.federated.eval_max)


@pytest.mark.slow
def test_simulated_medfedpure_run_personalizes_and_resumes(tmp_path, capsys):
    from training.federated.run import run_federated

    p = C.resolve("tiny", {"federated": {"method": "medfedpure", "sites": 2, "rounds": 2, "defense_rounds": 1,
                                         "eval_max": 8}})
    out = tmp_path / "run"
    summary = run_federated(p, "synth:120", out, threads_per_site=1)
    assert summary["sites"] == 2 and 0.0 <= summary["mean_clean_acc"] <= 1.0
    for f in ("config.toml", "summary.json", "summary.md", "convergence.png", "metrics/rounds.csv",
              "denoiser/best.pt", "sites/site-0/classifier.pt", "sites/site-1/classifier.pt"):
        assert (out / f).exists(), f
    # the noise-floor score (the default) does not use the MAE: its phase is skipped, and the time of each phase
    assert not (out / "detector").exists()
    times = json.loads((out / "server/state.json").read_text())["phase_seconds"]
    assert set(times) == {"denoiser", "classifier"} and all(t > 0 for t in times.values())
    assert C.load_toml(out / "config.toml") == p
    rows = [json.loads(line) for line in (out / "metrics" / "rounds.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r["phase"] == "classifier" and r["kind"] == "eval"]
    assert sorted((r["round"], r["site"]) for r in ev) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all("pgd_acc" in r and "flag_rate_clean" in r for r in ev)

    # personalization: the experts are the same at both sites, the gates are each site's own
    a = torch.load(out / "sites/site-0/classifier.pt", weights_only=False)
    b = torch.load(out / "sites/site-1/classifier.pt", weights_only=False)
    for k in a["model"]:
        same = torch.equal(a["model"][k], b["model"][k])
        assert same != k.startswith("gates."), k

    # resume: forget the last classifier round; the same run redoes only that round (the server's saved state
    # does not depend on the simulation engine: the in-process one resumes what Ray started, without a second
    # Ray start-up)
    state = json.loads((out / "server/state.json").read_text())
    state["classifier"] = 1
    (out / "server/state.json").write_text(json.dumps(state))
    capsys.readouterr()
    run_federated(p, "synth:120", out, threads_per_site=1, backend="inprocess")
    log = capsys.readouterr().out
    assert "[classifier] round 2/2" in log
    assert "[classifier] round 1/2" not in log and "[denoiser] round 1/1: training" not in log


@pytest.mark.slow
def test_inprocess_fedavg_run_without_ray(tmp_path):
    from training.federated.run import run_federated

    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 3, "rounds": 2, "eval_max": 8}})
    out = tmp_path / "run"
    summary = run_federated(p, "synth:120", out, threads_per_site=1, backend="inprocess", log=lambda *_: None)
    assert summary["sites"] == 3 and 0.0 <= summary["mean_clean_acc"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics" / "rounds.jsonl").read_text().splitlines()]
    for kind in ("train", "eval"):
        got = sorted((r["round"], r["site"]) for r in rows if r["kind"] == kind)
        assert got == [(rnd, k) for rnd in (1, 2) for k in range(3)], kind
    assert len({r["node"] for r in rows}) == 3


def test_inprocess_grid_delivers_keeps_state_and_reports_client_errors():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode
    from flwr.serverapp.strategy import FedAvg

    from training.federated.inprocess import InProcessGrid

    app = ClientApp()

    @app.train()
    def train(msg, context):
        k = int(context.node_config["partition-id"])
        calls = int(context.state["calls"]["n"]) + 1 if "calls" in context.state else 1
        context.state["calls"] = ConfigRecord({"n": calls})
        msg.content["config"]["touched"] = k  # a site's own copy: the others never see it
        if k == 1:
            raise RuntimeError("site 1 broke")
        return Message(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord(
            {"site": k, "calls": calls, "n": int(context.node_config["num-partitions"]),
             "seen": int(msg.content["config"].get("touched", -1) == k)})}), reply_to=msg)

    grid = InProcessGrid(app, 3)
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 3 and grid.run.run_id
    for rnd in (1, 2):
        msgs = list(FedAvg(min_available_nodes=3).configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        replies = list(grid.send_and_receive(msgs, timeout=60))
        assert len(replies) == 3 and "touched" not in msgs[0].content["config"]
        ids = {m.metadata.message_id for m in msgs}
        assert len(ids) == 3 and "" not in ids
        assert {m.metadata.reply_to_message_id for m in replies} == ids
        assert len({m.metadata.message_id for m in replies} | ids) == 6
        bad = [m for m in replies if m.has_error()]
        assert len(bad) == 1 and "site 1 broke" in bad[0].error.reason
        assert bad[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        for m in replies:
            assert m.metadata.dst_node_id == 1 and m.metadata.src_node_id in nodes
            if not m.has_error():
                met = m.content["metrics"]
                assert grid.contexts[m.metadata.src_node_id].node_config["partition-id"] == met["site"]
                assert met["calls"] == rnd and met["n"] == 3 and met["seen"] == 1
    # the failing site's state is left as it was before its handler ran
    assert [("calls" in c.state) for c in grid.contexts.values()] == [True, False, True]
    # a message to an unknown node gets no reply; a ClientApp without the handler answers with an error
    assert list(grid.send_and_receive([Message(RecordDict(), 12345, "train")])) == []
    (reply,) = grid.send_and_receive([Message(RecordDict(), nodes[0], "evaluate")])
    assert reply.has_error() and "evaluate" in reply.error.reason


def test_cli_rejects_bad_federated_input(tmp_path, capsys):
    from training.cli import main

    assert main(["train", "--method", "medfedpure", "--profile", "tiny", "--data", "synth:60",
                 "--partition", "bogus:1", "--out", str(tmp_path / "a")]) == 2
    assert "unknown partition scheme" in capsys.readouterr().err
    assert main(["train", "--method", "fedavg", "--profile", "tiny", "--data", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--method", "fedavg", "--profile", "tiny", "--data", "synth:60", "--sites", "0",
                 "--out", str(tmp_path / "c")]) == 2
    assert "sites" in capsys.readouterr().err


def test_purify_train_purifies_flagged_training_scans():
    """MedFedPure Algorithm 3, lines 10-13: flagged training scans are purified before the local step."""
    p = C.resolve("tiny", {"federated": {"method": "medfedpure", "sites": 2, "partition": "iid", "purify_train": True}})
    data = task.site_data("synth:120", p, 1, 2)
    model = task.build_model("classifier", p)
    det, den = task.build_model("detector", p).eval(), task.build_model("denoiser", p).eval()
    defense = task.make_defense(model, det, den, p, data["val"])
    defense.tau = -1.0  # every scan flagged (a scan padded to a square can score exactly 0)
    stats = task.local_train("classifier", model, data, p, 1, defense=defense)
    assert stats["flagged"] == 1.0
    defense.tau = float("inf")  # none flagged
    stats = task.local_train("classifier", model, data, p, 1, defense=defense)
    assert stats["flagged"] == 0.0


def test_classifier_objective_per_method():
    from dataclasses import replace

    from training.defense import DefensePipeline
    from training.diffusion import GaussianDiffusion
    from training.federated.task import (
        AdversarialObjective,
        PurifiedAugmentObjective,
        PurifyingObjective,
        classifier_objective,
    )
    from training.models import create_model
    from training.objectives import ClassifierObjective

    p = C.get_profile("tiny")
    parts = [create_model(c, p).eval() for c in ("classifier", "detector", "denoiser")]
    pipe = DefensePipeline(*parts, GaussianDiffusion.from_config(p.denoiser), 0.0, p.defense)

    def with_fed(**kw):
        return replace(p, federated=replace(p.federated, **kw))

    assert isinstance(classifier_objective(with_fed(method="pfeddef")), AdversarialObjective)
    assert isinstance(classifier_objective(with_fed(method="fedavg")), ClassifierObjective)
    assert isinstance(classifier_objective(with_fed(method="medfedpure"), pipe), ClassifierObjective)
    obj = classifier_objective(with_fed(method="medfedpure", purify_fraction=0.5, adv_fraction=0.5), pipe)
    assert isinstance(obj, AdversarialObjective) and isinstance(obj.base, PurifiedAugmentObjective)
    assert obj.base.t_min == p.defense.t_min and obj.base.fraction == 0.5
    obj = classifier_objective(with_fed(method="medfedpure", purify_train=True, purify_fraction=0.25, adv_fraction=0.0), pipe)
    assert isinstance(obj, PurifyingObjective) and isinstance(obj.base, PurifiedAugmentObjective)
    # without the denoiser (no defense carried) a medfedpure site trains on plain batches
    assert isinstance(classifier_objective(with_fed(method="medfedpure", purify_fraction=0.5), None), ClassifierObjective)
    with pytest.raises(ValueError, match="purify_fraction"):
        C.FederatedConfig(purify_fraction=1.5)


@pytest.mark.slow
def test_demo_profile_tiny_variant_learns_over_its_initial_accuracy(tmp_path):
    """The demo's own recipe (64 px phantoms, four scanner sites, FedBN, FedAvgM) on 400 phantoms and 12 rounds:
    every site's system ends above the untrained model, which answers one class (balanced accuracy 0.5)."""
    from training.federated.run import run_federated

    p = C.resolve("demo", {"federated": {"rounds": 12, "local_epochs": 2, "defense_rounds": 1,
                                         "defense_local_epochs": 1, "eval_every": 12}})
    source = "synth:400"
    initial = task.build_model("classifier", p)
    before = [task.evaluate_site(initial, task.site_data(source, p, k, p.federated.sites), p)["clean_balanced_acc"]
              for k in range(p.federated.sites)]
    out = tmp_path / "run"
    run_federated(p, source, out, threads_per_site=1, backend="inprocess", log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics" / "rounds.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train" and r["phase"] == "classifier"]
    loss = {rnd: np.mean([r["loss"] for r in train if r["round"] == rnd]) for rnd in sorted({r["round"] for r in train})}
    after = [r["clean_balanced_acc"] for r in sorted((r for r in rows if r["kind"] == "eval" and r["round"] == 12
                                                       and r["phase"] == "classifier"), key=lambda r: r["site"])]
    assert len(after) == len(before) == 4
    assert max(loss) == 12 and loss[12] < loss[1] - 0.05, loss
    assert np.mean(after) >= np.mean(before) + 0.12, (before, after)
    assert min(a - b for a, b in zip(after, before)) >= 0.05, (before, after)
