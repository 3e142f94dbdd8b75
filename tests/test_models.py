"""Every model of every profile: shapes, dtypes, forward and backward; the mask set; state-dict splitting."""

import pytest
import torch

from training import config as C
from training.models import create_model
from training.models.mae import complementary_masks, random_masks
from training.models.moe import merge_state_dict, site_local_keys, split_state_dict

PROFILES = ["tiny", "edge"]  # "paper" is built in test_paper_profile_builds (no backward: CPU time)


def _forward(component, model, profile, n=2):
    s = profile.image_size
    x = torch.rand(n, 1, s, s)
    if component == "classifier":
        return model(x)
    if component == "detector":
        mask = random_masks(n, model.num_patches, profile.detector.mask_ratio, torch.Generator().manual_seed(0))
        return model(x, mask)
    return model(x * 2 - 1, torch.tensor([1, 999][:n]))


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("component", C.COMPONENTS)
def test_forward_backward(component, profile):
    p = C.get_profile(profile)
    model = create_model(component, p)
    out = _forward(component, model, p)
    s = p.image_size
    expected = {
        "classifier": (2, p.classifier.num_classes),
        "detector": (2, (s // p.detector.patch) ** 2, p.detector.patch**2),
        "denoiser": (2, 1, s, s),
    }[component]
    assert tuple(out.shape) == expected and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [q.grad for q in model.parameters() if q.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_classifier_outputs_log_probabilities():
    p = C.get_profile("tiny")
    model = create_model("classifier", p).eval()
    out = model.forward_all(torch.rand(3, 1, 32, 32))
    assert torch.allclose(out["log_probs"].exp().sum(1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["gate_weights"].sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_complementary_masks_cover_each_patch_once(ratio):
    masks, resp = complementary_masks(196, ratio, seed=3)
    assert masks.shape == resp.shape == (round(1 / (1 - ratio)), 196)
    assert (resp.sum(0) == 1).all()  # every patch counted exactly once
    assert not (resp & ~masks).any()  # counted only where it was hidden
    assert abs(masks.float().mean().item() - ratio) < 0.01


def test_score_is_deterministic():
    p = C.get_profile("tiny")
    model = create_model("detector", p).eval()
    masks, resp = complementary_masks(model.num_patches, 0.75)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        a, b = model.score(x, masks, resp), model.score(x, masks, resp)
    assert torch.equal(a, b) and a.shape == (4,)


@pytest.mark.parametrize("keep_bn_local", [False, True])
def test_split_state_dict_round_trips(keep_bn_local):
    model = create_model("classifier", C.get_profile("tiny"))
    state = model.state_dict()
    keys = site_local_keys(model, keep_bn_local)
    shared, local = split_state_dict(state, keys)
    assert set(local) and all(k.startswith("gates.") or keep_bn_local for k in local)
    assert any(k.startswith("experts.") for k in shared)
    assert not any(k.startswith("gates.") for k in shared)
    if keep_bn_local:
        assert any("bn" in k for k in local)
    merged = merge_state_dict(shared, local)
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)
    with pytest.raises(ValueError):
        merge_state_dict(shared, {**local, next(iter(shared)): torch.zeros(1)})
