"""SCAFFOLD control variates: the local correction, the server's update, and a run that resumes with its c."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from training import config as C
from training.engine import train_one_epoch
from training.federated import scaffold


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=g), torch.tensor([0, 1, 1, 0])) for _ in range(2)]


def _objective(model, x, y, generator):
    return F.cross_entropy(model(x), y), {}


def test_each_step_is_corrected_by_c_minus_c_i_and_c_i_becomes_the_mean_raw_gradient():
    model = _model()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    server = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    site = {"0.weight": torch.full_like(model[0].weight, 0.2)}  # the bias has no c_i yet: zeros
    hook = scaffold.ScaffoldCorrection(model, w0.keys(), server, site)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _batches()
    train_one_epoch(model, data, _objective, opt, generator=torch.Generator(), after_backward=hook, progress=False)

    # the same two steps by hand: raw gradient, plus c - c_i, times the learning rate
    ref = _model()
    shift = {"0.weight": 0.5 - 0.2, "0.bias": 0.5}
    raw = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for x, y in data:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                raw[n] += p.grad / len(data)
                p -= 0.1 * (p.grad + shift[n])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[n])
    assert hook.steps == 2
    for n, v in hook.control().items():
        torch.testing.assert_close(v, raw[n])
    torch.testing.assert_close(hook.delta()["0.weight"], raw["0.weight"] - 0.2)
    torch.testing.assert_close(hook.delta()["0.bias"], raw["0.bias"])
    # the correction changed the path: without it the weights end elsewhere
    plain = _model()
    train_one_epoch(plain, data, _objective, torch.optim.SGD(plain.parameters(), lr=0.1), generator=torch.Generator(),
                    progress=False)
    assert not torch.allclose(plain[0].bias, model[0].bias)


def test_only_the_shared_parameters_are_corrected():
    model = _model()
    server = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    hook = scaffold.ScaffoldCorrection(model, ["0.weight"], server, {})
    model(torch.randn(2, 3)).sum().backward()
    bias_grad, weight_grad = model[0].bias.grad.clone(), model[0].weight.grad.clone()
    hook(model)
    torch.testing.assert_close(model[0].bias.grad, bias_grad)
    torch.testing.assert_close(model[0].weight.grad, weight_grad + 1)
    assert set(hook.control()) == {"0.weight"}


def test_no_step_keeps_c_i():
    model = _model()
    site = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters()}
    hook = scaffold.ScaffoldCorrection(model, site.keys(), {}, site)
    assert all(torch.equal(v, site[n]) for n, v in hook.control().items())
    assert all(float(v.abs().max()) == 0 for v in hook.delta().values())


def test_server_moves_c_by_the_mean_change_over_all_sites():
    c = {"w": torch.tensor([1.0, 2.0])}
    deltas = [{"w": torch.tensor([2.0, 0.0]), "b": torch.tensor([4.0])}, {"w": torch.tensor([0.0, 4.0])}]
    out = scaffold.server_update(c, deltas, sites=4)  # two of four sites took part: each change counts 1/4
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(out["b"], torch.tensor([1.0]))
    torch.testing.assert_close(c["w"], torch.tensor([1.0, 2.0]))  # the input is left as it was
    with pytest.raises(ValueError):
        scaffold.server_update(c, deltas, sites=0)
    saved = scaffold.saved_control({"w": torch.ones(1)})
    assert list(saved) == ["control/w"]
    assert list(scaffold.site_control({**saved, "gate.w": torch.zeros(1)})) == ["w"]


@pytest.mark.parametrize("fed", [
    {"method": "local"},
    {"aggregation": "median"},
    {"dp_clip": 1.0},
    {"dp_weight_sigma": 0.01},
])
def test_scaffold_refuses_what_it_cannot_do(fed):
    with pytest.raises(C.UsageError):
        C.resolve("tiny", {"federated": {"method": "fedavg", "scaffold": True, **fed}})


# --------------------------------------------------------------------------- through the real server


def _final(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "server/classifier.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_scaffold_run_keeps_c_as_the_sites_mean_and_resumes_with_it(tmp_path, monkeypatch):
    from training.federated import server_app
    from training.federated.run import run_federated

    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2, "rounds": 2, "eval_max": 8,
                                         "scaffold": True}})
    out, snap = tmp_path / "run", tmp_path / "after-round-1"
    mark = server_app.RunState.mark

    def mark_and_snapshot(self, phase, rnd, seconds=0.0):  # the server folder as a crash in round 2 leaves it
        mark(self, phase, rnd, seconds)
        if phase == "classifier" and rnd == 1 and not snap.exists():
            shutil.copytree(out / "server", snap)

    monkeypatch.setattr(server_app.RunState, "mark", mark_and_snapshot)
    run = dict(backend="inprocess", threads_per_site=1, log=lambda *_: None)
    run_federated(p, "synth:96", out, **run)
    whole = _final(out)
    # c = the mean of the sites' c_i (every site took part in every round, starting from zeros)
    c = torch.load(out / "server/classifier-control.pt", weights_only=True)
    sites = [torch.load(out / f"sites/site-{k}/classifier-local-round2.pt", weights_only=True) for k in (0, 1)]
    site_c = [scaffold.site_control(s) for s in sites]
    assert c and set(c) == set(site_c[0]) == set(site_c[1])
    for n in c:
        torch.testing.assert_close(c[n], (site_c[0][n] + site_c[1][n]) / 2)
    assert max(float(v.abs().max()) for v in c.values()) > 0

    def restore():
        shutil.rmtree(out / "server")
        shutil.copytree(snap, out / "server")

    # interrupted after round 1: the same command redoes round 2 and ends where the whole run ended
    restore()
    run_federated(p, "synth:96", out, **run)
    assert json.loads((out / "server/state.json").read_text())["classifier"] == 2
    resumed = _final(out)
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    # without the saved c the run refuses to go on rather than silently restart it
    restore()
    (out / "server/classifier-control.pt").unlink()
    with pytest.raises(FileNotFoundError, match="control"):
        run_federated(p, "synth:96", out, **run)
