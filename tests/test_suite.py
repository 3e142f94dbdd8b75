"""The attack suite: every attack stays in its budget, hurts the system it targets, is reproducible by seed;
worst-case and N-draw aggregations; the suite on a tiny run; the defense mode travels from run to runtime."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from training import config as C
from training.attacks.suite import (
    ATTACKS,
    PipelineModel,
    SuiteConfig,
    craft,
    majority_of_n,
    summarise,
    worst_case,
    worst_of_n,
)
from training.defense import DefensePipeline
from training.diffusion import GaussianDiffusion


class Brightness(nn.Module):
    """A classifier that is right on the test scans below and flips under a tiny change: class = mean > 0.5."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(400.0))

    def forward(self, x):
        z = self.k * (x.mean((1, 2, 3)) - 0.5)
        return torch.stack([-z, z], 1)


class ZeroEps(nn.Module):
    """A denoiser that predicts no noise: one DDIM step returns the noised scan rescaled (x plus small noise)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return x * self.w


def _scans(n=8, size=32, seed=0):
    """Textured scans whose mean brightness sits 0.002..0.004 on either side of 0.5; labels from the side."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 2
    off = np.where(y == 1, 1, -1) * g.uniform(0.002, 0.004, n)
    tex = g.uniform(-0.2, 0.2, (n, 1, size, size))
    tex -= tex.mean((1, 2, 3), keepdims=True)
    x = np.clip(0.5 + off[:, None, None, None] + tex, 0, 1)
    return torch.as_tensor(x).float(), torch.as_tensor(y).long()


def _pipe(mode="adaptive"):
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    diffusion = GaussianDiffusion.from_config(p.denoiser)
    cfg = C.DefenseConfig(t_min=2, t_max=4, quantum=1, steps=1, mode=mode)
    pipe = DefensePipeline(Brightness(), None, ZeroEps(), diffusion, 1.0, cfg).eval()
    x, y = _scans()
    with torch.no_grad():
        pipe.tau = float(pipe.score(x).median())
    return pipe, x, y


FAST = SuiteConfig(long_steps=10, restarts=2, apgd_steps=5, eot=2, adaptive_steps=5, adaptive_eot=1, draws=3)


def _true_prob(model, x, y, reps=8):
    with torch.no_grad():
        return float(torch.stack([model(x).softmax(1)[torch.arange(len(y)), y] for _ in range(reps)]).mean())


@pytest.mark.parametrize("name", [a for a in ATTACKS if a != "transfer-site"] + ["transfer-site"])
def test_each_attack_stays_in_budget_hurts_its_target_and_is_reproducible(name):
    pipe, x, y = _pipe()
    other = Brightness()
    adv = craft(name, FAST, pipe, pipe.classifier, x, y, seed=3, other=other)
    again = craft(name, FAST, pipe, pipe.classifier, x, y, seed=3, other=other)
    assert torch.equal(adv, again), "same seed, same scans"
    d = (adv - x).flatten(1)
    assert adv.min() >= 0 and adv.max() <= 1
    if name.endswith("-l2"):
        assert float(d.norm(dim=1).max()) <= FAST.eps_l2 + 1e-5
    else:
        assert float(d.abs().max()) <= FAST.eps_linf + 1e-6
    assert float(d.abs().max()) > 0
    with torch.no_grad():
        clean_acc = (pipe.classifier(x).argmax(1) == y).float().mean()
    assert clean_acc == 1.0
    target = PipelineModel(pipe, 1, seed=11) if FAST.params(name)["target"].startswith("pipeline") else pipe.classifier
    # every attack lowers its target's confidence in the truth; the classifier-side ones flip the undefended model
    assert _true_prob(target, adv, y) < _true_prob(target, x, y) - 0.05
    if not FAST.params(name)["target"].startswith("pipeline") and name != "transfer-site":
        with torch.no_grad():
            assert (pipe.classifier(adv).argmax(1) == y).float().mean() < clean_acc


def test_under_tau_stays_unflagged_and_textured_leaves_the_score():
    pipe, x, y = _pipe()
    under = craft("adaptive-under-tau", FAST, pipe, pipe.classifier, x, y, seed=0)
    with torch.no_grad():
        assert bool((pipe.score(under) <= pipe.tau).all())
        assert (pipe.classifier(under).argmax(1) == y).float().mean() < 0.5


def test_lowfreq_delta_is_smooth():
    pipe, x, y = _pipe()
    adv = craft("lowfreq", FAST, pipe, pipe.classifier, x, y, seed=0)
    full = craft("adaptive", FAST, pipe, pipe.classifier, x, y, seed=0)
    from training.defense import abs_laplacian

    # the low-frequency delta has far less second-derivative energy than the full-resolution one
    assert float(abs_laplacian(adv - x).mean()) < 0.5 * float(abs_laplacian(full - x).mean())


def test_aggregations_on_hand_made_outcomes():
    # 4 scans x 5 draws
    c = np.array([[1, 1, 1, 1, 1],   # always right
                  [1, 1, 1, 0, 0],   # right in 3 of 5: majority yes, worst no
                  [0, 1, 1, 0, 0],   # right in 2 of 5: draw 0 wrong, majority no
                  [0, 0, 0, 0, 0]], bool)
    assert worst_of_n(c).tolist() == [True, False, False, False]
    assert majority_of_n(c).tolist() == [True, True, False, False]
    assert majority_of_n(np.array([[1, 0]], bool)).tolist() == [False]  # a tie is not a majority
    s = summarise(c, np.array([1, 0, 0, 1], bool))
    assert s == {"scans": 4, "robust_acc": 0.5, "worst_of_n": 0.25, "majority_of_n": 0.5, "draws": 5,
                 "flag_rate": 0.5}
    other = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    breaks_first = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    w = worst_case({"a": c, "b": breaks_first, "c": other})
    # per scan: survives all three only where every attack is survived
    assert w["robust_acc"] == 0.25 and w["worst_of_n"] == 0.0 and w["majority_of_n"] == 0.25
    assert w["strongest"] == "a" and w["scans"] == 4


def test_always_mode_purifies_every_scan_and_draws_average():
    pipe, x, y = _pipe("always")
    out = pipe.run(x, torch.Generator().manual_seed(0))
    assert bool(out["flagged"].all()) and bool((out["t_star"] >= pipe.cfg.t_min).all())
    adaptive, _, _ = _pipe("adaptive")
    assert not bool(adaptive.run(x, torch.Generator().manual_seed(0))["flagged"].all())
    # draws: the mean of D purifications' probabilities; same generator state -> same result
    from dataclasses import replace

    pipe.cfg = replace(pipe.cfg, draws=4)
    a = pipe.run(x, torch.Generator().manual_seed(5))["probs"]
    b = pipe.run(x, torch.Generator().manual_seed(5))["probs"]
    assert torch.equal(a, b)
    singles = []
    g = torch.Generator().manual_seed(5)
    pipe.cfg = replace(pipe.cfg, draws=1)
    flagged = torch.ones(len(x), dtype=torch.bool)
    t_star = pipe.decide(pipe.score(x))[1]
    with torch.no_grad():
        for _ in range(4):
            singles.append(pipe.classifier(pipe.purify_flagged(x, flagged, t_star, g)).softmax(1))
    assert torch.allclose(a, torch.stack(singles).mean(0), atol=1e-6)
    with pytest.raises(C.UsageError):
        C.DefenseConfig(mode="sometimes")
    with pytest.raises(C.UsageError):
        C.DefenseConfig(draws=0)


def test_balanced_order_interleaves_classes():
    from training.evaluate import balanced_order

    labels = np.array([0] * 10 + [1] * 4)
    o = balanced_order(labels)
    assert sorted(o.tolist()) == list(range(14))
    assert labels[o[:8]].sum() == 4  # the first 8: four of each
    assert np.array_equal(balanced_order(labels), o)


@pytest.mark.slow
def test_suite_on_a_tiny_run_writes_a_complete_report(tiny_run):
    from training.evaluate import suite_run

    run = tiny_run
    cfg = SuiteConfig(long_steps=3, restarts=1, apgd_steps=2, eot=1, adaptive_steps=2, adaptive_eot=1, draws=2)
    r = suite_run(run, cfg, max_scans=6, cheap_max=10, log=lambda *_: None)
    saved = json.loads((run / "reports" / "suite.json").read_text())
    assert saved["scans"] == 6 and saved["cheap_scans"] == 10
    names = [a["name"] for a in saved["attacks"]]
    assert "transfer-site" not in names  # one site: no other site to transfer from
    assert set(names) == set(ATTACKS) - {"transfer-site"}
    for a in saved["attacks"]:
        assert {"name", "params", "scans", "robust_acc", "flag_rate", "seconds", "worst_of_n", "majority_of_n"} <= set(a)
        assert a["scans"] == (10 if a["name"].startswith("pgd") else 6)
        assert a["worst_of_n"] <= a["robust_acc"] + 1e-9
    w = r["worst_case"]
    assert w["robust_acc"] <= min(a["robust_acc"] for a in saved["attacks"] if a["scans"] == 6) + 1e-9
    assert "clean" in saved and saved["worst_of_n"] == w["worst_of_n"]
    assert "worst case over the suite" in (run / "reports" / "suite.md").read_text()


def test_the_chosen_mode_travels_from_the_run_through_the_bundle_to_the_runtime(tiny_run, tiny_bundle, tmp_path, capsys):
    from export.bundle import export_site
    from runtime.bundle import Bundle
    from runtime.cli import main
    from tests.test_trust import _records, _scans

    default = Bundle.load(tiny_bundle).manifest["purification"]
    assert (default["mode"], default["draws"]) == ("adaptive", 1)
    out = tmp_path / "always"
    export_site(tiny_run, 0, out, log=lambda *_: None, defense={"mode": "always", "draws": 2}, parity_scans=8,
                int8=False)
    m = Bundle.load(out).manifest
    assert (m["purification"]["mode"], m["purification"]["draws"]) == ("always", 2)
    assert main(["info", "--bundle", str(out)]) == 0
    assert "every scan purified, 2 draws averaged" in capsys.readouterr().out
    scans = _scans(tmp_path, 4)
    res = tmp_path / "r.jsonl"
    assert main(["infer", str(scans), "--bundle", str(out), "--out", str(res), "--quiet", "--seed", "1"]) == 0
    recs = [r for r in _records(res) if not r.get("refused")]
    assert recs and all(r["flagged"] and r["purification_draws"] == 2 and r["t_star"] >= 1 for r in recs)
    # the same scans through the default bundle: purified only when flagged (tau at 5 % of clean scans)
    res2 = tmp_path / "r2.jsonl"
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(res2), "--quiet", "--seed", "1"]) == 0
    assert not all(r["flagged"] for r in _records(res2) if not r.get("refused"))


def test_collect_puts_reports_side_by_side(tmp_path):
    from benchmarks.robustness_suite import main

    rep = {"attacks": [{"name": "apgd-ce", "robust_acc": 0.5, "worst_of_n": 0.25, "scans": 4}],
           "clean": {"robust_acc": 1.0, "worst_of_n": 0.75, "scans": 8},
           "worst_case": {"robust_acc": 0.5, "worst_of_n": 0.25, "scans": 4, "strongest": "apgd-ce"},
           "defense": {"mode": "always", "draws": 1, "t_min": 100, "t_max": 150}, "split": "val", "seconds": 60}
    f = tmp_path / "suite-a.json"
    f.write_text(json.dumps(rep))
    out = tmp_path / "out"
    assert main([f"central={f}", "--out", str(out)]) == 0
    saved = json.loads((out / "suite.json").read_text())
    assert saved["runs"]["central"]["worst_case"]["robust_acc"] == 0.5
    md = (out / "suite.md").read_text()
    assert "50.00 % (25.00 %) [4]" in md and "always, 1 draw(s)" in md
    assert main([f"x={tmp_path / 'missing.json'}", "--out", str(out)]) == 2
    assert main(["no-label", "--out", str(out)]) == 2
