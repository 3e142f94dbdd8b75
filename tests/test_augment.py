"""Training augmentation: the paper's draws unchanged by default; zoom, shifts and noise when asked for."""

import pytest
import torch

from training import config as cfgmod
from training.data.augment import Augment, augmentation


def _square(n: int = 16, size: int = 32, half: int = 6) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    c = size // 2
    x[:, :, c - half:c + half, c - half:c + half] = 1.0
    return x


def test_default_augment_draws_only_the_papers_random_numbers():
    x = _square()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    Augment()(x, g1)
    torch.rand(len(x), 4, generator=g2)  # rotation, two flips, brightness: nothing else
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_zoom_changes_the_lesion_area_both_ways_and_shift_moves_it():
    x = _square(n=64)
    still = dict(max_degrees=0.0, p_hflip=0.0, brightness=0.0)
    same = Augment(**still)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, x)
    zoomed = Augment(**still, scale=0.4)(x, torch.Generator().manual_seed(0))
    area, base = zoomed.sum((1, 2, 3)), x[0].sum()
    assert (area > 1.2 * base).any() and (area < 0.8 * base).any()
    shifted = Augment(**still, translate=0.3)(x, torch.Generator().manual_seed(0))
    cols = torch.arange(x.shape[-1], dtype=torch.float32)
    centre = (shifted.sum(2).squeeze(1) * cols).sum(1) / shifted.sum((1, 2, 3))
    assert (centre - 15.5).abs().max() > 2.0  # moved by pixels, not rounding
    assert shifted.min() >= 0 and shifted.max() <= 1


def test_noise_is_added_inside_the_pixel_range_and_is_seeded():
    x = torch.full((4, 1, 16, 16), 0.5)
    aug = Augment(max_degrees=0.0, p_hflip=0.0, brightness=0.0, noise=0.05)
    a, b = aug(x, torch.Generator().manual_seed(1)), aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert 0.04 < float((a - x).std()) < 0.06
    assert a.min() >= 0 and a.max() <= 1


def test_config_carries_the_augmentation_and_refuses_bad_keys(tmp_path):
    p = cfgmod.resolve("edge", {"classifier": {"augment_kwargs": {"scale": 0.1, "translate": 0.05, "noise": 0.02}}})
    f = tmp_path / "c.toml"
    f.write_text(cfgmod.dump_toml(p))
    aug = cfgmod.load_toml(f).classifier.make_augment()
    assert (aug.scale, aug.translate, aug.noise, aug.max_degrees) == (0.1, 0.05, 0.02, 15.0)
    assert cfgmod.get_profile("edge").classifier.make_augment() == Augment()
    with pytest.raises(cfgmod.UsageError, match="unknown key.*zoom"):
        cfgmod.resolve("edge", {"classifier": {"augment_kwargs": {"zoom": 0.1}}})
    with pytest.raises(cfgmod.UsageError, match="scale"):
        cfgmod.resolve("edge", {"classifier": {"augment_kwargs": {"scale": 1.5}}})


def test_only_the_classifier_takes_the_configured_augmentation():
    p = cfgmod.resolve("edge", {"classifier": {"augment_kwargs": {"noise": 0.05}}})
    assert augmentation(p, "classifier").noise == 0.05
    assert augmentation(p, "denoiser") == Augment() and augmentation(p, "detector") == Augment()
