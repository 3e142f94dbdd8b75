"""Benchmark traffic: clean test scans, their PGD versions and their original images, in one ``.npz``.

``python -m benchmarks.traffic --run RUN [--bundle BUNDLE] [--site S] [--n 64] --out benchmarks/data/NAME.npz``

The scans are the test scans of one site of the run: ``--site``, by default
the site the bundle was exported for (its manifest's provenance) when
``--bundle`` is given, else site 0. The attacked scans are made by the
project's PGD in the paper setting (L-inf eps 0.015, step 0.003, 7 steps,
random start) on the site's classifier, so that the detector and the
purifier do real work in ``runtime bench``. The originals are the scans'
image files as read by the runtime (8-bit); where the data source has no
files (synthetic phantoms), the preprocessed scan stands in for its
original. The file holds images derived from the data set: keep it out of
version control (``benchmarks/data`` is ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def run_sites(run: str | Path) -> list[int]:
    """The site numbers of a run as ``training.evaluate.load_sites`` numbers them, read without loading a model."""
    from training import config as cfgmod

    run = Path(run)
    if not (run / "config.toml").exists():
        raise FileNotFoundError(f"{run}: not a run folder (no config.toml)")
    if (run / "sites").is_dir():
        return list(range(cfgmod.load_toml(run / "config.toml").federated.sites))
    return [0]


def _no_site(run: str | Path, site: int, sites: list[int]) -> ValueError:
    have = ", ".join(str(s) for s in sites) or "none"
    return ValueError(f"site {site} is not a site of {run} (its sites: {have})")


def check_site(run: str | Path, site: int) -> int:
    """``site``, if the run has it; a one-line ValueError naming the run's sites otherwise."""
    sites = run_sites(run)
    if site not in sites:
        raise _no_site(run, site, sites)
    return site


def load_site(run: str | Path, site: int, defense: dict | None = None):
    """The run's profile, its site ``site`` (classifier, data, PyTorch pipeline) and the run's description.

    ``defense`` overrides the run's defense settings, as in
    ``training.evaluate.load_sites``. A site the run does not have is a
    one-line ValueError naming the run's sites.
    """
    from training.runs import load_sites

    check_site(run, site)
    profile, sites, info = load_sites(run, defense=defense)
    match = [s for s in sites if s.site == site]
    if not match:
        raise _no_site(run, site, [s.site for s in sites])
    return profile, match[0], info


def bundle_site(bundle: str | Path, *, trusted: list | None = None, allow_unsigned: bool = False) -> int:
    """The site a bundle was exported for: its manifest's ``provenance.site`` (the bundle is signature-checked)."""
    from runtime.bundle import Bundle

    return manifest_site(Bundle.load(bundle, trusted=trusted, allow_unsigned=allow_unsigned).manifest, bundle)


def manifest_site(manifest: dict, where: str | Path = "the bundle") -> int:
    site = (manifest.get("provenance") or {}).get("site")
    if not isinstance(site, int) or isinstance(site, bool) or site < 0:
        raise ValueError(f"{where}: the manifest names no site (provenance.site is {site!r})")
    return site


def make_traffic(run: str, out: str, site: int = 0, n: int = 64, seed: int = 0, batch_size: int = 32) -> dict:
    from runtime.imageio import ImageReadError, read_image
    from training.attacks.pgd import PAPER_LINF, pgd
    from training.runs import read_source

    _, s, info = load_site(run, site)
    test = s.data["test"]
    if len(test) == 0:
        raise ValueError(f"site {site} of {run} has no test scans")
    idx = np.random.default_rng(seed).permutation(len(test))[: min(n, len(test))]
    x = torch.as_tensor(test.images[idx])[:, None].float()
    y = torch.as_tensor(test.labels[idx]).long()
    g = torch.Generator().manual_seed(seed)
    adv = torch.cat([pgd(s.classifier, x[i : i + batch_size], y[i : i + batch_size], PAPER_LINF, g)
                     for i in range(0, len(x), batch_size)])
    root = Path(read_source(run))
    raws, from_files = [], 0
    for i in idx:
        p = Path(test.paths[i])
        p = p if p.is_absolute() else root / p
        try:
            raws.append(np.round(read_image(p) * 255.0).astype(np.uint8))
            from_files += 1
        except (ImageReadError, OSError):
            raws.append(np.round(test.images[i] * 255.0).astype(np.uint8))
    meta = {"run": run, "site": site, "scans": int(len(idx)), "attack": "PGD L-inf eps 0.015, step 0.003, 7 steps, "
            "random start, on the site's classifier", "originals_from_files": from_files, "seed": seed,
            "kind": info["kind"]}
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_p, clean=x[:, 0].numpy(), attacked=adv[:, 0].numpy(), labels=y.numpy(),
                        raw_flat=np.concatenate([r.ravel() for r in raws]),
                        raw_shapes=np.array([r.shape for r in raws], dtype=np.int64), meta=np.array(json.dumps(meta)))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--bundle", help="the site's bundle: its manifest names the site (the default for --site)")
    p.add_argument("--site", type=int, help="the run's site whose test scans to use (default: the bundle's, else 0)")
    p.add_argument("--n", type=int, default=64, help="test scans (at most the site's test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="traffic file (.npz)")
    p.add_argument("--trusted-key", action="append", metavar="PUB",
                   help="public key (PEM) whose signed bundles are accepted, besides "
                        "$MEDFEDPURE_HOME/trusted-keys/*.pub (repeatable)")
    p.add_argument("--allow-unsigned", action="store_true", help="read a bundle that is unsigned or signed by an untrusted key")
    args = p.parse_args(argv)
    try:
        site = args.site
        if site is None:
            site = (bundle_site(args.bundle, trusted=args.trusted_key, allow_unsigned=args.allow_unsigned)
                    if args.bundle else 0)
        meta = make_traffic(args.run, args.out, site, args.n, args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['scans']} clean and attacked scans of site {site} "
          f"({meta['originals_from_files']} originals from files)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
