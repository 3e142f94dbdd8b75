"""PGD in [0, 1] pixel space: budget, clamping, and agreement with torchattacks on the same model and start."""

import pytest
import torch

from training import config as C
from training.attacks import PAPER_L2, PAPER_LINF, pgd
from training.data.datasets import load_dataset
from training.models import create_model


@pytest.fixture(scope="module")
def model_and_data():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    model = create_model("classifier", p).eval()
    data = load_dataset("synth:300", p.preprocess)
    x = torch.as_tensor(data["train"].images[:200])[:, None]
    y = torch.as_tensor(data["train"].labels[:200]).long()
    return model, x, y


@pytest.mark.parametrize("cfg", [PAPER_LINF, PAPER_L2])
def test_pgd_stays_in_budget_and_range(model_and_data, cfg):
    model, x, y = model_and_data
    adv = pgd(model, x[:32], y[:32], cfg, torch.Generator().manual_seed(1))
    d = (adv - x[:32]).flatten(1)
    assert adv.min() >= 0 and adv.max() <= 1
    if cfg.norm == "linf":
        assert d.abs().max() <= cfg.eps + 1e-6
    else:
        assert d.norm(dim=1).max() <= cfg.eps + 1e-5
    # the attack raises the loss it maximises
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(adv), y[:32]) > loss(model(x[:32]), y[:32])


def test_pgd_is_reproducible(model_and_data):
    model, x, y = model_and_data
    a = pgd(model, x[:8], y[:8], PAPER_LINF, torch.Generator().manual_seed(3))
    b = pgd(model, x[:8], y[:8], PAPER_LINF, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_pgd_agrees_with_torchattacks(model_and_data):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = model_and_data
    cfg = PAPER_LINF
    ref = torchattacks.PGD(model, eps=cfg.eps, alpha=cfg.step, steps=cfg.steps, random_start=True)
    # torchattacks draws its start as x + U(-eps, eps) from the global generator: draw the same start
    torch.manual_seed(123)
    start = torch.empty_like(x).uniform_(-cfg.eps, cfg.eps)
    torch.manual_seed(123)
    adv_ref = ref(x, y)
    adv = pgd(model, x, y, cfg, start=start)
    with torch.no_grad():
        acc_ref = (model(adv_ref).argmax(1) == y).float().mean().item()
        acc = (model(adv).argmax(1) == y).float().mean().item()
    assert abs(acc - acc_ref) <= 0.005
    assert (adv - adv_ref).abs().max() <= 1e-4
