"""FedDecorr's regulariser (classifier.decorrelation): the measure, and what it adds to the objective."""

from __future__ import annotations

import pytest
import torch

from training import config as C
from training.models import create_model
from training.objectives import ClassifierObjective, feature_correlation


def test_uncorrelated_features_cost_nothing_and_collapsed_ones_cost_one():
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(feature_correlation(signs * torch.tensor([3.0, 0.5]))) == pytest.approx(0.0, abs=1e-6)
    one = torch.randn(16, 1, generator=torch.Generator().manual_seed(0))
    collapsed = one @ torch.tensor([[1.0, -2.0, 0.5, 4.0]]) + torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(feature_correlation(collapsed)) == pytest.approx(1.0, abs=1e-4)
    # half the pairs perfectly correlated, half not at all: in between
    half = torch.cat([signs, signs], 1)[:, [0, 2, 1, 3]]  # dims 0,1 copies; 2,3 copies; across: uncorrelated
    assert float(feature_correlation(half)) == pytest.approx(2 * 2 / (4 * 3), abs=1e-6)
    assert float(feature_correlation(torch.randn(1, 8))) == 0.0  # one scan: nothing to correlate


def test_its_gradient_decorrelates():
    g = torch.Generator().manual_seed(1)
    f = (torch.randn(32, 1, generator=g) @ torch.ones(1, 6) + 0.3 * torch.randn(32, 6, generator=g)).requires_grad_()
    before = float(feature_correlation(f))
    opt = torch.optim.SGD([f], lr=5.0)
    for _ in range(20):
        opt.zero_grad()
        feature_correlation(f).backward()
        opt.step()
    assert float(feature_correlation(f)) < 0.5 * before


def test_objective_adds_the_weighted_mean_over_experts():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    model = create_model("classifier", p).eval()
    x, y = torch.rand(6, 1, 32, 32), torch.tensor([0, 1, 1, 0, 1, 0])
    c = p.classifier
    plain, _ = ClassifierObjective(c.beta, c.gamma)(model, x, y, None)
    loss, stats = ClassifierObjective(c.beta, c.gamma, decorrelation=2.0)(model, x, y, None)
    with torch.no_grad():
        feats = model.forward_all(x)["features"]
        expected = torch.stack([feature_correlation(feats[:, k]) for k in range(feats.shape[1])]).mean()
    assert feats.shape[1] == c.num_experts and float(expected) > 0.01
    torch.testing.assert_close(loss.detach(), plain.detach() + 2.0 * expected)
    assert stats["decorrelation"] == pytest.approx(float(expected), abs=1e-6)
    # the profile's setting reaches the objective; a negative weight is refused
    from training.objectives import make_objective

    assert make_objective("classifier", C.resolve("tiny", {"classifier": {"decorrelation": 0.5}})).decorrelation == 0.5
    with pytest.raises(ValueError):
        C.resolve("tiny", {"classifier": {"decorrelation": -1.0}})
