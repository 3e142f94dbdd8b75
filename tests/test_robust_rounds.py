"""Robust rounds (``robust_rounds``): their objective, their learning-rate schedule, and continuing a run into them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from training import config as C
from training.federated import task
from training.objectives import AdversarialObjective, ClassifierObjective, PurifiedAugmentObjective


def _mfp(**fed) -> C.Profile:
    return C.resolve("tiny", {"federated": {"method": "medfedpure", "rounds": 5, **fed}})


def _defense():
    """What the classifier objective takes from a site's pipeline: its denoiser and diffusion."""
    return SimpleNamespace(denoiser=torch.nn.Identity(), diffusion=object())


def test_only_the_last_rounds_are_robust():
    fed = _mfp(robust_rounds=2, purify_fraction=1.0, adv_fraction=0.5).federated
    assert [fed.robust("classifier", r) for r in range(1, 6)] == [False, False, False, True, True]
    assert not fed.robust("denoiser", 5)
    everywhere = _mfp(purify_fraction=1.0).federated  # robust_rounds = 0: what is set applies in every round
    assert all(everywhere.robust("classifier", r) for r in range(1, 6))


def test_clean_rounds_train_on_clean_scans_and_robust_rounds_through_the_purifier():
    p = _mfp(robust_rounds=2, purify_fraction=1.0, adv_fraction=0.5, through_purifier=True)
    clean = task.classifier_objective(p, _defense(), server_round=3)
    assert isinstance(clean, ClassifierObjective)
    robust = task.classifier_objective(p, _defense(), server_round=4)
    assert isinstance(robust, AdversarialObjective) and robust.fraction == 0.5
    assert robust.through is not None and robust.through[2:] == (p.defense.t_min, p.defense.t_max, p.defense.steps)
    assert isinstance(robust.base, PurifiedAugmentObjective) and robust.base.fraction == 1.0
    # without through_purifier the examples are crafted on the classifier alone
    plain = task.classifier_objective(_mfp(robust_rounds=2, purify_fraction=1.0, adv_fraction=0.5), _defense(),
                                      server_round=5)
    assert isinstance(plain, AdversarialObjective) and plain.through is None


def test_robust_rounds_restart_the_schedule_at_the_scaled_rate():
    p = _mfp(robust_rounds=2, robust_lr_scale=0.25, local_epochs=1)
    lr, n = p.classifier.optim.lr, 64
    steps = math.ceil(n / p.classifier.optim.batch_size)
    lr_at, start = task._run_schedule("classifier", p, n, 3)  # the last clean round: its schedule ends at 1 % of lr
    assert start == 2 * steps
    assert lr_at(3 * steps - 1) < 0.05 * lr  # over all five rounds it would be ~0.4 lr
    assert lr_at(3 * steps) == pytest.approx(0.01 * lr)
    lr_at, start = task._run_schedule("classifier", p, n, 4)  # the first robust round starts afresh at 0.25 lr
    assert start == 0 and lr_at(0) == pytest.approx(0.25 * lr)
    lr_at, start = task._run_schedule("classifier", p, n, 5)
    assert start == steps and lr_at(2 * steps) == pytest.approx(0.01 * 0.25 * lr)
    # without robust rounds one schedule runs over all five rounds (the warm-up included)
    whole = _mfp(local_epochs=1)
    lr_at, start = task._run_schedule("classifier", whole, n, 4)
    assert start == 3 * steps and lr_at(5 * steps) == pytest.approx(0.01 * lr)


def test_adversarial_trains_medfedpure_on_pgd_examples_without_purifying():
    # the default adv_fraction (0.5) does nothing for medfedpure on its own: no purified fraction, no switch
    assert isinstance(task.classifier_objective(_mfp(), _defense(), server_round=1), ClassifierObjective)
    p = _mfp(adversarial=True, adv_fraction=0.25)
    for defense in (None, _defense()):  # the PGD examples need no denoiser at the site
        obj = task.classifier_objective(p, defense, server_round=1)
        assert isinstance(obj, AdversarialObjective) and obj.fraction == 0.25 and obj.through is None
        assert isinstance(obj.base, ClassifierObjective)  # nothing purified
    through = task.classifier_objective(_mfp(adversarial=True, through_purifier=True), _defense(), server_round=1)
    assert isinstance(through, AdversarialObjective) and through.through is not None
    with pytest.raises(ValueError, match="denoiser"):
        task.classifier_objective(_mfp(adversarial=True, through_purifier=True), None, server_round=1)
    # with robust rounds only they are adversarial
    late = _mfp(adversarial=True, robust_rounds=2)
    assert isinstance(task.classifier_objective(late, None, server_round=3), ClassifierObjective)
    assert isinstance(task.classifier_objective(late, None, server_round=4), AdversarialObjective)


@pytest.mark.parametrize("fed", [
    {"adversarial": True, "adv_fraction": 0.0},
    {"adversarial": True, "method": "pfeddef"},
    {"robust_rounds": 5},
    {"robust_rounds": -1},
    {"robust_lr_scale": 0.0},
    {"through_purifier": True},  # nothing to craft: no purified fraction, no adversarial fraction
    {"through_purifier": True, "purify_fraction": 1.0, "adv_fraction": 0.0},
    {"through_purifier": True, "purify_fraction": 1.0, "adv_fraction": 0.5, "method": "fat"},
])
def test_bad_robust_round_settings_are_refused(fed):
    with pytest.raises(ValueError):
        _mfp(**fed)


@pytest.mark.slow
def test_continuing_a_run_into_robust_rounds_gives_what_one_run_gives(tmp_path):
    from training.federated.run import continue_run, run_federated

    run = dict(backend="inprocess", threads_per_site=1, log=lambda *_: None)
    fed = {"method": "fat", "sites": 2, "eval_max": 8, "eval_every": 3}
    whole = C.resolve("tiny", {"federated": {**fed, "rounds": 3, "robust_rounds": 1, "adv_fraction": 0.5}})
    run_federated(whole, "synth:96", tmp_path / "whole", **run)
    first = C.resolve("tiny", {"federated": {**fed, "rounds": 2, "adv_fraction": 0.0}})  # two clean rounds
    run_federated(first, "synth:96", tmp_path / "first", **run)
    continue_run(tmp_path / "first", tmp_path / "continued", whole)
    run_federated(whole, "synth:96", tmp_path / "continued", **run)
    a = torch.load(tmp_path / "whole/server/classifier.pt", weights_only=True)
    b = torch.load(tmp_path / "continued/server/classifier.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], torch.load(tmp_path / "first/server/classifier.pt",
                                                        weights_only=True)[next(iter(a))])  # round 3 was trained
    assert (tmp_path / "continued/continued.json").exists()


def test_continuing_refuses_other_models_other_schedules_and_used_folders(tmp_path):
    from training.federated.run import continue_run
    from training.federated.server_app import RunState

    src = tmp_path / "src"
    src.mkdir()
    base = C.resolve("tiny", {"federated": {"method": "fedavg", "rounds": 4}})
    (src / "config.toml").write_text(C.dump_toml(base))
    RunState(src).mark("classifier", 4)
    with pytest.raises(ValueError, match="classifier.head_hidden"):  # another model
        continue_run(src, tmp_path / "a", C.resolve(base, {"classifier": {"head_hidden": 7}, "federated": {"rounds": 6}}))
    with pytest.raises(ValueError, match="rounds - robust_rounds = 4"):  # the finished rounds are not the clean ones
        continue_run(src, tmp_path / "b", C.resolve(base, {"federated": {"rounds": 6, "robust_rounds": 1}}))
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        continue_run(src, used, C.resolve(base, {"federated": {"rounds": 6, "robust_rounds": 2}}))
    with pytest.raises(ValueError, match="not a run folder"):
        continue_run(tmp_path / "nothing", tmp_path / "c", base)
    out = continue_run(src, tmp_path / "ok", C.resolve(base, {"federated": {"rounds": 6, "robust_rounds": 2}}))
    assert C.load_toml(out / "config.toml").federated.robust_rounds == 2


def test_continue_from_on_the_command_line_takes_the_runs_settings(tmp_path, monkeypatch, capsys):
    from training import cli
    from training.federated import run as fedrun

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.toml").write_text(C.dump_toml(C.resolve("tiny", {"federated": {"method": "fedavg", "rounds": 2}})))
    seen = {}

    def fake_run(profile, data, out, **kw):  # stands in for the simulation: what it would be asked to train
        seen["profile"] = profile
        raise SystemExit(0)

    monkeypatch.setattr(fedrun, "run_federated", fake_run)
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "fedavg", "--continue-from", str(src), "--out", str(tmp_path / "out"),
                  "--rounds", "3", "--robust-rounds", "1", "--adv-fraction", "0.5"])
    fed = seen["profile"].federated
    assert (seen["profile"].name, fed.rounds, fed.robust_rounds, fed.adv_fraction) == ("tiny", 3, 1, 0.5)
    assert C.load_toml(tmp_path / "out" / "config.toml") == seen["profile"]
    for argv, message in ((["--profile", "edge"], "--profile and --config do not apply"),
                          (["--continue-from", str(tmp_path / "nothing")], "not a run folder")):
        base = ["train", "--method", "fedavg", "--out", str(tmp_path / "x"), "--continue-from", str(src)]
        assert cli.main(base + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_run_is_not_resumed_or_continued_on_other_data(tmp_path):
    from training.federated.run import prepare_run

    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2}})
    quiet = dict(log=lambda *_: None)
    prepare_run(p, "synth:96", tmp_path / "run", **quiet)
    prepare_run(p, "synth:96", tmp_path / "run", **quiet)  # the same data: resumes
    with pytest.raises(ValueError, match="trained on other data"):
        prepare_run(p, "synth:120", tmp_path / "run", **quiet)
    prepare_run(p, "synth:120", tmp_path / "run", resume=False, **quiet)  # starting over is allowed
