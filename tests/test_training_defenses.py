"""Training-time defenses: poisoned sites, robust aggregation, FedBN-Prox, Fed-Safe noise and its privacy account."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from training import config as cfgmod
from training.federated import poison, privacy, robust, strategies, task

# --------------------------------------------------------------------------- poisoned sites


def _update(seed=0, n=4000):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(n // 2, generator=g), "b.weight": torch.randn(n // 4, 2, generator=g)}


def test_malicious_sites_are_the_configured_fraction_and_fixed_by_seed():
    assert len(poison.malicious_sites(10, 0.3, 0)) == 3
    assert len(poison.malicious_sites(10, 0.4, 0)) == 4
    assert poison.malicious_sites(10, 0.4, 0) == poison.malicious_sites(10, 0.4, 0)
    assert poison.malicious_sites(10, 0.0, 0) == []
    assert all(0 <= s < 10 for s in poison.malicious_sites(10, 0.4, 3))


def test_each_poisoning_changes_the_update_as_specified():
    u = _update()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    scaled = poison.poison_update("scaling", u, 10.0, g())
    flipped = poison.poison_update("signflip", u, 10.0, g())
    partial = poison.poison_update("partial", u, 10.0, g())
    noisy = poison.poison_update("gaussian", u, 10.0, g())
    norm = privacy.update_norm(u)
    for k, v in u.items():
        assert torch.allclose(scaled[k], 10 * v)
        assert torch.equal(flipped[k], -v)
        changed = ~torch.isclose(partial[k], v)
        assert torch.allclose(partial[k][changed], 10 * v[changed])
        assert 0.45 < changed.float().mean() < 0.55  # a random half of the coordinates
    diff = torch.cat([(noisy[k] - u[k]).flatten() for k in u])
    assert abs(float(diff.std()) / (0.5 * norm) - 1) < 0.05  # per-coordinate std 0.5 * ||u||
    assert abs(float(diff.mean())) < 0.1 * 0.5 * norm
    assert poison.poison_update("labelflip", u, 10.0, g()) is u  # label flip poisons the data, not the update
    assert list(poison.flip_labels(np.array([0, 1, 1, 0]), 2)) == [1, 0, 0, 1]


# --------------------------------------------------------------------------- aggregators on hand-made updates


@pytest.fixture()
def replies():
    """Six honest updates around (1, 2, ...) and one huge malicious one, as Flower reply messages."""
    for name in ("task_id", "run_id", "node_id"):  # Flower's Message needs an identity, as in a ServerApp
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, 1)

    def reply(node: int, values: list[float]) -> Message:
        arrays = ArrayRecord({"w": torch.tensor(values, dtype=torch.float32)})
        sent = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), dst_node_id=node,
                       message_type=MessageType.TRAIN)
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})}), reply_to=sent)

    honest = [reply(i + 1, [1.0 + 0.01 * i, 2.0 - 0.01 * i, 0.5]) for i in range(6)]
    return honest + [reply(99, [1000.0, -1000.0, 1000.0])]


def _tiny_fed(**fed):
    return cfgmod.resolve("tiny", {"federated": {"sites": 7, **fed}})


@pytest.mark.parametrize("aggregation", ["krum", "multikrum", "bulyan", "median", "trimmed"])
def test_robust_aggregators_ignore_one_huge_update(replies, aggregation):
    profile = _tiny_fed(aggregation=aggregation, byzantine=1)
    strategy = strategies.make_strategy("classifier", profile, grid_sites=7)
    arrays, _ = strategy.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"]
    assert torch.allclose(w, torch.tensor([1.025, 1.975, 0.5]), atol=0.03), (aggregation, w)


def test_fedavg_does_not_ignore_it(replies):
    strategy = strategies.make_strategy("classifier", _tiny_fed(aggregation="fedavg"), grid_sites=7)
    w = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()["w"]
    assert float(w[0]) > 100


def test_byzantine_count_respects_each_rule():
    assert strategies.byzantine_count("krum", 10, -1) == 3  # ceil(0.4 * 10) = 4 > (10 - 3) // 2
    assert strategies.byzantine_count("bulyan", 10, -1) == 1
    assert strategies.byzantine_count("multikrum", 20, -1) == 8
    with pytest.raises(ValueError, match="tolerates at most 1"):
        strategies.byzantine_count("bulyan", 10, 3)


def _round(seed=0, d=64, honest=6, bad=3):
    """Honest updates near a true direction g, ``bad`` sign-flipped and scaled ones; a quadratic root loss."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(d, generator=gen)
    h = g[None] + 0.3 * torch.randn(honest, d, generator=gen)
    m = -3 * g[None] + 0.3 * torch.randn(bad, d, generator=gen)
    updates = torch.cat([h, m])
    target = 1.5 * g  # the root-set optimum lies along g

    def loss_of(v):
        return float(((v if v is not None else torch.zeros(d)) - target).pow(2).sum())

    return updates, g, loss_of, honest


def test_fltrust_gives_sign_flipped_updates_no_trust():
    updates, g, _, honest = _round()
    agg, trust = robust.fltrust(updates, g * 0.5)
    assert bool((trust[honest:] == 0).all()) and bool((trust[:honest] > 0.8).all())
    assert float(robust.cosine(agg[None], g)[0]) > 0.95
    # every update is rescaled to the reference's norm before the trust-weighted mean
    assert 0.9 * float((g * 0.5).norm()) < float(agg.norm()) <= float((g * 0.5).norm()) + 1e-5
    big = robust.fltrust(updates[:honest] * 100, g * 0.5)[0]
    assert torch.allclose(big, robust.fltrust(updates[:honest], g * 0.5)[0], atol=1e-5)


def test_optigradtrust_weights_sign_flipped_updates_below_honest_ones():
    updates, g, loss_of, honest = _round()
    refs = torch.stack([g + 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    ogt = robust.OptiGradTrust(dim=64, seed=0)
    agg, info = ogt.aggregate(updates, torch.full((9,), 1 / 9), refs[0], refs, loss_of)
    trust = torch.tensor(info["trust"])
    assert float(trust[honest:].max()) < float(trust[:honest].min())
    assert not any(info["kept"][honest:]) and all(info["kept"][:honest])
    assert float(robust.cosine(agg[None], g)[0]) > 0.9
    assert np.array(info["fingerprints"]).shape == (9, len(robust.FEATURES))


def test_optigradtrust_is_fixed_by_its_seed_not_by_the_global_rng():
    trusts = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        updates, g, loss_of, _ = _round(seed=3)
        refs = torch.stack([g, g, g])
        info = robust.OptiGradTrust(dim=64, seed=0).aggregate(updates, torch.full((9,), 1 / 9), g, refs, loss_of)[1]
        trusts.append(info["trust"])
    assert trusts[0] == trusts[1]


def test_trust_scorer_learns_from_rewards_alone():
    """From an uninformative start (no prior), REINFORCE on the root-loss reward separates the sites."""
    torch.manual_seed(0)
    updates, g, loss_of, honest = _round(seed=1)
    raw = torch.stack([torch.rand(9), robust.cosine(updates, g), torch.zeros(9), torch.zeros(9), torch.zeros(9),
                       torch.zeros(9)], dim=1)
    x = robust.scorer_inputs(raw)
    ogt = robust.OptiGradTrust(dim=64, seed=0, scorer=robust.TrustScorer(prior=False), policy_lr=0.2)
    with torch.no_grad():
        before = torch.sigmoid(ogt.scorer(x))
    assert torch.allclose(before, torch.full((9,), 0.5))
    rewards = [ogt.learn(x, updates, loss_of)["mean_reward"] for _ in range(25)]
    with torch.no_grad():
        after = torch.sigmoid(ogt.scorer(x))
    assert float(after[:honest].min()) > 0.6 and float(after[honest:].max()) < 0.4
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5])


def test_scorer_inputs_are_relative_to_the_round():
    """The same round at another scale gives the same scorer inputs; an outlier stands out by its z-score."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.stack([torch.rand(10, generator=gen) + 1, 0.02 + 0.01 * torch.randn(10, generator=gen),
                       0.01 * torch.randn(10, generator=gen), torch.rand(10, generator=gen),
                       0.01 * torch.randn(10, generator=gen), 0.01 * torch.randn(10, generator=gen)], dim=1)
    raw[0, 1] = -0.05  # one site points away from the reference, 7 honest spreads below the median
    x = robust.scorer_inputs(raw)
    scaled = raw.clone()
    scaled[:, [1, 2, 4, 5]] *= 10
    scaled[:, 0] *= 3
    assert torch.allclose(robust.scorer_inputs(scaled), x, atol=1e-4)
    assert float(x[0, 1]) == -5.0 and float(x[1:, 1].min()) > -3.0
    assert torch.equal(x[:, 3], raw[:, 3])  # norm deviation is already relative
    flat = robust.robust_z(torch.full((6,), 0.3) + torch.tensor([0, 0, 0, 0, 0, 1e-7]))
    assert float(flat.abs().max()) < 1e-3  # near-identical sites: rounding noise is not an outlier


def test_fltrust_detection_counts_updates_left_out(tmp_path):
    """FLTrust trust is a cosine (small in high dimensions): a site counts as detected when its trust is 0."""
    from training.federated.server_app import training_defense_summary

    profile = cfgmod.resolve(cfgmod.get_profile("tiny"), {"federated": {
        "sites": 4, "aggregation": "fltrust", "poison": "signflip", "malicious_fraction": 0.25}})
    bad = poison.malicious_sites(4, 0.25, profile.seed)
    rows = [{"phase": "classifier", "kind": "train", "round": 1, "site": s,
             "trust": 0.0 if s in bad else 0.03, "excluded": s in bad} for s in range(4)]
    out = training_defense_summary(rows, profile)
    assert out["detection_precision"] == 1.0 and out["detection_recall"] == 1.0
    honest = next(s for s in range(4) if s not in bad)
    rows[honest]["excluded"] = True  # one honest site left out too
    out = training_defense_summary(rows, profile)
    assert out["detection_recall"] == 1.0 and out["detection_precision"] == 0.5


def test_shapley_values_rank_helpful_updates_first():
    updates, _, loss_of, honest = _round(seed=2)
    phi = robust.shapley_values(updates, loss_of, permutations=4, generator=torch.Generator().manual_seed(0))
    assert float(phi[:honest].min()) > float(phi[honest:].max())


# --------------------------------------------------------------------------- FedBN-Prox


def test_proximal_term_gradient_is_mu_times_the_distance():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    reference = {n: p.detach().clone() + 0.5 for n, p in model.named_parameters()}
    mu = 0.3
    term = task.proximal_term(model, reference, mu)(model)
    term.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, mu * (p.detach() - reference[n]), atol=1e-6)


def test_fedbn_prox_keeps_batch_norm_local_and_sends_mu_to_the_sites():
    profile = cfgmod.resolve("tiny", {"federated": {"method": "fedavg", "fedbn": True, "proximal_mu": 0.01}})
    model = task.build_model("classifier", profile)
    local = task.local_keys("classifier", model, profile)
    bn = {f"{name}.{p}" for name, mod in model.named_modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
          for p in mod.state_dict()}
    assert bn and local == bn  # batch-norm (affine and statistics) stays; all else is averaged
    sent = cfgmod.from_dict(json.loads(json.dumps(cfgmod.to_dict(profile))))  # what the message carries
    assert sent.federated.proximal_mu == 0.01 and sent.federated.fedbn


# --------------------------------------------------------------------------- Fed-Safe noise and privacy


def test_privatize_clips_to_c_and_adds_noise_of_sigma_c():
    u = {k: 10 * v for k, v in _update(n=40000).items()}
    clipped = privacy.clip(u, 1.0)
    assert abs(privacy.update_norm(clipped) - 1.0) < 1e-5
    small = privacy.clip({k: v * 1e-6 for k, v in u.items()}, 1.0)
    assert privacy.update_norm(small) < 1.0  # under the bound: unchanged
    noisy = privacy.privatize(u, 1.0, 0.2, torch.Generator().manual_seed(0))
    diff = torch.cat([(noisy[k] - clipped[k]).flatten() for k in u])
    assert abs(float(diff.std()) - 0.2) < 0.01


def test_privacy_epsilon_grows_with_rounds_and_falls_with_sigma():
    ledger = privacy.PrivacyLedger(1.0, sites=10, delta=1e-5)
    eps = [ledger.step()["epsilon"] for _ in range(4)]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    noisier = privacy.PrivacyLedger(2.0, sites=10, delta=1e-5)
    noisier.step(4)
    assert noisier.spent()["epsilon"] < eps[-1]
    assert ledger.spent()["epsilon_aggregate"] < ledger.spent()["epsilon"]
    assert ledger.spent()["rounds"] == 4
    with pytest.raises(ValueError):
        privacy.PrivacyLedger(0.0, 10, 1e-5)


def test_config_rejects_bad_defense_settings():
    with pytest.raises(ValueError, match="aggregation"):
        cfgmod.resolve("tiny", {"federated": {"aggregation": "mean-ish"}})
    with pytest.raises(ValueError, match="dp_sigma needs dp_clip"):
        cfgmod.resolve("tiny", {"federated": {"dp_sigma": 1.0}})
    with pytest.raises(ValueError, match="malicious_fraction"):
        cfgmod.resolve("tiny", {"federated": {"malicious_fraction": 1.0}})


def test_root_set_reference_updates_do_not_depend_on_the_global_rng():
    """The server's reference training (dropout included) is fixed by the seed and the round."""
    profile = cfgmod.resolve("tiny", {"federated": {"root_size": 16, "local_epochs": 1}})
    images, labels, names = task.root_set("synth:120", profile)
    root = strategies.RootSet(profile, images, labels, names)
    glob = {k: v.clone() for k, v in root.model.state_dict().items()}
    keys = [k for k, v in glob.items() if v.is_floating_point() and k not in root.local_keys]
    start = {k: v.clone() for k, v in root.local_state.items()}
    refs = []
    for global_seed in (1, 2):
        root.local_state = {k: v.clone() for k, v in start.items()}
        torch.manual_seed(global_seed)
        refs.append(root.reference_updates(glob, keys, server_round=1, extra=1))
    assert refs[0].shape[0] == 2 and float(refs[0].norm()) > 0
    assert torch.equal(refs[0], refs[1])


# --------------------------------------------------------------------------- whole runs (in-process sites)


def _run(tmp_path, name, **fed):
    from training.federated.run import run_federated

    profile = cfgmod.resolve("tiny", {"federated": {"method": "fedavg", "sites": 5, "rounds": 2, "local_epochs": 1,
                                                    "eval_max": 8, "eval_attack": {"steps": 0}, **fed}})
    return run_federated(profile, "synth:200", tmp_path / name, backend="inprocess", log=lambda *_: None)


@pytest.mark.slow
def test_optigradtrust_run_reports_trust_and_detection(tmp_path):
    summary = _run(tmp_path, "ogt", aggregation="optigradtrust", poison="signflip", malicious_fraction=0.4,
                   root_size=32)
    assert summary["malicious_sites"] == poison.malicious_sites(5, 0.4, 0)
    rows = [json.loads(line) for line in (tmp_path / "ogt" / "metrics" / "rounds.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 10 and all("trust" in r and 0.0 <= r["trust"] <= 1.0 for r in train)
    assert {r["site"] for r in train if r["malicious"]} == set(summary["malicious_sites"])
    for key in ("detection_precision", "detection_recall", "honest_clean_acc", "mean_trust_malicious"):
        assert key in summary and not math.isnan(summary[key]), key
    assert summary["mean_trust_malicious"] < summary["mean_trust_honest"]
    assert all(isinstance(r["excluded"], bool) and r["excluded"] == (r["trust"] < 0.5) for r in train)


@pytest.mark.slow
def test_fed_safe_run_reports_privacy_spent_per_round(tmp_path):
    summary = _run(tmp_path, "dp", dp_clip=1.0, dp_sigma=0.5, dp_weight_sigma=0.001)
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics" / "rounds.jsonl").read_text().splitlines()]
    eps = sorted({r["round"]: r["dp_epsilon"] for r in rows if "dp_epsilon" in r}.items())
    assert len(eps) == 2 and eps[1][1] > eps[0][1] > 0
    assert summary["dp_epsilon"] == pytest.approx(eps[1][1])
    assert not math.isnan(summary["honest_clean_acc"])


def test_rounds_to_95_percent_of_final():
    from benchmarks.training_defenses import rounds_to

    assert rounds_to([0.5, 0.8, 0.9, 0.95, 1.0]) == 4
    assert rounds_to([1.0, 0.5, 1.0]) == 1
    assert rounds_to([]) is None


@pytest.mark.slow
def test_robustness_study_writes_its_table(tmp_path):
    from benchmarks.training_defenses import main

    cfg = tmp_path / "td.toml"
    cfg.write_text('profile = "tiny"\n[preprocess]\nsize = 32\n[federated]\nmethod = "fedavg"\nsites = 4\nrounds = 1\n'
                   'local_epochs = 1\npartition = "iid"\neval_max = 8\n[federated.eval_attack]\nsteps = 0\n')
    args = ["robustness", "--data", "synth:120", "--config", str(cfg), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--aggregations", "fedavg,median", "--poisons", "scaling",
            "--fractions", "0.25"]
    assert main(args) == 0
    table = (tmp_path / "out" / "robustness.md").read_text()
    assert "| median |" in table and "scaling 25 %" in table
    results = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert len(results) == 4 and all(0.0 <= r["honest_clean_acc"] <= 1.0 for r in results)
    assert main(args) == 0  # finished runs are read back, not repeated
    assert main(["robustness", "--data", "synth:120", "--config", str(cfg), "--aggregations", "nope"]) == 2
