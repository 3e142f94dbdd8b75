"""The training loop on tiny synthetic data: it learns, checkpoints, resumes exactly; config round-trips."""

import torch

from training import config as C
from training.data.datasets import load_dataset
from training.train import train_component


def test_config_toml_round_trip(tmp_path):
    for name in C.PROFILES:
        p = C.get_profile(name)
        f = tmp_path / f"{name}.toml"
        f.write_text(C.dump_toml(p))
        assert C.load_toml(f) == p


def test_resume_gives_same_parameters(tmp_path):
    p = C.resolve("tiny", {"detector": {"optim": {"epochs": 2}}})
    data = load_dataset("synth:64", p.preprocess)
    train_component("detector", p, data, tmp_path / "a", progress=False, log=lambda *_: None)
    train_component("detector", p, data, tmp_path / "b", epochs=1, progress=False, log=lambda *_: None)
    # the same command again continues from epoch 1 (with the full schedule's learning rates)

    ck = torch.load(tmp_path / "b" / "detector" / "last.pt", weights_only=False)
    assert ck["epoch"] == 1
    train_component("detector", p, data, tmp_path / "b", progress=False, log=lambda *_: None)
    a = torch.load(tmp_path / "a" / "detector" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "detector" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_detector_training_reduces_loss(tmp_path):
    p = C.resolve("tiny", {"detector": {"optim": {"epochs": 3}}})
    data = load_dataset("synth:96", p.preprocess)
    s = train_component("detector", p, data, tmp_path, progress=False, log=lambda *_: None)
    h = s["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
