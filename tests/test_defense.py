"""The PyTorch defense: no label reaches it, tau from clean scans, only flagged scans are purified."""

import inspect

import numpy as np
import torch

from training import config as C
from training.defense import DefensePipeline, calibrate_tau, run_batched, t_star_of
from training.diffusion import GaussianDiffusion
from training.models import create_model


def _pipe(tau):
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    parts = [create_model(c, p).eval() for c in ("classifier", "detector", "denoiser")]
    return DefensePipeline(*parts, GaussianDiffusion.from_config(p.denoiser), tau, p.defense).eval(), parts


def test_no_label_can_reach_the_defense():
    for fn in (DefensePipeline.forward, DefensePipeline.run, run_batched, DefensePipeline.purify_flagged):
        names = set(inspect.signature(fn).parameters)
        assert not names & {"y", "label", "labels", "target", "targets"}, fn


def test_calibrate_tau_flag_rate():
    s = np.random.default_rng(0).normal(size=10000)
    tau = calibrate_tau(s, 0.05)
    assert abs((s > tau).mean() - 0.05) < 0.002


def test_t_star_grows_with_score_within_bounds():
    cfg = C.DefenseConfig(t_min=50, t_max=120, ref_ratio=2.0, quantum=10)
    s = torch.linspace(1.0, 3.0, 50)
    t = t_star_of(s, 1.0, cfg)
    assert t.min() == 50 and t.max() == 120
    assert bool((t[1:] >= t[:-1]).all()) and bool((t % 10 == 0).all())


def test_only_flagged_scans_are_purified():
    x = torch.rand(6, 1, 32, 32)
    pipe, (classifier, detector, _) = _pipe(tau=0.0)
    with torch.no_grad():
        scores = pipe.score(x)
    pipe.tau = float(scores.median())
    out = pipe.run(x, torch.Generator().manual_seed(0))
    flagged = out["flagged"]
    assert 0 < int(flagged.sum()) < 6
    with torch.no_grad():
        direct = classifier(x).softmax(1)
    assert torch.allclose(out["probs"][~flagged], direct[~flagged], atol=1e-6)
    assert not torch.allclose(out["probs"][flagged], direct[flagged], atol=1e-6)
    assert bool((out["t_star"][~flagged] == 0).all()) and bool((out["t_star"][flagged] >= 50).all())
    # the purification noise comes from the generator: same seed, same result
    again = pipe.run(x, torch.Generator().manual_seed(0))
    assert torch.equal(out["probs"], again["probs"])


def test_kappa_rule_flags_the_top_fraction_of_a_batch():
    from training.defense import kappa_flags

    s = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert kappa_flags(s, 0.5).tolist() == [False, True, True, False]
    assert not kappa_flags(s, 0.0).any() and kappa_flags(s, 1.0).all()
    # batch-dependent: the same scan is flagged or not depending on its neighbours
    assert kappa_flags(torch.tensor([0.5, 0.1]), 0.5)[0] and not kappa_flags(torch.tensor([0.5, 0.9]), 0.5)[0]


def _laplacian_floor_reference(img: np.ndarray, fraction: float) -> float:
    p = np.pad(img, 1, mode="edge")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]
    a = np.sort(np.abs(lap).ravel())
    return float(a[: int(np.ceil(fraction * a.size))].mean())


def _scans_with_flat_regions(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random 'scans': a bright disk with a smooth texture on a black background."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        cx, cy, r = g.uniform(0.4, 0.6), g.uniform(0.4, 0.6), g.uniform(0.25, 0.35)
        disk = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).astype(np.float32)
        texture = 0.5 + 0.2 * np.sin(g.uniform(2, 6) * xx * 6.28) * np.cos(g.uniform(2, 6) * yy * 6.28)
        out.append(disk * texture)
    return torch.as_tensor(np.stack(out))[:, None].float()


def test_noise_floor_matches_a_numpy_reference():
    from training.defense import noise_floor

    x = torch.rand(3, 1, 20, 24)
    for fraction in (0.05, 0.1, 0.5, 1.0):
        got = noise_floor(x, fraction).numpy()
        ref = [_laplacian_floor_reference(x[i, 0].numpy().astype(np.float64), fraction) for i in range(3)]
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-7), fraction
    assert float(noise_floor(torch.full((1, 1, 16, 16), 0.3))[0]) == 0.0


def test_noise_floor_separates_sign_noise_from_clean_scans():
    from training.defense import detection_scores
    from training.metrics import roc_auc

    x = _scans_with_flat_regions(40)
    g = torch.Generator().manual_seed(1)
    noisy = (x + 0.015 * torch.randint(0, 2, x.shape, generator=g).mul(2).sub(1)).clamp(0, 1)
    cfg = C.DefenseConfig(score="floor", floor_fraction=0.1)
    clean_s, noisy_s = detection_scores(None, x[:, 0].numpy(), cfg), detection_scores(None, noisy[:, 0].numpy(), cfg)
    assert roc_auc(clean_s, noisy_s) > 0.99
    tau = calibrate_tau(clean_s, 0.05)
    assert (noisy_s > tau).mean() > 0.9


def test_detection_score_kinds():
    p = C.get_profile("tiny")
    pipe_mae, (_, detector, _) = _pipe(tau=0.0)
    x = torch.rand(4, 1, 32, 32)
    from training.defense import DetectionScore, noise_floor
    from training.models.mae import complementary_masks

    masks, resp = complementary_masks(detector.num_patches, p.detector.mask_ratio, p.detector.mask_seed)
    mae_cfg = C.DefenseConfig(score="mae")
    with torch.no_grad():
        assert torch.allclose(DetectionScore(detector, mae_cfg, p.detector.mask_ratio, p.detector.mask_seed)(x),
                              detector.score(x, masks, resp))
        assert torch.equal(DetectionScore(None, C.DefenseConfig(score="floor"))(x), noise_floor(x, 0.1))
    import pytest

    with pytest.raises(ValueError, match="needs a trained detector"):
        DetectionScore(None, mae_cfg)
    with pytest.raises(ValueError, match="defense score"):
        C.DefenseConfig(score="psnr")


def test_t_star_with_zero_tau_is_finite():
    cfg = C.DefenseConfig(t_min=50, t_max=120)
    t = t_star_of(torch.tensor([0.0, 1e-6, 1.0]), 0.0, cfg)
    assert t.tolist() == [50, 120, 120]
