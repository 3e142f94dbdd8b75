"""Where a federated classifier's errors come from: its ranking (AUC) and where it puts the decision.

``python -m benchmarks.operating_point --run runs/search/la-avgm-bs8-r30e2 [--site 0]``

Scores one site's classifier (alone, clean scans) on the pooled validation and test scans by its margin
log p(tumor) - log p(no tumor), and prints per split: the ROC AUC, the balanced accuracy at margin 0 (the
model's own decision), the best balanced accuracy over all margins, and the test balanced accuracy at the margin
that is best on validation (PROTOCOL.md rule 10: the margin is chosen on validation scans only).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from training.engine import predict
from training.metrics import balanced_accuracy, positive_class, roc_auc


def margins(model, split, positive: int) -> np.ndarray:
    lp = predict(model, split.images)
    return (lp[:, positive] - lp[:, 1 - positive]).numpy()


def best_margin(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(margin, balanced accuracy) of the cut ``score > margin`` that maximises balanced accuracy on these scans."""
    cuts = np.unique(scores)
    cuts = np.concatenate([[cuts[0] - 1.0], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1.0]])
    bal = [balanced_accuracy(labels, (scores > c).astype(int)) for c in cuts]
    i = int(np.argmax(bal))
    return float(cuts[i]), float(bal[i])


def analyse(run: str, site: int = 0, source: str | None = None) -> dict:
    from training.runs import load_sites

    _, sites, _ = load_sites(run, source)
    if not 0 <= site < len(sites):
        raise ValueError(f"{run} has sites 0-{len(sites) - 1}, not {site}")
    s = sites[site]
    pooled = s.data.pooled or {}
    if "val" not in pooled or "test" not in pooled:
        raise ValueError(f"{run}: no pooled validation and test scans for site {site}")
    positive = positive_class(s.data.class_names)
    out = {"run": run, "site": site}
    scored = {part: (margins(s.classifier, pooled[part], positive), (pooled[part].labels == positive).astype(int))
              for part in ("val", "test")}
    for part, (m, y) in scored.items():
        cut, best = best_margin(m, y)
        out[part] = {"scans": len(y), "auc": roc_auc(m[y == 0], m[y == 1]),
                     "balanced_at_0": balanced_accuracy(y, (m > 0).astype(int)), "best_balanced": best, "best_margin": cut}
    m, y = scored["test"]
    out["test"]["balanced_at_val_margin"] = balanced_accuracy(y, (m > out["val"]["best_margin"]).astype(int))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.operating_point", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished federated run folder")
    ap.add_argument("--site", type=int, default=0, help="whose classifier (default 0; FedAvg's are all the same)")
    ap.add_argument("--data", help="data source (default: the one the run was trained on)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        r = analyse(args.run, args.site, args.data)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    v, t = r["val"], r["test"]
    print(f"{r['run']} site {r['site']}: pooled val {v['scans']} scans, test {t['scans']} scans")
    print(f"  AUC                         val {v['auc']:.4f}   test {t['auc']:.4f}")
    print(f"  balanced acc at margin 0    val {100 * v['balanced_at_0']:.2f}   test {100 * t['balanced_at_0']:.2f}")
    print(f"  best over margins           val {100 * v['best_balanced']:.2f} (margin {v['best_margin']:+.3f})   "
          f"test {100 * t['best_balanced']:.2f}")
    print(f"  test at the validation's best margin: {100 * t['balanced_at_val_margin']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
