"""The operating-point analysis: the best cut on hand-made scores."""

import numpy as np

from benchmarks.operating_point import best_margin


def test_best_margin_finds_the_cut_between_the_classes_and_its_balanced_accuracy():
    scores = np.array([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0])
    labels = np.array([0, 0, 0, 1, 1, 1])  # at margin 0 one negative is called positive: balanced 5/6
    cut, bal = best_margin(scores, labels)
    assert 0.5 < cut < 1.0 and bal == 1.0
    assert ((scores > cut) == labels.astype(bool)).all()


def test_best_margin_with_overlapping_classes_is_the_best_of_all_cuts():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    scores = rng.normal(labels * 1.0, 1.0)
    cut, bal = best_margin(scores, labels)
    def b(c):
        p = scores > c
        return 0.5 * ((p[labels == 1]).mean() + (~p[labels == 0]).mean())
    assert abs(b(cut) - bal) < 1e-12
    assert all(b(c) <= bal + 1e-12 for c in np.linspace(-4, 5, 901))
