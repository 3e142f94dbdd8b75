"""How much does a diagnosis depend on the purification noise? Flip rate across noise draws of a bundle.

``python -m benchmarks.flip_rate --bundle bundles/B --run runs/R --site K --draws 5 --out DIR``

The bundle runs (ONNX Runtime, the scanner's pipeline) on the site's test
scans once per draw, each draw with another site secret, so every scan gets
other noise. Reported, for the defense as shipped (``adaptive``: only
flagged scans are purified) and for purifying every scan (``always``, the
upper bound on what the noise can change): the share of scans whose
prediction is not the same in every draw, the mean pairwise flip rate, and
the same for the mean of the draws' probabilities (what averaging ``k``
draws would give), and the accuracy of each. Test scans only; labels are
used only to score.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np


def run(bundle_dir: str, run_dir: str, site: int, draws: int = 5, out: str | None = None, threads: int = 2,
        trusted: list | None = None, allow_unsigned: bool = False, log=print) -> dict:
    from runtime.bundle import Bundle
    from runtime.engines import OrtEngine
    from runtime.pipeline import Pipeline, PurifyConfig, scan_seed
    from training.runs import load_sites

    bundle = Bundle.load(bundle_dir, trusted=trusted, allow_unsigned=allow_unsigned)
    pipe = Pipeline(OrtEngine(bundle, threads=threads), PurifyConfig.from_manifest(bundle.manifest))
    _, sites, _ = load_sites(run_dir)
    s = next(x for x in sites if x.site == site)
    test = s.data["test"]
    x = test.images[:, None].astype(np.float32)
    shas = [hashlib.sha256(a.tobytes()).hexdigest() for a in x]
    rng = np.random.default_rng(0)
    secrets = [rng.bytes(32) for _ in range(draws)]
    result = {"bundle": str(bundle_dir), "run": str(run_dir), "site": site, "n_test": len(x), "draws": draws,
              "modes": {}}
    for mode in ("adaptive", "always"):
        probs = []
        for d, secret in enumerate(secrets):
            seeds = np.array([scan_seed(secret, h) for h in shas], np.int64)
            res = {"probs": [], "flagged": []}
            for i in range(0, len(x), 16):
                r = pipe.run(x[i : i + 16], seed=seeds[i : i + 16], mode=mode)
                res["probs"].append(r["probs"])
                res["flagged"].append(r["flagged"])
            probs.append(np.concatenate(res["probs"]))
            flagged = np.concatenate(res["flagged"])
            log(f"  {mode} draw {d + 1}/{draws}: accuracy {(probs[-1].argmax(1) == test.labels).mean():.4f}, "
                f"flagged {flagged.mean():.3f}")
        p = np.stack(probs)  # [D, N, C]
        pred = p.argmax(2)
        unstable = (pred != pred[:1]).any(0)
        pairs = [float((pred[a] != pred[b]).mean()) for a, b in itertools.combinations(range(draws), 2)]
        row = {"flagged_rate": float(flagged.mean()), "unstable_share": float(unstable.mean()),
               "pairwise_flip_rate": float(np.mean(pairs)),
               "accuracy_per_draw": [float((q == test.labels).mean()) for q in pred]}
        if draws >= 4:  # averaging k draws: two disjoint groups of k draws, how often do their answers differ?
            k = draws // 2
            a, b = p[:k].mean(0).argmax(1), p[k : 2 * k].mean(0).argmax(1)
            row[f"mean_of_{k}_flip_rate"] = float((a != b).mean())
            row[f"mean_of_{k}_accuracy"] = [float((a == test.labels).mean()), float((b == test.labels).mean())]
        result["modes"][mode] = row
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "flip_rate.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flip_rate", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--site", type=int, required=True)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trusted-key", action="append")
    p.add_argument("--allow-unsigned", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        r = run(args.bundle, args.run, args.site, args.draws, args.out, args.threads, args.trusted_key,
                args.allow_unsigned)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(r["modes"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
