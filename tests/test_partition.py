"""Splitting samples over sites: exhaustive, disjoint, reproducible, skewed on demand."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.partition import describe, parse_scheme, partition

SCHEMES = ["iid", "dirichlet:0.1", "dirichlet:1.0", "quantity:0.5", "profile"]


def _data(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels [n] (2 classes, 40 % ones) and scanner profiles [n] (4 names)."""
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=n) < 0.4).astype(np.int64)
    profiles = np.array(["A", "B", "C", "D"])[rng.integers(0, 4, size=n)]
    return labels, profiles


def _check_partition(parts: list[np.ndarray], n: int, n_sites: int) -> None:
    """Exhaustive, disjoint, sorted, non-empty."""
    assert len(parts) == n_sites
    assert all(len(p) > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize(
    ("scheme", "n_sites"),
    [(s, k) for s in SCHEMES for k in (1, 4, 7) if not (s == "profile" and k < 4)],
)
def test_exhaustive_disjoint_nonempty(scheme, n_sites):
    labels, profiles = _data()
    parts = partition(labels, n_sites, scheme, seed=3, profiles=profiles)
    _check_partition(parts, len(labels), n_sites)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reproducible_by_seed(scheme):
    labels, profiles = _data()
    a = partition(labels, 5, scheme, seed=1, profiles=profiles)
    b = partition(labels, 5, scheme, seed=1, profiles=profiles)
    c = partition(labels, 5, scheme, seed=2, profiles=profiles)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over sites of |site fraction of class 1 - global fraction|."""
    glob = labels.mean()
    return float(np.mean([abs(labels[p].mean() - glob) for p in parts]))


def test_dirichlet_small_alpha_skews_labels_iid_balanced():
    labels, _ = _data(1000)
    iid = partition(labels, 8, "iid", seed=0)
    skew = partition(labels, 8, "dirichlet:0.1", seed=0)
    assert _label_skew(iid, labels) < 0.03
    assert _label_skew(skew, labels) > 0.15
    sizes = [len(p) for p in iid]
    assert max(sizes) - min(sizes) <= 1


def test_min_size_respected_and_lowered_for_tiny_data():
    labels, _ = _data(1000)
    for seed in range(5):
        parts = partition(labels, 10, "dirichlet:0.05", seed=seed)
        assert min(len(p) for p in parts) >= 10
        parts = partition(labels, 10, "quantity:0.1", seed=seed)
        assert min(len(p) for p in parts) >= 10
    tiny = np.array([0, 1] * 6)
    for scheme in SCHEMES[:4]:
        _check_partition(partition(tiny, 5, scheme, seed=0), len(tiny), 5)


def test_quantity_skews_sizes_not_labels():
    labels, _ = _data(2000)
    parts = partition(labels, 6, "quantity:0.3", seed=4)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 2 * sizes.min()
    big = [p for p in parts if len(p) >= 100]
    assert _label_skew(big, labels) < 0.1


def test_profile_scheme_one_profile_per_site():
    labels, profiles = _data()
    parts = partition(labels, 4, "profile", profiles=profiles)
    assert sorted(profiles[p][0] for p in parts) == ["A", "B", "C", "D"]
    parts = partition(labels, 9, "profile", profiles=profiles)
    _check_partition(parts, len(labels), 9)
    assert all(len(set(profiles[p])) == 1 for p in parts)
    assert {profiles[p][0] for p in parts} == {"A", "B", "C", "D"}
    with pytest.raises(ValueError):
        partition(labels, 3, "profile", profiles=profiles)
    with pytest.raises(ValueError):
        partition(labels, 4, "profile")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_groups_stay_together(scheme):
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 150, size=600)  # ~4 near-duplicates per group
    labels = (groups % 3 == 0).astype(np.int64)
    profiles = np.array(["A", "B", "C", "D"])[groups % 4]
    parts = partition(labels, 5, scheme, seed=0, groups=groups, profiles=profiles)
    _check_partition(parts, len(labels), 5)
    site_of = np.empty(len(labels), dtype=int)
    for k, p in enumerate(parts):
        site_of[p] = k
    for g in np.unique(groups):
        assert len(set(site_of[groups == g])) == 1


@pytest.mark.parametrize(
    "bad",
    [
        "foo",
        "",
        "dirichlet",
        "dirichlet:",
        "dirichlet:abc",
        "dirichlet:-1",
        "quantity:0",
        "iid:2",
        "profile:1",
    ],
)
def test_bad_scheme_raises(bad):
    with pytest.raises(ValueError):
        parse_scheme(bad)
    with pytest.raises(ValueError):
        partition(np.zeros(20, dtype=np.int64), 2, bad)


def test_parse_scheme_and_too_many_sites():
    assert parse_scheme("iid") == ("iid", None)
    assert parse_scheme("dirichlet:0.5") == ("dirichlet", 0.5)
    assert parse_scheme("Quantity:2") == ("quantity", 2.0)
    with pytest.raises(ValueError):
        partition(np.zeros(3, dtype=np.int64), 4, "iid")


def test_describe_table():
    labels, _ = _data(100)
    parts = partition(labels, 3, "iid")
    table = describe(parts, labels, ["no", "yes"])
    assert "no" in table and "yes" in table and "total" in table
    assert table.splitlines()[-1].split() == [
        "all",
        str((labels == 0).sum()),
        str(labels.sum()),
        "100",
    ]
    assert len(table.splitlines()) == 2 + 3 + 2  # header, sites, total
