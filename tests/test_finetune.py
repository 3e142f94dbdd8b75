"""Purification-consistent fine-tuning: purified scans reach the classifier, a complete new run is written."""

import json

import pytest
import torch

from training import config as C
from training.diffusion import GaussianDiffusion, purify
from training.finetune import PurifiedAugmentObjective
from training.models import create_model
from training.objectives import AdversarialObjective, PurifiedClassifier


def test_purified_augment_replaces_the_chosen_fraction():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    den = create_model("denoiser", p).eval()
    seen = {}

    def base(model, x, y, g):
        seen["x"] = x
        return torch.zeros(()), {}

    obj = PurifiedAugmentObjective(base, den, GaussianDiffusion.from_config(p.denoiser), 0.5, 50, 60, 1)
    x = torch.rand(8, 1, 32, 32)
    obj(None, x, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    changed = (seen["x"] - x).flatten(1).abs().amax(1) > 0
    assert int(changed.sum()) == 4 and seen["x"].min() >= 0 and seen["x"].max() <= 1
    obj0 = PurifiedAugmentObjective(base, den, GaussianDiffusion.from_config(p.denoiser), 0.0, 50, 60, 1)
    obj0(None, x, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(seen["x"], x)


def test_purified_classifier_is_the_classifier_after_purification_with_a_fresh_draw_per_call():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    clf, den = create_model("classifier", p).eval(), create_model("denoiser", p).eval()
    diff = GaussianDiffusion.from_config(p.denoiser)
    x = torch.rand(4, 1, 32, 32)
    wrapped = PurifiedClassifier(clf, den, diff, 50, 60, 1, torch.Generator().manual_seed(3))
    out = wrapped(x)
    g = torch.Generator().manual_seed(3)  # the same draws by hand: t*, then the forward noise
    t = int(torch.randint(50, 61, (1,), generator=g))
    torch.testing.assert_close(out, clf(purify(den, diff, x, t, 1, None, g)))
    assert not torch.allclose(wrapped(x), out)  # the next call draws new noise
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(wrapped(xg).sum(), xg)
    assert grad.abs().sum() > 0  # exact gradient through the denoiser to the scan


def test_adversarial_examples_through_the_purifier_stay_in_budget_and_differ_from_classifier_only_ones():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    clf, den = create_model("classifier", p), create_model("denoiser", p).eval().requires_grad_(False)
    diff = GaussianDiffusion.from_config(p.denoiser)
    seen = {}

    def base(model, x, y, g):
        seen["x"] = x
        return torch.zeros(()), {}

    attack = C.AttackConfig(eps=0.015, step=0.006, steps=3)
    x, y = torch.rand(8, 1, 32, 32), torch.tensor([0, 1] * 4)
    AdversarialObjective(base, attack, 0.5)(clf, x, y, torch.Generator().manual_seed(0))
    plain = seen["x"]
    AdversarialObjective(base, attack, 0.5, (den, diff, 50, 60, 1))(clf, x, y, torch.Generator().manual_seed(0))
    through = seen["x"]
    for adv in (plain, through):
        d = (adv - x).flatten(1).abs().amax(1)
        assert int((d > 0).sum()) == 4 and float(d.max()) <= 0.015 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.allclose(plain, through)
    assert clf.training  # the objective hands the model back in training mode


@pytest.mark.slow
def test_finetune_writes_an_evaluable_run(tiny_run, tmp_path):
    from training.cli import main
    from training.evaluate import load_sites

    out = tmp_path / "ft"
    rc = main(["finetune", "--run", str(tiny_run), "--out", str(out), "--epochs", "1",
               "--defense", "t_min=60,t_max=80,steps=1", "--quiet"])
    assert rc == 0
    for f in ("classifier/best.pt", "detector/best.pt", "denoiser/best.pt", "config.toml", "data.txt", "finetune.json"):
        assert (out / f).exists(), f
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["defense"]["t_min"] == 60 and meta["adv_fraction"] == 0.5
    profile, sites, info = load_sites(out)
    assert profile.defense.t_max == 80 and sites[0].pipe is not None
    assert meta["through_purifier"] is False
    through = tmp_path / "ft-through"
    assert main(["finetune", "--run", str(tiny_run), "--out", str(through), "--epochs", "1", "--through-purifier",
                 "--keep", "last", "--defense", "t_min=60,t_max=80,steps=1", "--quiet"]) == 0
    meta = json.loads((through / "finetune.json").read_text())
    assert meta["through_purifier"] is True and meta["keep"] == "last"
    from training.checkpoint import load_checkpoint
    assert load_checkpoint(through / "classifier" / "best.pt")["epoch"] == 1  # the last epoch, whatever its score
    # refuses to overwrite, and to fine-tune a run that is not there
    assert main(["finetune", "--run", str(tiny_run), "--out", str(out), "--quiet"]) == 2
    assert main(["finetune", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--quiet"]) == 2


def test_selection_score_is_the_purified_accuracy_when_every_scan_is_purified():
    from training.data.datasets import Split
    from training.finetune import purified_val_accuracy

    p = C.get_profile("tiny")
    torch.manual_seed(0)
    clf, den = create_model("classifier", p).eval(), create_model("denoiser", p).eval()
    diff = GaussianDiffusion.from_config(p.denoiser)
    g = torch.Generator().manual_seed(1)
    split = Split(images=torch.rand(12, 32, 32, generator=g).numpy(), labels=torch.tensor([0, 1] * 6).numpy(),
                  groups=torch.arange(12).numpy(), paths=[f"s{i}" for i in range(12)])
    both = purified_val_accuracy(clf, den, diff, split, 50, 1)
    only = purified_val_accuracy(clf, den, diff, split, 50, 1, purified_only=True)
    assert both["val_score"] == pytest.approx(0.5 * (both["val_acc"] + both["val_acc_purified"]))
    assert only["val_score"] == only["val_acc_purified"] == both["val_acc_purified"]


def _half_flat(n: int) -> torch.Tensor:
    """Scans flat (0.5) on the left half and textured (random) on the right half."""
    g = torch.Generator().manual_seed(1)
    x = torch.full((n, 1, 32, 32), 0.5)
    x[..., 16:] = torch.rand((n, 1, 32, 16), generator=g)
    return x


def test_pgd_on_a_support_leaves_every_other_pixel_alone_and_still_hurts():
    from training.attacks.adaptive import textured_support
    from training.attacks.pgd import pgd
    from training.data.datasets import load_dataset

    p = C.get_profile("tiny")
    torch.manual_seed(0)
    clf = create_model("classifier", p).eval()
    data = load_dataset("synth:100", p.preprocess)
    x, y = torch.as_tensor(data["train"].images[:32])[:, None], torch.as_tensor(data["train"].labels[:32]).long()
    support = textured_support(x, 0.2)
    assert 0 < float(support.mean()) < 0.8  # the flattest fifth and their neighbours are left alone
    attack = C.AttackConfig(eps=0.015, step=0.006, steps=3)
    adv = pgd(clf, x, y, attack, torch.Generator().manual_seed(0), support=support)
    d = (adv - x).abs()
    assert float(d[support == 0].max()) == 0.0 and 0 < float(d.max()) <= 0.015 + 1e-6
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(clf(adv), y)) > float(ce(clf(x), y))
    again = pgd(clf, x, y, attack, torch.Generator().manual_seed(0), support=support)
    assert torch.equal(adv, again)  # deterministic by seed


@pytest.mark.parametrize("fraction,textured", [(1.0, 8), (0.5, 4), (0.0, 0)])
def test_a_fraction_of_the_training_examples_perturb_only_textured_pixels(fraction, textured):
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    clf = create_model("classifier", p)
    seen = {}

    def base(model, x, y, g):
        seen["x"] = x
        return torch.zeros(()), {}

    attack = C.AttackConfig(eps=0.015, step=0.006, steps=3)
    x, y = _half_flat(8), torch.tensor([0, 1] * 4)
    AdversarialObjective(base, attack, 1.0, textured_fraction=fraction)(clf, x, y, torch.Generator().manual_seed(0))
    d = (seen["x"] - x).flatten(2).abs()[:, 0].view(8, 32, 32)
    assert bool((d.flatten(1).amax(1) > 0).all()) and float(d.max()) <= 0.015 + 1e-6
    sparse = d[..., :15].flatten(1).amax(1) == 0  # the flat half untouched
    assert int(sparse.sum()) == textured


def test_textured_fraction_reaches_the_federated_objective_and_is_checked():
    from types import SimpleNamespace

    from training.federated import task

    prof = C.resolve("tiny", {"federated": {"method": "medfedpure", "purify_fraction": 1.0, "adv_fraction": 0.5,
                                            "through_purifier": True, "textured_fraction": 0.5}})
    obj = task.classifier_objective(prof, SimpleNamespace(denoiser=torch.nn.Identity(), diffusion=object()))
    assert isinstance(obj, AdversarialObjective) and obj.textured_fraction == 0.5
    with pytest.raises(ValueError):
        C.resolve("tiny", {"federated": {"textured_fraction": 1.5}})
    with pytest.raises(ValueError):
        AdversarialObjective(None, C.AttackConfig(), 0.5, textured_fraction=-0.1)
