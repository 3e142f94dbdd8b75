"""Personalization ablation of a federated mixture-of-experts run: each site's experts with its own gates,
with uniform gates, and with the federation's mean gates.

``python -m benchmarks.personalization --run runs/mfp --out benchmarks/results/federated-br35h/personalization``

The experts are the same at every site; only the gates differ. Three ways to weight them, per site:

- ``own``: the site's own gates (what the site runs);
- ``uniform``: every expert weighted 1/K (the gates' last layer set to zero);
- ``global``: the gates' parameters averaged over all sites (what a server could send everyone).

Each variant is scored with the classifier alone on clean scans (the gates do not touch the detection score
or the purifier): accuracy and balanced accuracy on the site's own test scans, balanced accuracy on the pooled
test set, and the same on validation scans (the figures a choice would rest on).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.federated_search import emit, pct
from runtime.markdown import table
from training.engine import predict
from training.metrics import balanced_accuracy

VARIANTS = ("own", "uniform", "global")


def uniform_gates(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose gates score every expert 0, so the softmax weights them equally."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for gate in m.gates:
            gate[-1].weight.zero_()
            gate[-1].bias.zero_()
    return m


def global_gates(model: torch.nn.Module, all_models: list[torch.nn.Module]) -> torch.nn.Module:
    """A copy of ``model`` with the gates' parameters averaged over ``all_models``."""
    m = copy.deepcopy(model)
    state = m.state_dict()
    for k in state:
        if k.startswith("gates."):
            state[k] = torch.stack([o.state_dict()[k].float() for o in all_models]).mean(0).to(state[k].dtype)
    m.load_state_dict(state)
    return m


def _scores(model, split) -> dict:
    if len(split) == 0:
        return {"acc": float("nan"), "balanced": float("nan")}
    pred = predict(model, split.images).argmax(1).numpy()
    return {"acc": float((pred == split.labels).mean()), "balanced": balanced_accuracy(split.labels, pred)}


def ablate(run: str | Path, source: str | None = None) -> dict:
    from training.runs import load_sites

    profile, sites, _ = load_sites(run, source)
    if not hasattr(sites[0].classifier, "gates") or len(sites[0].classifier.gates) < 2:
        raise ValueError(f"{run}: not a mixture of experts with personal gates (method {profile.federated.method})")
    models = [s.classifier for s in sites]
    rows = []
    for s in sites:
        variants = {"own": s.classifier, "uniform": uniform_gates(s.classifier), "global": global_gates(s.classifier, models)}
        row = {"site": s.site, "test_scans": len(s.data["test"])}
        for name, m in variants.items():
            own_test, own_val = _scores(m, s.data["test"]), _scores(m, s.data["val"])
            pooled = s.data.pooled or {}
            row[name] = {"test_acc": own_test["acc"], "test_balanced": own_test["balanced"],
                         "val_balanced": own_val["balanced"],
                         "pooled_test_balanced": _scores(m, pooled["test"])["balanced"] if "test" in pooled else float("nan"),
                         "pooled_val_balanced": _scores(m, pooled["val"])["balanced"] if "val" in pooled else float("nan")}
        rows.append(row)
    mean = {}
    for name in VARIANTS:
        w = np.array([r["test_scans"] for r in rows], float)
        mean[name] = {}
        for k in rows[0][name]:
            vals = np.array([r[name][k] for r in rows], float)
            ok = ~np.isnan(vals)
            weights = w[ok] if k.startswith("test") else np.ones(ok.sum())
            mean[name][k] = float(np.average(vals[ok], weights=weights)) if ok.any() and weights.sum() > 0 else float("nan")
    return {"run": str(run), "method": profile.federated.method, "sites": rows, "mean": mean}


def render(res: dict) -> str:
    lines = [f"# Personalization ablation: `{res['run']}` ({res['method']})", "",
             "Classifier alone on clean scans; per site, its own test scans (accuracy, balanced accuracy) and the "
             "pooled test set (balanced accuracy), for the site's own gates, uniform gates and the federation's mean "
             "gates. Means weighted by test scans (pooled figures: unweighted).", ""]
    rows = []
    for r in res["sites"] + [{"site": "mean", "test_scans": sum(x["test_scans"] for x in res["sites"]), **res["mean"]}]:
        cells = [f"{pct(r[v]['test_acc'])} / {pct(r[v]['test_balanced'])} / {pct(r[v]['pooled_test_balanced'])}"
                 for v in VARIANTS]
        rows.append([r["site"], r["test_scans"], *cells])
    lines += table(["site", "test scans", *(f"{v}: acc / bal. / pooled bal." for v in VARIANTS)], rows,
                   align="r" * (2 + len(VARIANTS)))
    lines += ["", "Validation (balanced accuracy, own / pooled): "
              + "; ".join(f"{v} {pct(res['mean'][v]['val_balanced'])} / {pct(res['mean'][v]['pooled_val_balanced'])}"
                          for v in VARIANTS)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.personalization", description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", help="data source (default: the one the run was trained on)")
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print)")
    args = ap.parse_args(argv)
    try:
        res = ablate(args.run, args.data)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    emit(args.out, render(res), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
