"""Recipe options: server optimizers (and their saved state), GroupNorm, logit adjustment, the phases run."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.nn import functional as F

from training import config as C
from training.federated import strategies, task
from training.models import create_model
from training.objectives import ClassifierObjective, adjusted_log_prior, gate_l2

# --------------------------------------------------------------------------- server optimizers on hand-made replies

PARAM, BUF = "w", "bn.running_mean"
SIZES = (10, 30)  # num-examples of the two sites: the average weighs them 1/4, 3/4


class _Grid:
    """What ``configure_train`` asks of a grid: the connected nodes."""

    def get_node_ids(self):
        return [1, 2]


@pytest.fixture(autouse=True)
def _task_identity():
    for name in ("task_id", "run_id", "node_id"):  # Flower's Message needs an identity, as in a ServerApp
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, 1)


def _fed(server_opt: str, lr: float, momentum: float, **fed) -> C.Profile:
    return C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2, "server_opt": server_opt,
                                            "server_lr": lr, "server_momentum": momentum, **fed}})


def _arrays(w, buf) -> dict[str, torch.Tensor]:
    return {PARAM: torch.tensor(w, dtype=torch.float32), BUF: torch.tensor(buf, dtype=torch.float32)}


def _round(strategy, rnd: int, current: dict, site_states: list[dict]) -> dict[str, np.ndarray]:
    """One round by hand: ``configure_train`` with ``current``, the sites answer ``site_states``; the new arrays."""
    sent = list(strategy.configure_train(rnd, ArrayRecord(current), ConfigRecord({}), _Grid()))
    assert len(sent) == 2
    replies = [Message(RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=m)
               for m, s, n in zip(sent, site_states, SIZES, strict=True)]
    out, _ = strategy.aggregate_train(rnd, replies)
    assert out is not None
    return {k: v.numpy() for k, v in out.items()}


def _avg(site_states: list[dict], key: str) -> np.ndarray:
    n = np.array(SIZES, dtype=np.float64)
    return sum(w * s[key].double().numpy() for w, s in zip(n / n.sum(), site_states, strict=True))


X0 = _arrays([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
ROUNDS = [  # what the two sites send back in rounds 1, 2, 3
    [_arrays([0.0, 1.0, 2.0], [1.0, 1.0, 1.0]), _arrays([2.0, 2.0, 2.0], [3.0, 3.0, 3.0])],
    [_arrays([1.0, 0.0, 1.0], [2.0, 4.0, 6.0]), _arrays([0.5, 1.5, 4.0], [0.0, 8.0, 2.0])],
    [_arrays([-1.0, 0.0, 3.0], [1.0, 1.0, 1.0]), _arrays([0.0, 2.0, 1.0], [5.0, 5.0, 5.0])],
]


def _torch_roundtrip(state: dict, tmp_path) -> dict:
    """``state`` as the server writes and reads it (``torch.save`` / ``torch.load(weights_only=True)``)."""
    f = tmp_path / "opt.pt"
    torch.save(state, f)
    return torch.load(f, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_fedavgm_steps_parameters_with_momentum_averages_buffers_and_resumes(lr, tmp_path):
    p = _fed("fedavgm", lr, 0.9)
    s = strategies.make_strategy("classifier", p, grid_sites=2, buffers=[BUF])
    assert isinstance(s, strategies.ServerAvgM) and s.buffers == {BUF}

    x0 = X0[PARAM].double().numpy()
    x1 = _round(s, 1, X0, ROUNDS[0])
    g1 = x0 - _avg(ROUNDS[0], PARAM)
    np.testing.assert_allclose(x1[PARAM], x0 - lr * g1, rtol=0, atol=1e-6)  # m1 = g1
    np.testing.assert_allclose(x1[BUF], _avg(ROUNDS[0], BUF), rtol=0, atol=1e-6)  # plain average, no step
    assert all(v.dtype == np.float32 for v in x1.values())

    cur1 = {k: torch.from_numpy(v) for k, v in x1.items()}
    x2 = _round(s, 2, cur1, ROUNDS[1])
    g2 = x1[PARAM].astype(np.float64) - _avg(ROUNDS[1], PARAM)
    m2 = 0.9 * g1 + g2
    np.testing.assert_allclose(x2[PARAM], x1[PARAM] - lr * m2, rtol=0, atol=1e-5)
    # without momentum the step would be lr * g2: the check above tells them apart
    assert np.abs(lr * 0.9 * g1).max() > 0.1
    np.testing.assert_allclose(x2[BUF], _avg(ROUNDS[1], BUF), rtol=0, atol=1e-6)
    assert all(v.dtype == np.float32 for v in x2.values())

    # the state carries the momentum: a fresh strategy that loads it takes the same round 3
    cur2 = {k: torch.from_numpy(v) for k, v in x2.items()}
    saved = _torch_roundtrip(s.state(), tmp_path)
    assert saved["momentum"] is not None
    fresh = strategies.make_strategy("classifier", p, grid_sites=2, buffers=[BUF])
    fresh.load_state(saved)
    cold = strategies.make_strategy("classifier", p, grid_sites=2, buffers=[BUF])  # restarted without the state
    want = _round(s, 3, cur2, ROUNDS[2])
    got = _round(fresh, 3, cur2, ROUNDS[2])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == np.float32
    g3 = x2[PARAM].astype(np.float64) - _avg(ROUNDS[2], PARAM)
    np.testing.assert_allclose(want[PARAM], x2[PARAM] - lr * (0.9 * m2 + g3), rtol=0, atol=1e-5)
    lost = _round(cold, 3, cur2, ROUNDS[2])
    assert not np.allclose(lost[PARAM], want[PARAM], atol=1e-3)
    np.testing.assert_allclose(lost[BUF], want[BUF], rtol=0, atol=0)  # the buffers never see the optimizer


@pytest.mark.parametrize("server_opt", ["fedadam", "fedyogi"])
def test_adaptive_server_optimizers_step_parameters_and_resume(server_opt, tmp_path):
    eta, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3  # beta_2 and tau as make_server_optimizer sets them
    p = _fed(server_opt, eta, beta1)
    s = strategies.make_strategy("classifier", p, grid_sites=2, buffers=[BUF])
    assert isinstance(s, strategies.ServerAdam if server_opt == "fedadam" else strategies.ServerYogi)

    x1 = _round(s, 1, X0, ROUNDS[0])
    delta = _avg(ROUNDS[0], PARAM) - X0[PARAM].double().numpy()
    m1 = (1 - beta1) * delta
    v1 = (1 - beta2) * delta**2  # Adam's and Yogi's second moment agree from v0 = 0
    # Flower's FedAdam corrects the bias (at server_round + 1); its FedYogi does not
    eta_norm = eta * math.sqrt(1 - beta2**2) / (1 - beta1**2) if server_opt == "fedadam" else eta
    np.testing.assert_allclose(x1[PARAM], X0[PARAM].numpy() + eta_norm * m1 / (np.sqrt(v1) + tau), rtol=0, atol=1e-5)
    np.testing.assert_allclose(x1[BUF], _avg(ROUNDS[0], BUF), rtol=0, atol=1e-6)
    assert all(v.dtype == np.float32 for v in x1.values())  # Flower's step is float64; cast back

    cur1 = {k: torch.from_numpy(v) for k, v in x1.items()}
    x2 = _round(s, 2, cur1, ROUNDS[1])
    np.testing.assert_allclose(x2[BUF], _avg(ROUNDS[1], BUF), rtol=0, atol=1e-6)
    assert all(v.dtype == np.float32 for v in x2.values())

    cur2 = {k: torch.from_numpy(v) for k, v in x2.items()}
    saved = _torch_roundtrip(s.state(), tmp_path)
    assert saved["m_t"] is not None and saved["v_t"] is not None and set(saved["m_t"]) == {PARAM, BUF}
    fresh = strategies.make_strategy("classifier", p, grid_sites=2, buffers=[BUF])
    fresh.load_state(saved)
    cold = strategies.make_strategy("classifier", p, grid_sites=2, buffers=[BUF])
    want = _round(s, 3, cur2, ROUNDS[2])
    got = _round(fresh, 3, cur2, ROUNDS[2])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == np.float32
    lost = _round(cold, 3, cur2, ROUNDS[2])
    assert not np.allclose(lost[PARAM], want[PARAM], atol=1e-4)
    # and the moments themselves came back
    for k in ("m_t", "v_t"):
        for name, v in getattr(s, k).items():
            np.testing.assert_array_equal(getattr(fresh, k)[name], v)


def test_plain_fedavg_has_no_server_optimizer():
    s = strategies.make_strategy("classifier", C.resolve("tiny", {"federated": {"method": "fedavg"}}), grid_sites=2)
    assert not isinstance(s, strategies.ServerOptimizer) and not hasattr(s, "state")
    # the server optimizer is the classifier phase's only: the denoiser of MedFedPure averages plainly
    p = _fed("fedavgm", 1.0, 0.9, method="medfedpure")
    assert not isinstance(strategies.make_strategy("denoiser", p, grid_sites=2), strategies.ServerOptimizer)
    assert isinstance(strategies.make_strategy("classifier", p, grid_sites=2), strategies.ServerOptimizer)


# --------------------------------------------------------------------------- resume through the real server


def _final(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "server/classifier.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_fedavgm_run_resumes_with_its_saved_momentum(tmp_path, monkeypatch):
    from training.federated import server_app
    from training.federated.run import run_federated

    p = _fed("fedavgm", 1.0, 0.9, rounds=2, eval_max=8)
    out, snap = tmp_path / "run", tmp_path / "after-round-1"
    mark = server_app.RunState.mark

    def mark_and_snapshot(self, phase, rnd, seconds=0.0):  # the server folder as a crash in round 2 leaves it
        mark(self, phase, rnd, seconds)
        if phase == "classifier" and rnd == 1 and not snap.exists():
            shutil.copytree(out / "server", snap)

    monkeypatch.setattr(server_app.RunState, "mark", mark_and_snapshot)
    run = dict(backend="inprocess", threads_per_site=1, log=lambda *_: None)
    run_federated(p, "synth:96", out, **run)
    assert (out / "server/classifier-opt.pt").exists() and (snap / "classifier-opt.pt").exists()
    assert json.loads((snap / "state.json").read_text())["classifier"] == 1
    whole = _final(out)
    # the saved momentum is round 1's pseudo-gradient, one tensor per shared array
    opt = torch.load(snap / "classifier-opt.pt", weights_only=True)
    assert len(opt["momentum"]) == len(torch.load(snap / "classifier.pt", weights_only=True))

    # interrupted after round 1: the same command redoes round 2 and ends where the whole run ended
    def restore():
        shutil.rmtree(out / "server")
        shutil.copytree(snap, out / "server")

    restore()
    run_federated(p, "synth:96", out, **run)
    assert json.loads((out / "server/state.json").read_text())["classifier"] == 2
    resumed = _final(out)
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k

    # without the saved optimizer state round 2 starts its momentum afresh and ends elsewhere
    restore()
    (out / "server/classifier-opt.pt").unlink()
    run_federated(p, "synth:96", out, **run)
    cold = _final(out)
    params = {n for n, _ in task.build_model("classifier", p).named_parameters()}
    diff = max(float((cold[k] - whole[k]).abs().max()) for k in whole if k in params)
    assert diff > 1e-4


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides", [
    {"federated": {"server_opt": "sgd"}},
    {"federated": {"server_opt": "fedavgm", "aggregation": "median"}},
    {"federated": {"server_opt": "fedadam", "aggregation": "krum"}},
    {"federated": {"server_opt": "fedavgm", "server_lr": 0.0}},
    {"federated": {"server_opt": "fedavgm", "server_momentum": 1.0}},
    {"classifier": {"norm": "layer"}},
    {"classifier": {"norm": "group", "norm_groups": 0}},
    {"classifier": {"logit_adjust": -1.0}},
])
def test_bad_recipe_options_are_refused(overrides):
    with pytest.raises(ValueError):
        C.resolve("tiny", overrides)


def test_good_recipe_options_are_accepted():
    p = C.resolve("tiny", {"federated": {"server_opt": "fedyogi", "server_lr": 0.01, "server_momentum": 0.0},
                           "classifier": {"norm": "group", "norm_groups": 4, "logit_adjust": 1.0}})
    assert (p.federated.server_opt, p.classifier.norm, p.classifier.norm_groups) == ("fedyogi", "group", 4)
    assert C.from_dict(C.to_dict(p)) == p


# --------------------------------------------------------------------------- GroupNorm


@pytest.mark.parametrize("groups", [8, 4])
def test_group_norm_classifier_has_no_batch_norm(groups):
    p = C.resolve("tiny", {"classifier": {"norm": "group", "norm_groups": groups}})
    model = create_model("classifier", p)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == groups for m in gns)
    assert not any("running_" in k or "num_batches_tracked" in k for k in model.state_dict())
    assert not list(model.buffers()) or all("normalize" in n for n, _ in model.named_buffers())
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    y = model.eval()(x)
    assert y.shape == (2, p.classifier.num_classes) and torch.isfinite(y).all()
    torch.testing.assert_close(y.exp().sum(1), torch.ones(2))
    # in training mode too, a scan alone gets what it gets in a batch: nothing is computed across the batch
    model = create_model("classifier", C.resolve(p, {"classifier": {"drop": 0.0}})).train()
    torch.testing.assert_close(model(x[:1]), model(x)[:1], atol=1e-5, rtol=1e-5)
    batch = create_model("classifier", C.get_profile("tiny"))
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in batch.modules())


@pytest.mark.parametrize("method", ["fedavg", "medfedpure"])
def test_group_norm_keys_for_fedbn(method):
    p = C.resolve("tiny", {"federated": {"method": method, "fedbn": True}, "classifier": {"norm": "group"}})
    model = task.build_model("classifier", p)
    keys = set(model.state_dict())
    local = task.local_keys("classifier", model, p)
    shared = task.shared_keys("classifier", model, p)
    assert local | set(shared) == keys and not local & set(shared)
    # no batch-norm to keep at the site: only the gates stay (none for one expert)
    assert local == ({k for k in keys if k.startswith("gates.")} if method == "medfedpure" else set())
    params = {n for n, _ in model.named_parameters()}
    assert [k for k in shared if k not in params] == []  # no buffers for a server optimizer to skip


# --------------------------------------------------------------------------- logit adjustment


def test_adjusted_log_prior_is_smoothed_and_scaled():
    prior = adjusted_log_prior([0, 0, 0, 1], 2, 1.0)
    torch.testing.assert_close(prior, torch.tensor([4 / 6, 2 / 6]).log())
    assert prior.dtype == torch.float32
    torch.testing.assert_close(adjusted_log_prior(np.array([0, 0, 0, 1]), 2, 0.5), 0.5 * torch.tensor([4 / 6, 2 / 6]).log())
    # a class the site never saw still has a finite prior
    torch.testing.assert_close(adjusted_log_prior(torch.tensor([1, 1]), 3, 1.0), torch.tensor([1 / 5, 3 / 5, 1 / 5]).log())
    assert adjusted_log_prior([0, 0, 0, 1], 2, 0.0) is None


def test_logit_adjusted_loss_is_cross_entropy_of_shifted_log_probs():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    model = create_model("classifier", p).eval()  # no dropout: every forward pass the same
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 1, 0])
    prior = adjusted_log_prior([0, 0, 0, 1], 2, 1.0)
    c = p.classifier
    plain, _ = ClassifierObjective(c.beta, c.gamma)(model, x, y, None)
    adjusted, stats = ClassifierObjective(c.beta, c.gamma, prior)(model, x, y, None)
    with torch.no_grad():
        out = model.forward_all(x)
        w = out["gate_weights"]
        reg = c.beta * gate_l2(model) + c.gamma * -(w * w.clamp_min(1e-12).log()).sum(1).mean()
        ce = -(out["log_probs"] + prior).log_softmax(1).gather(1, y[:, None]).mean()
        ce_plain = F.nll_loss(out["log_probs"], y)
    torch.testing.assert_close(adjusted.detach(), ce + reg)
    torch.testing.assert_close(plain.detach(), ce_plain + reg)
    assert abs(float(adjusted.detach() - plain.detach())) > 1e-3
    assert stats["ce"] == pytest.approx(float(ce), abs=1e-6)
    # the adjustment favours the rare class in training: a batch of the rare class costs more than unadjusted
    rare = torch.ones(4, dtype=torch.long)
    assert float(ClassifierObjective(c.beta, c.gamma, prior)(model, x, rare, None)[0]) > \
        float(ClassifierObjective(c.beta, c.gamma)(model, x, rare, None)[0])


@pytest.mark.parametrize("method", ["fedavg", "medfedpure"])
def test_task_objective_carries_the_prior_only_when_asked(method):
    labels = np.array([0, 0, 0, 1])
    off = C.resolve("tiny", {"federated": {"method": method}})
    on = C.resolve("tiny", {"federated": {"method": method}, "classifier": {"logit_adjust": 1.0}})
    assert task.classifier_objective(off, None, labels).log_prior is None
    assert task.classifier_objective(on, None).log_prior is None  # no labels, nothing to adjust by
    obj = task.classifier_objective(on, None, labels)
    torch.testing.assert_close(obj.log_prior, torch.tensor([4 / 6, 2 / 6]).log())
    fat = C.resolve("tiny", {"federated": {"method": "fat", "adv_fraction": 0.5}, "classifier": {"logit_adjust": 2.0}})
    wrapped = task.classifier_objective(fat, None, labels)
    torch.testing.assert_close(wrapped.base.log_prior, 2.0 * torch.tensor([4 / 6, 2 / 6]).log())


# --------------------------------------------------------------------------- phases


def test_phases_follow_method_and_score():
    assert C.resolve("tiny", {"federated": {"method": "medfedpure"}}).phases == ("denoiser", "classifier")
    assert C.resolve("tiny", {"federated": {"method": "medfedpure"}, "defense": {"score": "mae"}}).phases == \
        ("denoiser", "detector", "classifier")
    for method in ("fedavg", "local", "fat", "pfeddef"):
        assert C.resolve("tiny", {"federated": {"method": method}, "defense": {"score": "mae"}}).phases == ("classifier",)
    assert C.get_profile("tiny").defense.score != "mae"


def test_personalization_variants_weight_the_experts_as_they_claim():
    from benchmarks.personalization import global_gates, uniform_gates

    p = C.get_profile("tiny")
    torch.manual_seed(0)
    a, b = create_model("classifier", p).eval(), create_model("classifier", p).eval()
    x = torch.rand(3, 1, 32, 32)
    w = uniform_gates(a).forward_all(x)["gate_weights"]
    assert torch.allclose(w, torch.full_like(w, 1 / len(a.gates)))
    assert not torch.allclose(a.forward_all(x)["gate_weights"], w)  # the site's own gates are not uniform
    g = global_gates(a, [a, b]).state_dict()
    for k, v in g.items():
        expect = (a.state_dict()[k] + b.state_dict()[k]) / 2 if k.startswith("gates.") else a.state_dict()[k]
        assert torch.allclose(v.float(), expect.float()), k


# --------------------------------------------------------------------------- local optimizer


def test_sgd_local_optimizer_is_sgd_with_the_configured_momentum_and_steps_like_it():
    from training.engine import make_optimizer

    p = C.resolve("tiny", {"classifier": {"optim": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.5, "weight_decay": 0.0}}})
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer([w], p.classifier.optim)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5
    for _ in range(2):  # heavy ball: v1 = g, v2 = 0.5 v1 + g; w -= lr v
        opt.zero_grad()
        (w * torch.tensor([1.0, 1.0])).sum().backward()  # gradient 1 everywhere
        opt.step()
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.1 * (1 + 1.5), -2.0 - 0.1 * (1 + 1.5)]))
    assert isinstance(make_optimizer([w], C.resolve("tiny", {}).classifier.optim), torch.optim.AdamW)


@pytest.mark.parametrize("overrides", [{"optimizer": "lion"}, {"momentum": 1.0}, {"lr": 0.0}])
def test_bad_local_optimizer_settings_are_refused(overrides):
    with pytest.raises(ValueError):
        C.resolve("tiny", {"classifier": {"optim": overrides}})


# --------------------------------------------------------------------------- local optimizer state across rounds


def _adam_steps(arrays: dict[str, torch.Tensor]) -> set[float]:
    return {float(v) for k, v in arrays.items() if k.endswith("/step")}


def test_local_optimizer_moments_carry_over_to_the_next_round():
    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2, "rounds": 2, "keep_optimizer_state": True}})
    data = task.site_data("synth:96", p, 0, 2)
    model = task.build_model("classifier", p)
    moments: dict[str, torch.Tensor] = {}
    task.local_train("classifier", model, data, p, 1, optimizer_state=moments)
    params = dict(model.named_parameters())
    steps = math.floor(len(data["train"]) / min(p.classifier.optim.batch_size, len(data["train"])))
    assert _adam_steps(moments) == {float(steps)}  # every parameter: AdamW's step, exp_avg, exp_avg_sq
    assert {k[len(task.OPTIM_PREFIX):].rsplit("/", 1)[0] for k in moments} == set(params)
    first = {k: v.clone() for k, v in moments.items()}
    task.local_train("classifier", model, data, p, 2, optimizer_state=moments)
    assert _adam_steps(moments) == {float(2 * steps)}  # round 2 went on from round 1's moments
    fresh: dict[str, torch.Tensor] = {}
    task.local_train("classifier", model, data, p, 2, optimizer_state=fresh)  # empty: a cold start
    assert _adam_steps(fresh) == {float(steps)}
    k = next(k for k in first if k.endswith("exp_avg_sq"))
    assert not torch.equal(moments[k], fresh[k])


@pytest.mark.slow
def test_a_run_keeps_each_sites_optimizer_moments_between_rounds(tmp_path):
    from training.federated.run import run_federated

    p = _fed("fedavg", 1.0, 0.0, rounds=2, eval_max=8, keep_optimizer_state=True)
    run_federated(p, "synth:96", tmp_path / "run", backend="inprocess", threads_per_site=1, log=lambda *_: None)
    for k in range(2):
        saved = torch.load(tmp_path / f"run/sites/site-{k}/classifier-local-round2.pt", weights_only=True)
        data = task.site_data("synth:96", p, k, 2)
        per_round = len(data["train"]) // min(p.classifier.optim.batch_size, len(data["train"]))
        assert _adam_steps(saved) == {float(2 * per_round)}


def test_gate_warmup_trains_every_expert_with_uniform_gates_then_the_gates():
    p = C.resolve("tiny", {"federated": {"method": "medfedpure", "sites": 2, "rounds": 2, "gate_warmup_rounds": 1}})
    data = task.site_data("synth:96", p, 0, 2)
    model = task.build_model("classifier", p)
    x = torch.rand(4, 1, p.image_size, p.image_size)
    model.uniform_gates = True
    assert torch.allclose(model.forward_all(x)["gate_weights"], torch.full((4, 3), 1 / 3))
    model.uniform_gates = False

    def snapshot():
        return {n: v.detach().clone() for n, v in model.named_parameters()}

    def changed(before, prefix):
        return [n for n, v in model.named_parameters() if n.startswith(prefix) and not torch.equal(v, before[n])]

    before = snapshot()
    task.local_train("classifier", model, data, p, 1)  # warm-up round: gates untouched, every expert trained
    assert not changed(before, "gates.") and not model.uniform_gates
    assert all(changed(before, f"experts.{k}.") for k in range(3))
    before = snapshot()
    task.local_train("classifier", model, data, p, 2)  # after the warm-up the gates learn
    assert changed(before, "gates.")


# --------------------------------------------------------------------------- batch-norm recalibration


def test_pooled_bn_statistics_are_those_of_all_sites_scans_together():
    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2}})
    torch.manual_seed(0)
    model = task.build_model("classifier", p)
    keys = set(model.state_dict())
    train = task.site_data("synth:320", p, 0, 2)["train"]
    a = task.subset(train, np.arange(64))
    b = task.subset(train, np.arange(64, 96))
    b = task.Split(b.images * 0.5, b.labels, b.groups, b.paths)  # a darker scanner: the sites' means differ
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # one batch per site: each site's statistics are those of all its scans
    parts = [(len(s), task.bn_statistics(model, s, keys, batch_size=len(s))) for s in (a, b)]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left as it was
    pooled = task.combine_bn_statistics(parts)
    both = task.Split(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]), np.arange(96),
                      [""] * 96)
    whole = task.bn_statistics(model, both, keys, batch_size=96)  # one batch over both sites' scans
    assert pooled.keys() == whole.keys()
    first = [k for k in whole if k.startswith("experts.0.backbone.bn1.")]  # its input does not depend on batch-norm
    assert len(first) == 2
    for k in first:  # up to each site's n/(n-1) correction of its own variance
        assert torch.allclose(pooled[k], whole[k], atol=1e-5, rtol=2e-2), k
    # the pooled variance holds the spread of the sites' means, which averaging the sites' variances misses
    var = "experts.0.backbone.bn1.running_var"
    averaged = (64 * parts[0][1][var] + 32 * parts[1][1][var]) / 96
    assert float((whole[var] - averaged).mean()) > 0.05 * float(whole[var].mean())


@pytest.mark.slow
def test_a_recalibrated_run_ends_with_the_sites_pooled_bn_statistics(tmp_path):
    from training.federated.run import run_federated

    p = _fed("fedavg", 1.0, 0.0, rounds=2, eval_max=8, bn_recalibrate=True)
    run_federated(p, "synth:96", tmp_path / "run", backend="inprocess", threads_per_site=1, log=lambda *_: None)
    final = _final(tmp_path / "run")
    model = task.build_model("classifier", p)
    model.load_state_dict({**model.state_dict(), **final})
    parts = []
    for k in range(2):
        train = task.site_data("synth:96", p, k, 2)["train"]
        parts.append((len(train), task.bn_statistics(model, train, set(final))))
    expected = task.combine_bn_statistics(parts)
    assert expected
    for k, v in expected.items():
        assert torch.allclose(final[k], v, atol=1e-5), k


# --------------------------------------------------------------------------- channels-last training


def test_channels_last_training_steps_like_the_default_layout_and_hands_back_default_arrays():
    from training.engine import channels_last

    p = C.PROFILES["tiny"]
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 1, 0])
    trained = {}
    for layout in ("default", "channels_last"):
        torch.manual_seed(0)
        model = create_model("classifier", p).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # AdamW's first steps would amplify rounding
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size[0] > 1)
        with channels_last(model, layout == "channels_last"):
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
            for _ in range(3):
                optimizer.zero_grad()
                F.nll_loss(model(x), y).backward()
                optimizer.step()
        assert all(v.is_contiguous() for v in model.state_dict().values())
        trained[layout] = model.state_dict()
    moved = max(float((trained["default"][k] - v).abs().max()) for k, v in trained["channels_last"].items())
    assert moved < 1e-4, moved
    torch.manual_seed(0)
    start = create_model("classifier", p).state_dict()
    assert max(float((start[k] - v).abs().max()) for k, v in trained["channels_last"].items()) > 1e-3


def test_channels_last_benchmark_prints_both_layouts_and_their_ratio(capsys):
    from benchmarks.channels_last import main

    assert main(["--profile", "tiny", "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| classifier | 8 | 32 |" in out and "| denoiser |" in out
    ratios = [float(line.rsplit("|", 2)[1]) for line in out.splitlines() if line.startswith("| classifier")
              or line.startswith("| denoiser")]
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert main(["--steps", "0"]) == 2


# --------------------------------------------------------------------------- gate load balancing


def test_gate_imbalance_is_zero_for_a_balanced_batch_and_log_k_for_one_expert():
    from training.objectives import gate_imbalance

    # per scan one-hot, but the batch uses the three experts equally: balanced
    assert float(gate_imbalance(torch.eye(3).repeat(2, 1))) == pytest.approx(0.0, abs=1e-6)
    assert float(gate_imbalance(torch.full((5, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert float(gate_imbalance(collapsed)) == pytest.approx(math.log(3), abs=1e-6)
    half = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    assert float(gate_imbalance(half)) == pytest.approx(math.log(3) - math.log(2), abs=1e-6)


def test_gate_balance_term_is_added_and_its_gradient_spreads_a_collapsed_site_over_the_experts():
    p = C.resolve("tiny", {"classifier": {"gate_balance": 0.5}})
    assert task.classifier_objective(p, None).balance == 0.5
    assert task.classifier_objective(C.get_profile("tiny"), None).balance == 0.0
    with pytest.raises(C.UsageError, match="gate_balance"):
        C.resolve("tiny", {"classifier": {"gate_balance": -1.0}})
    torch.manual_seed(0)
    model = create_model("classifier", p).eval()
    x, y = torch.rand(8, 1, 32, 32), torch.tensor([0, 1] * 4)
    with torch.no_grad():  # a site whose gates send every scan to expert 0
        for k, g in enumerate(model.gates):
            g[-1].bias.fill_(2.0 if k == 0 else -2.0)
    c = p.classifier
    plain, _ = ClassifierObjective(c.beta, c.gamma)(model, x, y, None)
    balanced, stats = ClassifierObjective(c.beta, c.gamma, balance=0.5)(model, x, y, None)
    assert stats["gate_imbalance"] > 0.8  # log 3 = 1.10 when fully collapsed
    torch.testing.assert_close(balanced.detach(), plain.detach() + 0.5 * stats["gate_imbalance"])
    # gate-only steps on the term: the batch's mean gate moves towards uniform
    opt = torch.optim.SGD(model.gates.parameters(), lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        ClassifierObjective(0.0, 0.0, balance=1.0)(model, x, y, None)[0].backward()
        opt.step()
    _, after = ClassifierObjective(c.beta, c.gamma, balance=0.5)(model, x, y, None)
    assert after["gate_imbalance"] < 0.5 * stats["gate_imbalance"]
