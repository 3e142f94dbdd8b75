"""The command line: one table of federated flags for `train` and `deploy-prepare`, flags that do not apply
to the chosen mode refused, user mistakes in one line and every other error with its traceback."""

import argparse
import dataclasses

import pytest

from training import cli
from training import config as C
from training.data import datasets
from training.federated import run as fedrun

# train's options that are not FederatedConfig fields: central training, the simulation engine, the data
TRAIN_ONLY = {"--component", "--epochs", "--skip-bad", "--data", "--no-resume", "--quiet", "--no-cache",
              "--threads-per-site", "--parallel-sites", "--backend", "--continue-from"}
DEPLOY_ONLY = {"--connection"}
SCALAR_FIELDS = {f.name for f in dataclasses.fields(C.FederatedConfig)
                 if not dataclasses.is_dataclass(getattr(C.FederatedConfig(), f.name))}

# a valid value other than the default for every scalar FederatedConfig field
FED_VALUES = {
    "method": "pfeddef", "sites": 4, "rounds": 3, "local_epochs": 2, "defense_rounds": 5, "defense_local_epochs": 3,
    "partition": "quantity:2.0", "fedbn": True, "proximal_mu": 0.01, "keep_optimizer_state": True, "gate_warmup_rounds": 2, "bn_recalibrate": True, "adv_fraction": 0.25, "purify_train": True,
    "purify_fraction": 0.5, "eval_every": 2, "eval_max": 7, "aggregation": "krum", "byzantine": 1, "trim_beta": 0.1,
    "root_size": 32, "poison": "scaling", "malicious_fraction": 0.25, "poison_scale": 5.0, "dp_clip": 1.0,
    "dp_sigma": 0.5, "dp_weight_sigma": 0.01, "dp_delta": 1e-6, "feature_skew": True, "server_opt": "fedavg",
    "server_lr": 0.5, "server_momentum": 0.5, "robust_rounds": 1, "robust_lr_scale": 0.5, "swa_rounds": 2,
}
# fields valid with another method only: set in a second run of the same checks
MEDFEDPURE_VALUES = {"method": "medfedpure", "adversarial": True, "through_purifier": True, "textured_fraction": 0.5}
# SCAFFOLD needs the plain average and no privacy noise: set in a third run
SCAFFOLD_VALUES = {"scaffold": True, "aggregation": "fedavg", "dp_clip": 0.0, "dp_sigma": 0.0, "dp_weight_sigma": 0.0}


class Stop(Exception):
    """Raised where a command would start loading data or training."""


def _stop(*args, **kwargs):
    raise Stop


def _options(command: str) -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[command]._actions for o in a.option_strings} - {"-h", "--help", "--debug"}


def _argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_every_federated_field_has_one_flag():
    assert set(cli.FED_FLAGS) == SCALAR_FIELDS == set(FED_VALUES) | set(MEDFEDPURE_VALUES) | set(SCAFFOLD_VALUES)
    assert {"--" + f.replace("_", "-") for f in SCALAR_FIELDS} <= _options("train")


def test_deploy_prepare_takes_every_federated_flag_of_train():
    train, deploy = _options("train"), _options("deploy-prepare")
    assert train - TRAIN_ONLY == deploy - DEPLOY_ONLY


def test_deploy_prepare_writes_every_federated_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["deploy-prepare", "--out", str(out), "--profile", "tiny", *_argv(FED_VALUES)]) == 0
    fed = C.load_toml(out / "config.toml").federated
    assert {name: getattr(fed, name) for name in FED_VALUES} == FED_VALUES
    assert fed.aggregation == "krum" and fed.dp_clip == 1.0
    assert "4 sites" in capsys.readouterr().out
    values = {**FED_VALUES, **MEDFEDPURE_VALUES}
    assert cli.main(["deploy-prepare", "--out", str(tmp_path / "mfp"), "--profile", "tiny", *_argv(values)]) == 0
    fed = C.load_toml(tmp_path / "mfp" / "config.toml").federated
    assert {name: getattr(fed, name) for name in values} == values
    values = {**FED_VALUES, **SCAFFOLD_VALUES}
    assert cli.main(["deploy-prepare", "--out", str(tmp_path / "scaffold"), "--profile", "tiny", *_argv(values)]) == 0
    fed = C.load_toml(tmp_path / "scaffold" / "config.toml").federated
    assert {name: getattr(fed, name) for name in values} == values


def test_federated_flags_without_method_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "load_dataset", _stop)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--sites", "10"]) == 2
    err = _one_line_error(capsys)
    assert "--sites applies only to federated training (--method" in err
    argv = ["train", "--out", str(tmp_path / "run"), "--dp-clip", "1", "--fedbn", "--backend", "inprocess"]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert "--fedbn" in err and "--dp-clip" in err and "--backend" in err and "--sites" not in err
    with pytest.raises(Stop):  # central training with its own flags gets as far as loading the data
        cli.main(["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--component", "classifier", "--skip-bad"])


def test_central_flags_with_method_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fedrun, "run_federated", _stop)
    assert cli.main(["train", "--method", "fedavg", "--epochs", "3", "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert "--epochs does not apply to federated training; use --rounds/--local-epochs" in err
    assert cli.main(["train", "--method", "fedavg", "--component", "all", "--skip-bad", "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "--component, --skip-bad do not apply" in err
    with pytest.raises(Stop):  # federated training with its own flags gets as far as the simulation
        cli.main(["train", "--method", "fedavg", "--sites", "2", "--backend", "inprocess", "--out", str(tmp_path)])


def test_invalid_partition_is_refused_by_the_config(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('profile = "tiny"\n[federated]\npartition = "dirichlet"\n')
    with pytest.raises(ValueError, match="needs a number") as exc:
        C.load_toml(cfg)
    assert isinstance(exc.value, C.UsageError)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        C.FederatedConfig(partition="bogus:1")
    with pytest.raises(ValueError, match="ALPHA must be a positive number"):
        C.FederatedConfig(partition="dirichlet:0")
    assert cli.main(["deploy-prepare", "--out", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    assert "needs a number" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_config_mistakes_are_usage_errors(tmp_path):
    with pytest.raises(C.UsageError, match="sites"):
        C.resolve("tiny", {"federated": {"sites": 0}})
    with pytest.raises(C.UsageError, match="unknown setting"):
        C.resolve("tiny", {"federated": {"site": 2}})
    with pytest.raises(C.UsageError, match="unknown profile"):
        C.get_profile("huge")
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[federated\n")
    with pytest.raises(C.UsageError, match="not valid TOML"):
        C.load_toml(cfg)


def test_programming_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("boom")

    def mistake(args):
        raise C.UsageError("bad value")

    argv = ["synth", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(cli, "cmd_synth", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(argv)
    monkeypatch.setattr(cli, "cmd_synth", mistake)
    assert cli.main(argv) == 2
    assert _one_line_error(capsys) == "error: bad value\n"
    with pytest.raises(C.UsageError, match="bad value"):
        cli.main([*argv, "--debug"])
    with pytest.raises(C.UsageError, match="bad value"):
        cli.main(["--debug", *argv])
