"""Benchmark traffic: clean test scans, their PGD versions and their original images, in one ``.npz``.

``python -m benchmarks.traffic --run RUN [--site S] [--n 64] --out benchmarks/data/NAME.npz``

The attacked scans are made by the project's PGD in the paper setting
(L-inf eps 0.015, step 0.003, 7 steps, random start) on the site's
classifier, so that the detector and the purifier do real work in
``runtime bench``. The originals are the scans' image files as read by the
runtime (8-bit); where the data source has no files (synthetic phantoms),
the preprocessed scan stands in for its original. The file holds images
derived from the data set: keep it out of version control (``benchmarks/data``
is ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def make_traffic(run: str, out: str, site: int = 0, n: int = 64, seed: int = 0, batch_size: int = 32) -> dict:
    from runtime.imageio import ImageReadError, read_image
    from training.attacks.pgd import PAPER_LINF, pgd
    from training.evaluate import _read_source, load_sites

    _, sites, info = load_sites(run)
    match = [s for s in sites if s.site == site]
    if not match:
        raise ValueError(f"{run} has no site {site}")
    s = match[0]
    test = s.data["test"]
    if len(test) == 0:
        raise ValueError(f"site {site} of {run} has no test scans")
    idx = np.random.default_rng(seed).permutation(len(test))[: min(n, len(test))]
    x = torch.as_tensor(test.images[idx])[:, None].float()
    y = torch.as_tensor(test.labels[idx]).long()
    g = torch.Generator().manual_seed(seed)
    adv = torch.cat([pgd(s.classifier, x[i : i + batch_size], y[i : i + batch_size], PAPER_LINF, g)
                     for i in range(0, len(x), batch_size)])
    root = Path(_read_source(Path(run)))
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
    p.add_argument("--site", type=int, default=0)
    p.add_argument("--n", type=int, default=64, help="test scans (at most the site's test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="traffic file (.npz)")
    args = p.parse_args(argv)
    try:
        meta = make_traffic(args.run, args.out, args.site, args.n, args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['scans']} clean and attacked scans ({meta['originals_from_files']} originals from files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
