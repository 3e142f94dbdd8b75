"""Split N samples over federated sites, reproducibly by seed.

Schemes (``parse_scheme``):

- ``"iid"``: shuffled and dealt round-robin per class, so every site gets
  about the same size and label mix;
- ``"dirichlet:ALPHA"``: label skew; for each class the proportions over the
  sites are drawn from Dirichlet(ALPHA) (small ALPHA -> few classes per site),
  as in FedML / NIID-Bench, redrawn until every site has ``min_size`` units;
- ``"quantity:ALPHA"``: quantity skew; site sizes ~ Dirichlet(ALPHA), labels
  iid within;
- ``"profile"``: every site holds the samples of one scanner profile; with more
  sites than profiles, a profile's samples are split iid over its sites.

The partition is exhaustive and disjoint: every index is in exactly one site,
and no site is empty. With ``groups`` (near-duplicate groups in the real
data), whole groups are partitioned instead of samples, so a group never
spans two sites; sizes in ``min_size`` then count groups.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet", "quantity", "profile")
_MAX_DRAWS = 1000


def parse_scheme(s: str) -> tuple[str, float | None]:
    """``"dirichlet:0.5"`` -> ("dirichlet", 0.5); ``"iid"`` -> ("iid", None).

    Raises ValueError for unknown schemes, a missing, extra or non-positive
    parameter.
    """
    name, sep, arg = str(s).strip().partition(":")
    name = name.strip().lower()
    if name not in SCHEMES:
        raise ValueError(f"unknown partition scheme {s!r}; expected one of {_usage()}")
    if name in ("iid", "profile"):
        if sep:
            raise ValueError(f"partition scheme {name!r} takes no parameter, got {s!r}")
        return name, None
    try:
        alpha = float(arg)
    except ValueError:
        raise ValueError(f"partition scheme {s!r} needs a number: {name}:ALPHA") from None
    if not np.isfinite(alpha) or alpha <= 0.0:
        raise ValueError(f"partition scheme {s!r}: ALPHA must be a positive number")
    return name, alpha


def _usage() -> str:
    """The accepted scheme spellings, for error messages."""
    return "'iid', 'dirichlet:ALPHA', 'quantity:ALPHA', 'profile'"


def partition(
    labels: np.ndarray,
    n_sites: int,
    scheme: str,
    seed: int = 0,
    groups: np.ndarray | None = None,
    profiles: np.ndarray | None = None,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Sorted index arrays, one per site, that together cover ``range(len(labels))``.

    labels: [N] class labels. groups: optional [N] group ids; all samples of a
    group go to the same site (the group's label / profile is its first
    sample's). profiles: [N] scanner profile names, needed for "profile".
    min_size: smallest site (in units: samples, or groups) for the Dirichlet
    schemes, lowered automatically when there are too few units.
    """
    labels = np.asarray(labels)
    n = len(labels)
    name, alpha = parse_scheme(scheme)
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    unit_of, first = _units(n, groups)
    n_units = len(first)
    if n_units < n_sites:
        raise ValueError(f"cannot split {n_units} samples/groups over {n_sites} non-empty sites")
    unit_labels = labels[first]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SCHEMES.index(name)]))
    floor = max(1, min(int(min_size), n_units // (2 * n_sites)))

    if name == "iid":
        unit_parts = _iid(unit_labels, np.arange(n_units), n_sites, rng)
    elif name == "dirichlet":
        unit_parts = _dirichlet_label(unit_labels, n_sites, alpha, floor, rng)
    elif name == "quantity":
        unit_parts = _dirichlet_quantity(unit_labels, n_sites, alpha, floor, rng)
    else:
        if profiles is None:
            raise ValueError("partition scheme 'profile' needs the profiles array")
        profiles = np.asarray(profiles)
        if len(profiles) != n:
            raise ValueError(f"profiles has {len(profiles)} entries for {n} labels")
        unit_parts = _by_profile(unit_labels, profiles[first], n_sites, rng)
    return [np.flatnonzero(np.isin(unit_of, part)) for part in unit_parts]


def _units(n: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Unit of every sample [N] and the first sample of every unit [U].

    Without groups every sample is its own unit; with groups, units are the
    groups in order of first appearance.
    """
    if groups is None:
        idx = np.arange(n)
        return idx, idx
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} labels")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unit ids by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse.ravel()], first[order]


def _iid(
    labels: np.ndarray, units: np.ndarray, n_sites: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Stratified random split of ``units`` [M] (labels [M]) into n_sites parts.

    Units are shuffled, ordered by class and dealt round-robin, so site sizes
    differ by at most one and every class is spread evenly.
    """
    perm = rng.permutation(len(units))
    perm = perm[np.argsort(labels[perm], kind="stable")]
    start = int(rng.integers(n_sites))
    site = (np.arange(len(units)) + start) % n_sites
    return [np.sort(units[perm[site == k]]) for k in range(n_sites)]


def _dirichlet_label(
    labels: np.ndarray, n_sites: int, alpha: float, floor: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed split of range(U) (NIID-Bench): per class, Dirichlet(alpha) shares.

    A site already holding more than U / n_sites units gets no more. Redrawn
    until every site has >= floor units; after _MAX_DRAWS draws the best one
    is repaired by moving units from the largest sites.
    """
    n_units = len(labels)
    best: list[np.ndarray] | None = None
    for _ in range(_MAX_DRAWS):
        sites: list[list[int]] = [[] for _ in range(n_sites)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n_sites, alpha))
            open_ = np.array([len(s) < n_units / n_sites for s in sites], dtype=float)
            p = p * open_ if (p * open_).sum() > 0 else open_
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
            for s, chunk in zip(sites, np.split(idx, cuts)):
                s.extend(chunk.tolist())
        parts = [np.array(s, dtype=np.int64) for s in sites]
        if best is None or min(map(len, parts)) > min(map(len, best)):
            best = parts
        if min(map(len, parts)) >= floor:
            break
    return [np.sort(p) for p in _repair(best, floor, rng)]


def _dirichlet_quantity(
    labels: np.ndarray, n_sites: int, alpha: float, floor: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantity-skewed split of range(U): site sizes ~ Dirichlet(alpha), labels iid.

    Redrawn until every site has >= floor units (then repaired, as above).
    """
    n_units = len(labels)
    best: list[np.ndarray] | None = None
    for _ in range(_MAX_DRAWS):
        idx = rng.permutation(n_units)
        p = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(p) * n_units).astype(int)[:-1]
        parts = np.split(idx, cuts)
        if best is None or min(map(len, parts)) > min(map(len, best)):
            best = parts
        if min(map(len, parts)) >= floor:
            break
    return [np.sort(p) for p in _repair(best, floor, rng)]


def _repair(parts: list[np.ndarray], floor: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random units from the largest site to the smallest until all have >= floor."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    while True:
        sizes = [len(p) for p in parts]
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        if sizes[small] >= floor or sizes[large] <= floor:
            return parts
        take = int(rng.integers(sizes[large]))
        parts[small] = np.append(parts[small], parts[large][take])
        parts[large] = np.delete(parts[large], take)


def _by_profile(
    labels: np.ndarray, profiles: np.ndarray, n_sites: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One profile per site; a profile's units are split iid over its sites.

    Sites are given to profiles in proportion to their sizes (at least one each).
    """
    names, counts = np.unique(profiles, return_counts=True)
    if n_sites < len(names):
        raise ValueError(
            f"scheme 'profile' needs at least one site per profile: "
            f"{len(names)} profiles ({', '.join(map(str, names))}) for {n_sites} sites"
        )
    share = np.ones(len(names), dtype=int)
    for _ in range(n_sites - len(names)):  # largest remaining units per site next
        share[int(np.argmax(np.where(share < counts, counts / share, -np.inf)))] += 1
    parts: list[np.ndarray] = []
    for name, k in zip(names, share):
        units = np.flatnonzero(profiles == name)
        parts += _iid(labels[units], units, int(k), rng)
    return parts


def class_shares(parts: list[np.ndarray], labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_sites, n_classes]``: the fraction of each class that each site holds."""
    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=n_classes)[:n_classes] for p in parts]).astype(float)
    return counts / np.maximum(counts.sum(0, keepdims=True), 1.0)


def partition_like(
    labels: np.ndarray, shares: np.ndarray, seed: int = 0, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split another split (validation, test) so each site's label mix follows its training share.

    ``shares`` ``[n_sites, n_classes]`` from :func:`class_shares`. Per class,
    units (samples or whole groups) are shuffled and cut in proportion to the
    sites' shares (largest remainder). Exhaustive and disjoint; unlike
    :func:`partition`, a site may get no unit of a split when its shares are
    tiny: its evaluation is then reported as missing, not invented.
    """
    labels = np.asarray(labels)
    shares = np.asarray(shares, dtype=float)
    n_sites = shares.shape[0]
    unit_of, first = _units(len(labels), groups)
    unit_labels = labels[first]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 97]))
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for c in np.unique(unit_labels):
        idx = rng.permutation(np.flatnonzero(unit_labels == c))
        w = shares[:, c] if c < shares.shape[1] and shares[:, c].sum() > 0 else np.full(n_sites, 1.0)
        exact = w / w.sum() * len(idx)
        count = np.floor(exact).astype(int)
        for k in np.argsort(-(exact - count), kind="stable")[: len(idx) - count.sum()]:
            count[k] += 1
        for s, chunk in zip(sites, np.split(idx, np.cumsum(count)[:-1])):
            s.extend(chunk.tolist())
    return [np.flatnonzero(np.isin(unit_of, np.array(s, dtype=np.int64))) for s in sites]


def describe(parts: list[np.ndarray], labels: np.ndarray, class_names: list[str]) -> str:
    """A text table of per-site class counts and totals, one row per site."""
    labels = np.asarray(labels)
    width = max(6, *(len(c) + 1 for c in class_names))
    head = f"{'site':>5}" + "".join(f"{c:>{width}}" for c in class_names) + f"{'total':>{width}}"
    lines = [head, "-" * len(head)]
    total = np.zeros(len(class_names), dtype=int)
    for k, part in enumerate(parts):
        counts = np.bincount(labels[part], minlength=len(class_names))[: len(class_names)]
        total += counts
        row = "".join(f"{c:>{width}}" for c in counts)
        lines.append(f"{k:>5}{row}{len(part):>{width}}")
    lines.append("-" * len(head))
    row = "".join(f"{c:>{width}}" for c in total)
    lines.append(f"{'all':>5}{row}{int(total.sum()):>{width}}")
    return "\n".join(lines)
