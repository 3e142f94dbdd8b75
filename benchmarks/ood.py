"""Out-of-distribution refusal of a trained run: which score, its ROC AUC, its false refusals, selective accuracy.

``python -m benchmarks.ood --run runs/mfp --out benchmarks/results/ood-br35h``

For every site: the candidate scores are computed on the site's clean
validation scans and on synthetic out-of-distribution inputs made from them
(``training.ood.synthetic_ood``: text, blank, noise, strips, gradients,
checkerboards, zoomed crops, inverted contrast, shapes, contact sheets), and
the score is chosen by its mean validation ROC AUC over the sites
(PROTOCOL.md rule 10: decide on validation scans). Then, on test scans only:
the chosen score's ROC AUC against synthetic inputs made from test scans
(per kind), its false-refusal rate on clean test scans at the threshold set
on validation scans (1 % refused there), and the risk-coverage curve
(accuracy of the classifier on the accepted test scans against the share
accepted).

Candidates: ``mahalanobis`` (class-conditional, shared covariance, on the
classifier's shared feature psi, fitted on the site's own training scans,
threshold on its own validation scans), ``mahalanobis-fed`` (the same score
from the federation's summed statistics, threshold on the pooled validation
scores: what ``python -m export`` ships for a federated run whose experts
are shared), ``mahalanobis-1`` (one Gaussian for all classes), ``msp`` (1 - the classifier's top probability), ``floor`` (the
detection score, the noise floor) and ``mae`` (the MAE's error, when the
run trained one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.federated_search import pct
from runtime.markdown import table
from training.metrics import roc_auc
from training.ood import (
    OOD_KINDS,
    fit_mahalanobis,
    refusal_threshold,
    risk_coverage,
    score_images,
    synthetic_ood,
)

CANDIDATES = ("mahalanobis", "mahalanobis-fed", "mahalanobis-1", "msp", "floor", "mae")


def _scorers(site, profile, fed) -> dict:
    from training.engine import predict

    train = site.data["train"]
    k = profile.classifier.num_classes
    maha = fit_mahalanobis(site.classifier, train.images, train.labels, k)
    maha1 = fit_mahalanobis(site.classifier, train.images, np.zeros(len(train), int), 1)
    out = {
        "mahalanobis": lambda x: score_images(maha, x),
        **({"mahalanobis-fed": lambda x: score_images(fed, x)} if fed is not None else {}),
        "mahalanobis-1": lambda x: score_images(maha1, x),
        "msp": lambda x: 1.0 - predict(site.classifier, x).softmax(1).max(1).values.numpy(),
    }
    if site.pipe is not None:
        out["floor"] = lambda x: _detector(site, x, "floor")
        if site.pipe.detector is not None:
            out["mae"] = lambda x: _detector(site, x, "mae")
    return out


def _detector(site, x: np.ndarray, kind: str) -> np.ndarray:
    import dataclasses

    from training.defense import detection_scores

    return detection_scores(site.pipe.detector, x, dataclasses.replace(site.pipe.cfg, score=kind))


def _federation_scorer(sites, k: int, refusal_rate: float):
    """The Mahalanobis score from the sites' summed statistics and its threshold on the pooled validation scores.

    (None, None) where the sites' classifiers do not share their features.
    """
    from export.bundle import shared_features
    from training.ood import add_stats, feature_stats, mahalanobis_from_stats

    if not shared_features(sites):
        return None, None
    fed = mahalanobis_from_stats(sites[0].classifier, add_stats(
        [feature_stats(s.classifier, s.data["train"].images, s.data["train"].labels, k) for s in sites]))
    fed_thr = refusal_threshold(np.concatenate([score_images(fed, s.data["val"].images) for s in sites]),
                                refusal_rate)
    return fed, fed_thr


def _site_row(s, profile, fed, fed_thr, per_kind: int, refusal_rate: float, seed: int) -> dict:
    """Every candidate score of site ``s``: validation and test ROC AUC, refusals, risk-coverage."""
    from training.engine import predict

    val, test = s.data["val"], s.data["test"]
    scorers = _scorers(s, profile, fed)
    ood_val, kinds_val = synthetic_ood(val.images, per_kind, profile.preprocess, seed=seed + 17 * s.site)
    ood_test, kinds_test = synthetic_ood(test.images, per_kind, profile.preprocess, seed=seed + 17 * s.site + 1)
    row = {"site": s.site, "n_val": len(val), "n_test": len(test), "n_ood_val": len(ood_val),
           "n_ood_test": len(ood_test), "val_auc": {}, "test_auc": {}, "test_auc_by_kind": {},
           "test_false_refusal": {}, "ood_test_refused": {}}
    pred = predict(s.classifier, test.images).argmax(1).numpy()
    correct = pred == test.labels
    for name, fn in scorers.items():
        sv, so_v = fn(val.images), fn(ood_val)
        st, so_t = fn(test.images), fn(ood_test)
        thr = fed_thr if name == "mahalanobis-fed" else refusal_threshold(sv, refusal_rate)
        row["val_auc"][name] = roc_auc(sv, so_v)
        row["test_auc"][name] = roc_auc(st, so_t)
        row["test_auc_by_kind"][name] = {OOD_KINDS[k]: roc_auc(st, so_t[kinds_test == k])
                                         for k in np.unique(kinds_test)}
        row["test_false_refusal"][name] = float((st > thr).mean())
        row["ood_test_refused"][name] = float((so_t > thr).mean())
        row.setdefault("risk_coverage", {})[name] = risk_coverage(st, correct)
        row.setdefault("accepted_accuracy", {})[name] = float(correct[st <= thr].mean()) if (st <= thr).any() else None
    row["test_accuracy"] = float(correct.mean())
    return row


def _choose(per_site: list[dict]) -> dict:
    """The candidates' means over sites, the chosen score, its test AUC per kind and its risk-coverage curve."""
    names = [n for n in CANDIDATES if all(n in r["val_auc"] for r in per_site)]
    mean = {n: {"val_auc": float(np.mean([r["val_auc"][n] for r in per_site])),
                "test_auc": float(np.mean([r["test_auc"][n] for r in per_site])),
                "test_false_refusal": float(np.mean([r["test_false_refusal"][n] for r in per_site])),
                "ood_test_refused": float(np.mean([r["ood_test_refused"][n] for r in per_site])),
                "min_test_auc": float(np.min([r["test_auc"][n] for r in per_site]))} for n in names}
    chosen = max(names, key=lambda n: (round(mean[n]["val_auc"], 3), n == "mahalanobis-fed"))
    by_kind = {k: float(np.mean([r["test_auc_by_kind"][chosen].get(k, np.nan) for r in per_site])) for k in OOD_KINDS}
    cov = {}
    for r in per_site:
        for c in r["risk_coverage"][chosen]:
            cov.setdefault(c["coverage"], []).append(c["accuracy"])
    return {"chosen": chosen, "chosen_by": "mean validation ROC AUC over sites (to 3 places; a tie goes to the federation's statistics, "
            "whose threshold rests on all sites' validation scans)", "mean": mean,
            "chosen_test_auc_by_kind": by_kind,
            "chosen_risk_coverage": [{"coverage": c, "mean_site_accuracy": float(np.mean(v))} for c, v in cov.items()]}


def run(run_dir: str, out: str, per_kind: int = 20, refusal_rate: float = 0.01, seed: int = 0, log=print) -> dict:
    from training.runs import load_sites

    torch.manual_seed(seed)
    profile, sites, info = load_sites(run_dir)
    fed, fed_thr = _federation_scorer(sites, profile.classifier.num_classes, refusal_rate)
    per_site = []
    for s in sites:
        if len(s.data["val"]) < 5 or len(s.data["test"]) < 5:
            log(f"  site {s.site}: too few scans, skipped")
            continue
        row = _site_row(s, profile, fed, fed_thr, per_kind, refusal_rate, seed)
        per_site.append(row)
        log(f"  site {s.site}: val AUC " + ", ".join(f"{k} {v:.3f}" for k, v in row["val_auc"].items()))
    result = {"run": str(run_dir), "source": info["source"], "refusal_rate": refusal_rate, "per_kind": per_kind,
              **_choose(per_site), "sites": per_site}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ood.json").write_text(json.dumps(result, indent=1))
    (out_dir / "ood.md").write_text(render(result))
    return result


def render(r: dict) -> str:
    lines = [f"# Out-of-distribution refusal: {r['run']}", "",
             f"Synthetic out-of-distribution inputs: {r['per_kind']} per kind and site, {len(OOD_KINDS)} kinds. "
             f"Threshold: refuses {pct(r['refusal_rate'])} % of each site's clean validation scans "
             "(mahalanobis-fed: of the pooled validation scores of all sites). "
             f"Chosen score: **{r['chosen']}** ({r['chosen_by']}).", "",
             *table(["score", "val ROC AUC", "test ROC AUC", "worst site test AUC", "clean test scans refused",
                     "synthetic test inputs refused"],
                    [(n, f"{m['val_auc']:.3f}", f"{m['test_auc']:.3f}", f"{m['min_test_auc']:.3f}",
                      pct(m["test_false_refusal"]), pct(m["ood_test_refused"])) for n, m in r["mean"].items()],
                    align="l" * 6)]
    lines += ["", f"Test ROC AUC of {r['chosen']} per kind (mean over sites):", ""]
    lines += table(["kind", "AUC"], [(k, f"{v:.3f}") for k, v in r["chosen_test_auc_by_kind"].items()], align="ll")
    lines += ["", f"Risk-coverage on clean test scans ({r['chosen']}; accept the lowest scores first; classifier "
              "alone, mean over sites):", ""]
    lines += table(["share accepted", "accuracy of the accepted"],
                   [(pct(c["coverage"]), pct(c["mean_site_accuracy"])) for c in r["chosen_risk_coverage"]], align="ll")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-kind", type=int, default=20)
    p.add_argument("--refusal-rate", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        r = run(args.run, args.out, args.per_kind, args.refusal_rate, args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
