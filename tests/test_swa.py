"""Weight averaging across rounds (swa_rounds): the running mean, and a run whose sites keep it and that resumes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from training import config as C
from training.federated import swa


def test_running_mean_of_float_arrays_and_last_value_of_the_others():
    avg = swa.RoundAverage()
    for v in (1.0, 2.0, 6.0):
        avg.add({"w": torch.full((2,), v), "n": torch.tensor(int(v))})
    out = avg.averaged()
    torch.testing.assert_close(out["w"], torch.full((2,), 3.0))
    assert out["n"].item() == 6 and out["n"].dtype == torch.int64
    # the state round-trips: a resumed average goes on as if never interrupted
    again = swa.RoundAverage(avg.state())
    again.add({"w": torch.full((2,), 7.0), "n": torch.tensor(7)})
    torch.testing.assert_close(again.averaged()["w"], torch.full((2,), 4.0))
    assert again.count == 4


def test_nothing_averaged_is_an_error_not_zeros():
    with pytest.raises(RuntimeError):
        swa.RoundAverage().averaged()


def test_window_and_missing_state(tmp_path):
    assert swa.first_round(20, 5) == 16 and swa.first_round(3, 3) == 1
    assert swa.load(tmp_path / "x.pt", done=15, rounds=20, swa_rounds=5).count == 0  # averaging not begun yet
    with pytest.raises(FileNotFoundError, match="weight average"):
        swa.load(tmp_path / "x.pt", done=16, rounds=20, swa_rounds=5)


@pytest.mark.parametrize("fed", [{"swa_rounds": 3, "rounds": 2}, {"swa_rounds": -1}, {"swa_rounds": 1, "method": "local"}])
def test_swa_refuses_what_it_cannot_do(fed):
    with pytest.raises(C.UsageError):
        C.resolve("tiny", {"federated": {"method": "fedavg", **fed}})


@pytest.mark.slow
def test_sites_keep_the_mean_of_the_last_rounds_and_a_resumed_run_ends_the_same(tmp_path, monkeypatch):
    from training.federated import server_app
    from training.federated.run import run_federated

    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2, "rounds": 3, "eval_max": 8,
                                         "swa_rounds": 2}})
    out, snap = tmp_path / "run", tmp_path / "after-round-2"
    mark = server_app.RunState.mark
    rounds_seen: list[dict[str, torch.Tensor]] = []

    def mark_and_snapshot(self, phase, rnd, seconds=0.0):
        mark(self, phase, rnd, seconds)
        if phase == "classifier" and len(rounds_seen) < 3:  # the first, uninterrupted run
            rounds_seen.append(torch.load(out / "server/classifier.pt", weights_only=True))
            if rnd == 2:
                shutil.copytree(out / "server", snap)

    monkeypatch.setattr(server_app.RunState, "mark", mark_and_snapshot)
    run = dict(backend="inprocess", threads_per_site=1, log=lambda *_: None)
    run_federated(p, "synth:96", out, **run)
    kept = torch.load(out / "server/classifier-kept.pt", weights_only=True)
    site = torch.load(out / "sites/site-0/classifier.pt", weights_only=True)["model"]
    r2, r3 = rounds_seen[1], rounds_seen[2]
    for k, v in kept.items():
        assert torch.equal(site[k], v), k  # the site keeps the average
        if v.is_floating_point() and "running" not in k:  # weights: the mean of rounds 2 and 3 exactly
            torch.testing.assert_close(v, (r2[k] + r3[k]) / 2)
    # the batch-norm statistics were measured again on the average, not averaged
    bn = [k for k in kept if k.endswith("running_mean")]
    assert bn and any(not torch.allclose(kept[k], (r2[k] + r3[k]) / 2) for k in bn)
    # the rounds themselves trained on from their own arrays: the saved global is round 3's, not the mean
    assert any(not torch.equal(r3[k], kept[k]) for k in kept if "weight" in k)

    shutil.rmtree(out / "server")
    shutil.copytree(snap, out / "server")
    run_federated(p, "synth:96", out, **run)
    assert json.loads((out / "server/state.json").read_text())["classifier"] == 3
    resumed = torch.load(out / "server/classifier-kept.pt", weights_only=True)
    for k in kept:
        torch.testing.assert_close(resumed[k], kept[k], rtol=0, atol=0, msg=k)
