"""Runtime against PyTorch: the same decisions on the same scans, clean and attacked.

``python -m benchmarks.agreement --run RUN --bundle BUNDLE --out DIR [--max-scans N]``

For one site of a trained run and the bundle exported from it, the test
scans (and their paper-setting PGD L-inf versions, crafted on the site's
classifier with the project's attack) go through

- the torch-free runtime: ``runtime.pipeline.Pipeline`` on the ONNX Runtime
  engine (what ``runtime infer --engine ort`` runs), scan i seeded with i;
- the PyTorch reference pipeline (``training.defense.DefensePipeline``) on
  the same scans, with each scan's purification noise drawn from the same
  per-scan numpy generator (``ScanSeedNoise``), so the only difference left
  is the engine.

Reported: detection flags, t*, predictions (agreement rates and counts of
disagreements), accuracy of each, the largest probability difference, and
tau of each side. Writes ``agreement.md`` and ``agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime.markdown import table


@torch.no_grad()
def torch_reference(pipe, x: torch.Tensor, seeds: np.ndarray) -> dict:
    """The PyTorch pipeline with the runtime's per-scan noise (``numpy.random.default_rng(seeds[i])``)."""
    from training.defense import ScanSeedNoise

    r = pipe.run(x, ScanSeedNoise(seeds))
    return {k: v.numpy() for k, v in r.items()}


def compare(run: str, bundle_dir: str, site: int = 0, max_scans: int = 0, batch_size: int = 32, log=print,
            command: str = "") -> dict:
    from runtime.bundle import Bundle
    from runtime.engines import OrtEngine
    from runtime.pipeline import Pipeline, PurifyConfig
    from training import config as cfgmod
    from training.attacks.pgd import PAPER_LINF, pgd
    from training.runs import load_sites

    bundle = Bundle.load(bundle_dir)
    m = bundle.manifest
    bundle_profile = cfgmod.from_dict(m["provenance"]["profile"])
    _, sites, info = load_sites(run, defense=cfgmod.to_dict(bundle_profile)["defense"])
    match = [x for x in sites if x.site == site]
    if not match:
        raise ValueError(f"{run} has no site {site}; its sites: {[x.site for x in sites]}")
    s = match[0]
    engine = OrtEngine(bundle)
    rt = Pipeline(engine, PurifyConfig.from_manifest(m))
    test = s.data["test"]
    n = len(test) if max_scans <= 0 else min(max_scans, len(test))
    x = torch.as_tensor(test.images[:n])[:, None].float()
    y = test.labels[:n]
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    adv = torch.cat([pgd(s.classifier, x[i : i + batch_size], torch.as_tensor(y[i : i + batch_size]).long(),
                         PAPER_LINF, g) for i in range(0, n, batch_size)])
    log(f"attacked {n} scans in {time.perf_counter() - t0:.0f} s")
    report = {"run": run, "bundle": bundle_dir, "site": site, "scans": n, "engine": "ort",
              "providers": {g: sess.get_providers()[0] for g, sess in engine.sessions.items()},
              "tau": {"runtime": float(rt.cfg.tau), "torch": float(s.pipe.tau)},
              "defense": cfgmod.to_dict(bundle_profile)["defense"], "attack": "PGD L-inf eps 0.015, step 0.003, 7 steps",
              "threats": {}}
    for name, xs in (("clean", x), ("pgd_linf", adv)):
        parts = {"rt": [], "pt": []}
        for i in range(0, n, batch_size):
            xb = xs[i : i + batch_size]
            seeds = np.arange(i, i + len(xb), dtype=np.int64)
            parts["rt"].append(rt.run(xb.numpy(), seed=seeds))
            parts["pt"].append(torch_reference(s.pipe, xb, seeds))
        cat = {side: {k: np.concatenate([p[k] for p in parts[side]]) for k in ("probs", "scores", "flagged", "t_star")}
               for side in parts}
        pr, pp = cat["rt"]["probs"].argmax(1), cat["pt"]["probs"].argmax(1)
        row = {
            "acc_runtime": float((pr == y).mean()), "acc_torch": float((pp == y).mean()),
            "prediction_agreement": float((pr == pp).mean()), "prediction_disagreements": int((pr != pp).sum()),
            "flag_agreement": float((cat["rt"]["flagged"] == cat["pt"]["flagged"]).mean()),
            "t_star_agreement": float((cat["rt"]["t_star"] == cat["pt"]["t_star"]).mean()),
            "flag_rate_runtime": float(cat["rt"]["flagged"].mean()), "flag_rate_torch": float(cat["pt"]["flagged"].mean()),
            "probs_max_abs_diff": float(np.abs(cat["rt"]["probs"] - cat["pt"]["probs"]).max()),
            "score_max_rel_diff": float((np.abs(cat["rt"]["scores"] - cat["pt"]["scores"])
                                         / np.maximum(np.abs(cat["pt"]["scores"]), 1e-12)).max()),
        }
        report["threats"][name] = row
        log(f"{name}: runtime {row['acc_runtime']:.4f}, torch {row['acc_torch']:.4f}, predictions agree on "
            f"{row['prediction_agreement']:.4f} ({row['prediction_disagreements']} differ), flags agree on "
            f"{row['flag_agreement']:.4f}, max prob diff {row['probs_max_abs_diff']:.1e}")
    report["seconds"] = time.perf_counter() - t0
    report["command"] = command or f"python -m benchmarks.agreement --run {run} --bundle {bundle_dir} --site {site}"
    return report


def render(r: dict) -> str:
    lines = [f"# Runtime (ONNX Runtime) against PyTorch: {r['bundle']}", "",
             f"Run `{r['run']}`, site {r['site']}, {r['scans']} test scans; {r['attack']} crafted on the site's "
             f"classifier. tau: runtime {r['tau']['runtime']:.6g}, torch {r['tau']['torch']:.6g}. "
             f"Purification noise: numpy default_rng(scan index) per scan on both sides.", "",
             f"Produced by: `{r['command']}` ({r['seconds']:.0f} s)", "",
             *table(["scans", "accuracy, runtime", "accuracy, PyTorch", "predictions agree", "flags agree", "t* agree",
                     "max prob diff", "max score diff (rel)"],
                    [(name, f"{100 * row['acc_runtime']:.2f} %", f"{100 * row['acc_torch']:.2f} %",
                      f"{100 * row['prediction_agreement']:.2f} % ({row['prediction_disagreements']} differ)",
                      f"{100 * row['flag_agreement']:.2f} %", f"{100 * row['t_star_agreement']:.2f} %",
                      f"{row['probs_max_abs_diff']:.1e}", f"{row['score_max_rel_diff']:.1e}")
                     for name, row in r["threats"].items()])]
    lines += ["", "Defense: " + json.dumps(r["defense"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--site", type=int, default=0)
    p.add_argument("--max-scans", type=int, default=0, help="test scans (0: all)")
    p.add_argument("--out", required=True, help="folder for agreement.md and agreement.json")
    args = p.parse_args(argv)
    try:
        r = compare(args.run, args.bundle, args.site, args.max_scans,
                    command=" ".join(["python -m benchmarks.agreement", *(argv if argv is not None else sys.argv[1:])]))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(r, indent=1))
    (out / "agreement.md").write_text(render(r))
    print(f"wrote {out}/agreement.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
