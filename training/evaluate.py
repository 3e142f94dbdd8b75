"""Robustness evaluation of a trained run under PROTOCOL.md.

``python -m training evaluate --run RUN --threat paper|adaptive|transfer|all``
writes ``RUN/reports/robustness.md`` and ``.json`` (and ``roc.png``):

- per site and averaged: clean accuracy through the whole pipeline (a
  flagged clean scan is purified), accuracy under each threat model, flag
  rates on clean and attacked scans, detection ROC AUC (clean vs. attacked);
- beside accuracy (PROTOCOL.md rule 8): balanced accuracy and sensitivity
  (tumor recall), and each site's system on the pooled test set (every
  test scan of the run's data; a centralised run's one model on the whole
  test split is that already);
- the exact attack parameters, seeds, scan counts and the command.

A site is what a hospital deploys: in a federated run ``sites/site-<k>/
classifier.pt`` (shared experts + its gates) with its own test scans; in a
centralised run the one classifier and the whole test split. The detector
threshold tau comes from the site's clean validation scans at the profile's
flag rate, before any attack. Runs without a detector and denoiser (the
baselines) are evaluated as their classifier alone.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.markdown import table
from training import config as cfgmod
from training.attacks.adaptive import AdaptiveConfig, adaptive_pgd
from training.attacks.pgd import PAPER_L2, PAPER_LINF, pgd
from training.data.datasets import Split
from training.defense import DefensePipeline, run_batched
from training.metrics import balanced_accuracy, positive_class, roc_auc, roc_curve, sensitivity
from training.runs import Site, load_sites, read_source  # noqa: F401  (Site and load_sites: opened here too)

THREATS = ("paper", "adaptive", "transfer")


def _test(site: Site, max_scans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's test scans in a fixed random order (seed 0), the first ``max_scans`` of them (0: all).

    Splits list their scans by class; the random order makes every prefix
    (``--max-scans``, ``--adaptive-max``, ``--sweep-max``) a sample of both classes.
    """
    t: Split = site.data["test"]
    n = len(t) if max_scans <= 0 else min(len(t), max_scans)
    idx = np.random.default_rng(0).permutation(len(t))[:n]
    return torch.as_tensor(t.images[idx])[:, None].float(), torch.as_tensor(t.labels[idx]).long()


def _attack_batched(fn, target, x: torch.Tensor, y: torch.Tensor, cfg, g: torch.Generator, batch_size: int) -> torch.Tensor:
    """``fn(target, x, y, cfg, g)`` (an attack) over ``x`` in batches."""
    return torch.cat([fn(target, x[i : i + batch_size], y[i : i + batch_size], cfg, g) for i in range(0, len(x), batch_size)])


def _through(site: Site, x: torch.Tensor, y: torch.Tensor, seed: int, batch_size: int = 32) -> dict:
    """Accuracy, balanced accuracy, sensitivity (and flags, scores) of the site's deployed system on scans ``x``."""
    pos = positive_class(site.data.class_names)
    if site.pipe is None:
        with torch.no_grad():
            pred = torch.cat([site.classifier(x[i : i + 64]).argmax(1) for i in range(0, len(x), 64)]).numpy()
        return {"acc": float((pred == y.numpy()).mean()), "n": int(len(y)),
                "balanced_acc": balanced_accuracy(y.numpy(), pred), "sensitivity": sensitivity(y.numpy(), pred, pos)}
    out = run_batched(site.pipe, x, batch_size, seed)
    pred = out["probs"].argmax(1)
    return {"acc": float((pred == y.numpy()).mean()), "n": int(len(y)), "flag_rate": float(out["flagged"].mean()),
            "mean_t_star_flagged": float(out["t_star"][out["flagged"]].mean()) if out["flagged"].any() else 0.0,
            "balanced_acc": balanced_accuracy(y.numpy(), pred), "sensitivity": sensitivity(y.numpy(), pred, pos),
            "scores": out["scores"]}


def _pooled(site: Site, clean: dict, n_clean: int, seed: int, batch_size: int = 32) -> dict:
    """The site's system on the pooled test set: every test scan of the run's data (PROTOCOL.md rule 8).

    A federated site holds the shared data set's test split in ``data.pooled``;
    a centralised run's one site holds the whole test split already, so its
    clean figures are reused when they covered every scan.
    """
    t: Split = site.data.pooled["test"] if site.data.pooled is not None else site.data["test"]
    if site.data.pooled is None and n_clean == len(t):
        return dict(clean)
    x = torch.as_tensor(t.images)[:, None].float()
    return _through(site, x, torch.as_tensor(t.labels).long(), seed, batch_size)


def _without_scores(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "scores"}


def _clean_figures(site: Site, x: torch.Tensor, y: torch.Tensor, seed: int, batch_size: int) -> tuple[dict, dict]:
    """(the site's row with its clean figures, the clean result with its detection scores)."""
    row: dict = {"site": site.site, "n_test": int(len(y))}
    with torch.no_grad():
        pred = torch.cat([site.classifier(x[i : i + 64]).argmax(1) for i in range(0, len(x), 64)])
    row["clean_acc_classifier_only"] = float((pred == y).float().mean())
    clean = _through(site, x, y, seed)
    row["clean"] = _without_scores(clean)
    row["pooled"] = _without_scores(_pooled(site, row["clean"], len(y), seed + 4, batch_size))
    if site.pipe is not None:
        row["tau"] = site.pipe.tau
    return row, clean


def _paper_threats(row: dict, site: Site, x: torch.Tensor, y: torch.Tensor, clean: dict, g: torch.Generator,
                   seed: int, batch_size: int) -> None:
    """PGD L-inf and L2 in the paper's setting, crafted on the site's classifier, added to ``row``."""
    for name, cfg in (("pgd_linf", PAPER_LINF), ("pgd_l2", PAPER_L2)):
        adv = _attack_batched(pgd, site.classifier, x, y, cfg, g, batch_size)
        res = _through(site, adv, y, seed + 1)
        if "scores" in res:
            res["detection_auc"] = roc_auc(clean["scores"], res["scores"])
            if name == "pgd_linf":
                row["_roc"] = roc_curve(clean["scores"], res["scores"])
        row[name] = _without_scores(res)


def _adaptive_threat(site: Site, x: torch.Tensor, y: torch.Tensor, adaptive: AdaptiveConfig, adaptive_max: int,
                     g: torch.Generator, seed: int, batch_size: int) -> dict:
    """Adaptive PGD on the whole pipeline over the first ``adaptive_max`` scans (0: all)."""
    n_a = min(len(y), adaptive_max) if adaptive_max > 0 else len(y)
    adv = _attack_batched(adaptive_pgd, site.pipe, x[:n_a], y[:n_a], adaptive, g, batch_size)
    res = _through(site, adv, y[:n_a], seed + 2)
    clean_a = _through(site, x[:n_a], y[:n_a], seed)
    res["detection_auc"] = roc_auc(clean_a["scores"], res["scores"])
    res["clean_acc_same_scans"] = clean_a["acc"]
    return _without_scores(res)


def _transfer_threat(site: Site, sites: list[Site], x: torch.Tensor, y: torch.Tensor, g: torch.Generator, seed: int,
                     batch_size: int) -> dict:
    """Paper-setting PGD L-inf crafted on the next site's classifier."""
    src = sites[(sites.index(site) + 1) % len(sites)]
    adv = _attack_batched(pgd, src.classifier, x, y, PAPER_LINF, g, batch_size)
    res = _through(site, adv, y, seed + 3)
    res["source_site"] = src.site
    return _without_scores(res)


def _evaluate_site(site: Site, sites: list[Site], x: torch.Tensor, y: torch.Tensor, threats: tuple[str, ...], *,
                   adaptive: AdaptiveConfig, adaptive_max: int, seed: int, batch_size: int) -> dict:
    """One site's row: clean figures, then each threat in ``threats`` on its test scans ``x``, ``y``."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 1000 * site.site)
    row, clean = _clean_figures(site, x, y, seed, batch_size)
    if "paper" in threats:
        _paper_threats(row, site, x, y, clean, g, seed, batch_size)
    if "adaptive" in threats and site.pipe is not None:
        row["adaptive"] = _adaptive_threat(site, x, y, adaptive, adaptive_max, g, seed, batch_size)
    if "transfer" in threats and len(sites) > 1:
        row["transfer_linf"] = _transfer_threat(site, sites, x, y, g, seed, batch_size)
    row["seconds"] = time.perf_counter() - t0
    return row


def _write_report(out: Path, report: dict, rows: list[dict], tag: str) -> None:
    """``robustness[-tag].json`` / ``.md`` and, where there are detection scores, ``roc[-tag].png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rocs = [(r["site"], r["_roc"]) for r in rows if "_roc" in r]
    suffix = f"-{tag}" if tag else ""
    if rocs:
        _roc_plot(rocs, out / f"roc{suffix}.png")
    report["files"] = [f"robustness{suffix}.md", f"robustness{suffix}.json"] + ([f"roc{suffix}.png"] if rocs else [])
    (out / f"robustness{suffix}.json").write_text(json.dumps(report, indent=1))
    (out / f"robustness{suffix}.md").write_text(render_markdown(report, roc=f"roc{suffix}.png" if rocs else ""))


def evaluate_run(run: str | Path, threats: tuple[str, ...] = ("paper",), *, command: str = "", max_scans: int = 0,
                 adaptive_max: int = 64,
                 adaptive: AdaptiveConfig | None = None, seed: int = 0, batch_size: int = 32, log=print,
                 source: str | None = None, defense: dict | None = None, tag: str = "") -> dict:
    """Evaluate every site of ``run`` under ``threats``; returns the report dict (also written to RUN/reports).

    ``defense``: overrides of the run's defense settings; ``tag``: the report
    is written as ``robustness-<tag>.md/json`` (and ``roc-<tag>.png``).
    """
    for t in threats:
        if t not in THREATS:
            raise cfgmod.UsageError(f"unknown threat {t!r}; choose from {THREATS} or 'all'")
    adaptive = adaptive or AdaptiveConfig()
    profile, sites, info = load_sites(run, source, defense)
    t_all = time.perf_counter()
    rows = []
    for site in sites:
        x, y = _test(site, max_scans)
        if len(y) == 0:
            log(f"site {site.site}: no test scans, skipped")
            continue
        row = _evaluate_site(site, sites, x, y, threats, adaptive=adaptive, adaptive_max=adaptive_max, seed=seed,
                             batch_size=batch_size)
        log(f"site {site.site}: " + ", ".join(f"{k} {v['acc']:.4f}" for k, v in row.items() if isinstance(v, dict) and "acc" in v)
            + f" ({row['seconds']:.0f} s)")
        rows.append(row)
    report = {
        **info,
        "profile": profile.name,
        "threats": list(threats),
        "defense": cfgmod.to_dict(profile)["defense"],
        "defense_overrides": dict(defense or {}),
        "attacks": {"pgd_linf": asdict(PAPER_LINF), "pgd_l2": asdict(PAPER_L2),
                    "adaptive": adaptive.to_dict() | {"max_scans_per_site": adaptive_max},
                    "transfer_linf": {"attack": "PGD-linf paper setting crafted on site (k+1) mod N's classifier"}},
        "seed": seed,
        "max_scans_per_site": max_scans,
        "sites": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "mean": _means(rows),
        "command": command,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - t_all,
    }
    _write_report(Path(run) / "reports", report, rows, tag)
    return report


def _nan_average(values: list[float], weights: np.ndarray) -> float:
    """Weighted mean over the values that are not NaN (a site without positives has no sensitivity)."""
    v = np.asarray(values, dtype=float)
    ok = ~np.isnan(v) & (weights > 0)
    return float(np.average(v[ok], weights=weights[ok])) if ok.any() else float("nan")


def _means(rows: list[dict]) -> dict:
    """Scan-weighted means over sites of every accuracy and flag rate (NaN figures left out).

    ``pooled``: every site is measured on the same scans, so its weights are
    equal and its ``n`` is the pooled set's size (``sites`` says how many).
    """
    out: dict = {}
    order = ["clean", "pooled", "pgd_linf", "pgd_l2", "adaptive", "transfer_linf"]
    keys = {k for r in rows for k, v in r.items() if isinstance(v, dict)}
    for k in sorted(keys, key=lambda k: order.index(k) if k in order else len(order)):
        part = [r[k] for r in rows if k in r]
        w = np.array([p["n"] for p in part], dtype=float)
        out[k] = {m: _nan_average([p[m] for p in part], w) for m in part[0]
                  if isinstance(part[0][m], float) and all(m in p for p in part)}
        out[k]["n"] = int(w.max()) if k == "pooled" else int(w.sum())
        if k == "pooled":
            out[k]["sites"] = len(part)
    return out


def _roc_plot(rocs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for site, (fpr, tpr) in rocs:
        ax.plot(fpr, tpr, lw=1, label=f"site {site}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (clean test scans)")
    ax.set_ylabel("true positive rate (PGD L-inf 0.015)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def render_markdown(r: dict, roc: str = "") -> str:
    names = {"clean": "clean (through the pipeline)", "pgd_linf": "PGD L-inf eps 0.015 (paper setting)",
             "pgd_l2": "PGD L2 eps 0.1 (paper setting)", "adaptive": "adaptive PGD on the pipeline",
             "transfer_linf": "transfer PGD L-inf from another site",
             "pooled": "clean, pooled test set (every site's test scans)"}
    lines = [f"# Robustness: {r['run']}", "", f"{r['kind']}, profile `{r['profile']}`, data `{r['source']}`; "
             f"defense {'on' if r['defended'] else 'off (classifier only)'}.", "",
             f"Produced by: `{r['command'] or 'python -m training evaluate --run ' + r['run']}` "
             f"({r['seconds']:.0f} s, torch {r['machine']['torch']}, {r['machine']['threads']} threads)", "",
             "## Mean over sites (weighted by test scans)", ""]
    lines += table(["threat", "scans", "accuracy", "flag rate", "detection ROC AUC"],
                   [[names.get(k, k), v["n"], _pct(v.get("acc")), _pct(v.get("flag_rate")),
                     f"{v['detection_auc']:.3f}" if "detection_auc" in v else ""] for k, v in r["mean"].items()])
    lines += ["", "## Per site", ""]
    threats = [k for k in names if any(k in s for s in r["sites"])]
    per_site = []
    for s in r["sites"]:
        cells = [(_pct(s[k]["acc"]) + (f" (flagged {_pct(s[k]['flag_rate'])})" if "flag_rate" in s[k] else "")) if k in s else ""
                 for k in threats]
        per_site.append([s["site"], s["n_test"], _pct(s["clean_acc_classifier_only"]), *cells])
    lines += table(["site", "test scans", "classifier only, clean", *(names[k] for k in threats)], per_site,
                   align="r" * (3 + len(threats)))
    lines += _clinical_lines(r)
    lines += ["", "## Attack parameters", "", "```json", json.dumps(r["attacks"], indent=1), "```", "",
              "Defense: " + json.dumps(r["defense"]) + f"; seed {r['seed']}."]
    if roc:
        lines += ["", f"![ROC]({roc})"]
    return "\n".join(lines) + "\n"


def _clinical_lines(r: dict) -> list[str]:
    """Clean scans through each site's system: accuracy, balanced accuracy, sensitivity, and on the pooled set."""
    if not any("balanced_acc" in s.get("clean", {}) for s in r["sites"]):
        return []  # a report written before these figures existed

    def cells(d: dict) -> list[str]:
        c, p = d.get("clean", {}), d.get("pooled", {})
        return [_pct(c.get("acc")), _pct(_num(c.get("balanced_acc"))), _pct(_num(c.get("sensitivity"))),
                _pct(_num(p.get("acc"))), _pct(_num(p.get("balanced_acc"))), _pct(_num(p.get("sensitivity")))]

    m = r["mean"]
    rows = [[s["site"], s["n_test"], *cells(s)] for s in r["sites"]]
    rows.append(["mean", m.get("clean", {}).get("n", 0), *cells(m)])
    return ["", "## Clinical figures (PROTOCOL.md rule 8)", "",
            "Clean scans through each site's whole system. Sensitivity: recall of the tumor class. Pooled: the "
            "site's system on every test scan of the run's data.", "",
            *table(["site", "test scans", "accuracy", "balanced accuracy", "sensitivity", "pooled accuracy",
                    "pooled balanced accuracy", "pooled sensitivity"], rows, align="r" * 8)]


def _num(v):
    """None for a missing or NaN figure (printed n/a)."""
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


# --------------------------------------------------------------------------- robustness against compute

SWEEP_FLAG_RATES = (0.01, 0.05, 0.1, 0.2)
SWEEP_STEPS = (1, 2, 5, 10, 20, 0)  # 0: every ancestral DDPM step from t*


def _sweep_site(site: Site, profile: cfgmod.Profile, x: torch.Tensor, y: torch.Tensor, cells: dict, *, flag_rates,
                steps, seed: int, batch_size: int) -> None:
    """Add one site's clean and attacked scans through every (flag rate, steps) pipeline to ``cells``."""
    from dataclasses import replace

    from training.defense import calibrate_tau, detection_scores

    g = torch.Generator().manual_seed(seed + 1000 * site.site)
    adv = _attack_batched(pgd, site.classifier, x, y, PAPER_LINF, g, batch_size)
    val_scores = detection_scores(site.pipe.detector, site.data["val"].images, profile.defense,
                                  profile.detector.mask_ratio, profile.detector.mask_seed)
    base = site.pipe
    for fr in flag_rates:
        for k in steps:
            pipe = DefensePipeline(base.classifier, base.detector, base.denoiser, base.diffusion,
                                   calibrate_tau(val_scores, fr), replace(profile.defense, flag_rate=fr, steps=k),
                                   profile.detector.mask_ratio, profile.detector.mask_seed).eval()
            cell = cells.setdefault((fr, k), {"n": 0, "clean_hits": 0, "adv_hits": 0, "clean_evals": 0.0,
                                              "adv_evals": 0.0, "seconds": 0.0})
            for name, xs, s in (("clean", x, seed), ("adv", adv, seed + 1)):
                t0 = time.perf_counter()
                out = run_batched(pipe, xs, batch_size, s)
                cell["seconds"] += time.perf_counter() - t0
                cell[f"{name}_hits"] += int((out["probs"].argmax(1) == y.numpy()).sum())
                evals = np.where(out["flagged"], k if k else out["t_star"], 0)
                cell[f"{name}_evals"] += float(evals.sum())
            cell["n"] += len(y)


def _sweep_rows(cells: dict) -> list[dict]:
    """One row per (flag rate, steps): accuracies, denoiser evaluations and seconds per scan."""
    rows = []
    for (fr, k), c in cells.items():
        n = max(c["n"], 1)
        rows.append({"flag_rate": fr, "steps": k or "full", "n": c["n"], "clean_acc": c["clean_hits"] / n,
                     "robust_acc": c["adv_hits"] / n, "evals_per_clean_scan": c["clean_evals"] / n,
                     "evals_per_attacked_scan": c["adv_evals"] / n, "seconds_per_scan": c["seconds"] / (2 * n)})
    return rows


def _write_sweep(out: Path, report: dict, tag: str) -> None:
    """``sweep[-tag].json``, ``.md`` and ``.png`` in ``out``."""
    rows = report["rows"]
    suffix = f"-{tag}" if tag else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sweep{suffix}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Robustness against compute: {report['run']}", "",
             f"Paper-setting PGD L-inf (eps 0.015, step 0.003, 7 steps) crafted on each site's classifier; "
             f"{rows[0]['n'] if rows else 0} test scans in all; tau from clean validation scans at each flag rate.", "",
             *table(["clean flag rate", "purification steps", "clean acc", "robust acc", "denoiser evals / clean scan",
                     "denoiser evals / attacked scan", "s / scan"],
                    [(f"{r['flag_rate']:.2f}", r["steps"], _pct(r["clean_acc"]), _pct(r["robust_acc"]),
                      f"{r['evals_per_clean_scan']:.2f}", f"{r['evals_per_attacked_scan']:.2f}",
                      f"{r['seconds_per_scan']:.3f}") for r in rows], align="r" * 7)]
    lines += ["", f"Defense otherwise: {json.dumps(report['defense'])}.", "",
              f"![robust accuracy against compute](sweep{suffix}.png)"]
    (out / f"sweep{suffix}.md").write_text("\n".join(lines) + "\n")
    _sweep_plot(rows, out / f"sweep{suffix}.png")


def sweep_run(run: str | Path, *, flag_rates=SWEEP_FLAG_RATES, steps=SWEEP_STEPS, max_scans: int = 64, seed: int = 0,
              batch_size: int = 32, log=print, source: str | None = None, defense: dict | None = None,
              tag: str = "") -> dict:
    """Robust accuracy (paper-setting L-inf PGD) and clean accuracy against denoiser evaluations per scan.

    For every clean flag rate (which fixes tau on validation scans) and number
    of purification steps, the same clean and adversarial test scans go
    through the pipeline. Cost = mean over scans of the denoiser evaluations
    spent on them (0 when not flagged; ``steps``, or t* for full DDPM).
    Writes ``RUN/reports/sweep.md``, ``.json`` and ``sweep.png``.
    """
    profile, sites, info = load_sites(run, source, defense)
    if sites[0].pipe is None:
        raise cfgmod.UsageError(f"{run}: no detector and denoiser in this run; nothing to sweep")
    t_all = time.perf_counter()
    cells: dict[tuple[float, int], dict] = {}
    for site in sites:
        x, y = _test(site, max_scans)
        if len(y) == 0:
            continue
        _sweep_site(site, profile, x, y, cells, flag_rates=flag_rates, steps=steps, seed=seed, batch_size=batch_size)
        log(f"site {site.site}: swept {len(flag_rates)} flag rates x {len(steps)} step counts on {len(y)} scans")
    rows = _sweep_rows(cells)
    report = {**info, "profile": profile.name, "attack": asdict(PAPER_LINF), "max_scans_per_site": max_scans,
              "seed": seed, "defense": cfgmod.to_dict(profile)["defense"], "defense_overrides": dict(defense or {}),
              "rows": rows, "seconds": time.perf_counter() - t_all}
    _write_sweep(Path(run) / "reports", report, tag)
    return report


def _sweep_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fr in sorted({r["flag_rate"] for r in rows}):
        part = [r for r in rows if r["flag_rate"] == fr]
        ax.plot([r["evals_per_attacked_scan"] for r in part], [r["robust_acc"] for r in part], marker="o",
                label=f"clean flag rate {fr:.2f}")
        for r in part:
            ax.annotate(str(r["steps"]), (r["evals_per_attacked_scan"], r["robust_acc"]), fontsize=6)
    ax.set_xscale("symlog")
    ax.set_xlabel("denoiser evaluations per attacked scan")
    ax.set_ylabel("robust accuracy (PGD L-inf 0.015)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the paper's tables from several runs

TABLE_ORDER = ("fedavg", "local", "fedem", "fat", "pfeddef", "medfedpure")


def _threat_rows(rows: list[tuple], threat: str, flag_rate: bool) -> list[list]:
    """One table row per evaluated run that has ``threat``: method, run, sites, scans, clean and adversarial accuracy."""
    out = []
    for method, run, r in rows:
        m = r["mean"]
        if threat in m:
            tail = [_pct(m[threat].get("flag_rate"))] if flag_rate else []
            out.append([method, f"`{run}`", len(r["sites"]), m["clean"]["n"], _pct(m["clean"]["acc"]),
                        _pct(m[threat]["acc"]), *tail])
    return out


def paper_tables(runs: list[str | Path], out: str | Path) -> Path:
    """Table I (L2 PGD, eps 0.1) and Table II (L-inf PGD, eps 0.015) from the runs' ``reports/robustness.json``.

    One row per run, labelled by its method; means over sites weighted by test scans. Also the clinician's
    table (PROTOCOL.md rule 8), in ``tables.md`` and as ``tables.json``: per method the mean and worst
    site's clean accuracy, pooled balanced accuracy, mean sensitivity, PGD accuracies and training minutes
    (from the run's ``summary.json`` ``phase_seconds``; null when it has none).
    """
    rows = []
    for run in runs:
        f = Path(run) / "reports" / "robustness.json"
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: run `python -m training evaluate --run {run} --threat paper` first")
        r = json.loads(f.read_text())
        method = r["kind"].split("(", 1)[1].split(",", 1)[0] if r["kind"].startswith("federated") else "centralised"
        rows.append((method, str(run), r))
    rows.sort(key=lambda t: TABLE_ORDER.index(t[0]) if t[0] in TABLE_ORDER else len(TABLE_ORDER))
    lines = ["# Robustness tables (layout of the paper's Tables I and II)", "",
             "Means over sites weighted by test scans; clean accuracy through each system's whole pipeline; "
             "attacks crafted on each site's classifier (paper setting, PROTOCOL.md) and passed through the pipeline.", "",
             "## Table I: PGD L2, eps 0.1, step 0.01, 10 steps", ""]
    head = ["method", "run", "sites", "test scans", "clean acc", "adversarial acc"]
    lines += table(head, _threat_rows(rows, "pgd_l2", flag_rate=False), align="llrrrr")
    lines += ["", "## Table II: PGD L-inf, eps 0.015, step 0.003, 7 steps", ""]
    lines += table([*head, "flag rate (attacked)"], _threat_rows(rows, "pgd_linf", flag_rate=True), align="llrrrrr")
    clinical: dict[str, dict] = {}
    for method, run, r in rows:
        key = method if method not in clinical else f"{method} ({run})"
        clinical[key] = {"run": run, **clinician_row(run, r)}
    lines += ["", "## Clinician: figures a label-skewed site cannot flatter (PROTOCOL.md rule 8)", "",
              "Clean scans through each system; worst site: the lowest per-site clean accuracy; pooled balanced: "
              "each site's system on every test scan of the run's data, balanced accuracy, mean over sites; "
              "sensitivity: tumor recall.", ""]
    lines += table(["method", "run", "mean clean acc", "worst site clean acc", "pooled balanced acc",
                    "mean sensitivity", "PGD L-inf acc", "PGD L2 acc", "training minutes"],
                   [(key, f"`{c['run']}`", _pct(c["mean_clean"]), _pct(c["min_site_clean"]), _pct(c["pooled_balanced"]),
                     _pct(c["mean_sensitivity"]), _pct(c["pgd_linf"]), _pct(c["pgd_l2"]),
                     "n/a" if c["train_minutes"] is None else f"{c['train_minutes']:.1f}")
                    for key, c in clinical.items()], align="ll" + "r" * 7)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "tables.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "tables.json").write_text(json.dumps(clinical, indent=1))
    return md


def clinician_row(run: str | Path, r: dict) -> dict:
    """The clinician's figures of one run from its robustness report ``r`` (None where a figure is missing)."""
    m = r.get("mean", {})

    def get(part: str, key: str = "acc"):
        return _num(m.get(part, {}).get(key))

    site_clean = [s["clean"]["acc"] for s in r.get("sites", []) if _num(s.get("clean", {}).get("acc")) is not None]
    summary = Path(run) / "summary.json"
    phase_seconds = json.loads(summary.read_text()).get("phase_seconds") if summary.exists() else None
    minutes = sum(float(v) for v in phase_seconds.values()) / 60.0 if isinstance(phase_seconds, dict) and phase_seconds else None
    return {"mean_clean": get("clean"), "min_site_clean": min(site_clean) if site_clean else None,
            "pooled_balanced": get("pooled", "balanced_acc"), "mean_sensitivity": get("clean", "sensitivity"),
            "pgd_linf": get("pgd_linf"), "pgd_l2": get("pgd_l2"), "train_minutes": minutes}


# --------------------------------------------------------------------------- the attack suite


def balanced_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices of ``labels`` with the classes interleaved (each in a random order): every even prefix is balanced
    as far as the smaller class allows."""
    rng = np.random.default_rng(seed)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out = []
    for i in range(max(len(p) for p in per)):
        out += [int(p[i]) for p in per if i < len(p)]
    return np.asarray(out, np.int64)


def _suite_scans(sites: list[Site], max_scans: int, split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, site index) of the suite's scans: a class-balanced sample of the pooled ``split``, dealt to
    the sites in turn (a federated site's system must be right on any site's scan; a centralised run has one)."""
    first = sites[0].data
    t: Split = first.pooled[split] if first.pooled is not None else first[split]
    order = balanced_order(np.asarray(t.labels))
    if max_scans > 0:
        order = order[:max_scans]
    return t.images[order], np.asarray(t.labels)[order], np.arange(len(order)) % len(sites)


@dataclass
class _SuiteScans:
    """The suite's scans and how to attack them: each site's system answers for the scans dealt to it."""

    sites: list
    cfg: object
    images: np.ndarray
    labels: np.ndarray
    owner: np.ndarray
    seed: int
    batch_size: int

    def craft_all(self, name: str, k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        from training.attacks.suite import craft

        site = self.sites[k]
        other = self.sites[(k + 1) % len(self.sites)].classifier if len(self.sites) > 1 else None
        parts, b = [], self.batch_size
        for i in range(0, len(x), b):
            a = craft(name, self.cfg, site.pipe, site.classifier, x[i : i + b], y[i : i + b],
                      self.seed + 1000 * site.site + i, other)
            if a is None:
                return None
            parts.append(a)
        adv = torch.cat(parts)
        _check_budget(name, self.cfg, adv, x)
        return adv

    def run(self, name: str | None, n: int) -> tuple[dict, np.ndarray, np.ndarray] | None:
        """Attack ``name`` (None: clean) on the first ``n`` scans: (summary, correct [n, draws], flagged [n]),
        or None when the attack does not apply to this run."""
        from training.attacks.suite import outcomes, summarise

        draws = 1 if self.sites[0].pipe is None else self.cfg.draws
        correct, flagged = np.zeros((n, draws), bool), np.zeros(n, bool)
        t0, used = time.perf_counter(), False
        for k, site in enumerate(self.sites):
            idx = np.flatnonzero(self.owner[:n] == k)
            if len(idx) == 0:
                continue
            x = torch.as_tensor(self.images[idx])[:, None].float()
            y = torch.as_tensor(self.labels[idx]).long()
            adv = x if name is None else self.craft_all(name, k, x, y)
            if adv is None:
                return None
            o = outcomes(site.pipe, site.classifier, adv, y, self.cfg.draws, self.seed + 7 + 1000 * site.site,
                         self.batch_size)
            correct[idx], flagged[idx] = o["correct"], o["flagged"]
            used = True
        if not used:
            return None
        return summarise(correct, flagged) | {"seconds": time.perf_counter() - t0}, correct, flagged


def suite_run(run: str | Path, cfg=None, *, max_scans: int = 256, cheap_max: int = 0, seed: int = 0,
              batch_size: int = 32, log=print, source: str | None = None, defense: dict | None = None,
              tag: str = "", command: str = "", split: str = "test") -> dict:
    """Every attack of the suite against every site's system; writes ``RUN/reports/suite[-tag].json`` and ``.md``.

    ``split="val"`` runs it on validation scans, to choose a defense (PROTOCOL.md rule 10); report on "test".

    ``max_scans``: class-balanced pooled test scans for the costly attacks;
    ``cheap_max``: for the classifier-side PGD attacks (0: every test scan).
    The costly attacks' scans are the first ``max_scans`` of the cheap ones,
    and the suite's worst case is taken over those.
    """
    from training.attacks.suite import CHEAP, SuiteConfig, resolved, summarise, worst_case

    profile, sites, info = load_sites(run, source, defense)
    cfg = resolved(cfg or SuiteConfig(), sites[0].pipe)
    if split not in ("val", "test"):
        raise cfgmod.UsageError(f"the suite runs on 'val' or 'test' scans, not {split!r}")
    images, labels, owner = _suite_scans(sites, cheap_max, split)
    scans = _SuiteScans(sites, cfg, images, labels, owner, seed, batch_size)
    n_costly = min(len(labels), max_scans) if max_scans > 0 else len(labels)
    t_all = time.perf_counter()

    clean_res, clean_correct, _ = scans.run(None, len(labels))
    log(f"clean: {clean_res['robust_acc']:.4f} on {clean_res['scans']} scans ({clean_res['seconds']:.0f} s)")
    rows, per_attack = [], {}
    for name in cfg.attacks:
        n = len(labels) if name in CHEAP else n_costly
        got = scans.run(name, n)
        if got is None:
            log(f"{name}: does not apply to this run, skipped")
            continue
        res, correct, _ = got
        rows.append({"name": name, "params": cfg.params(name), **res})
        per_attack[name] = correct[:n_costly]
        log(f"{name}: {res['robust_acc']:.4f} (worst of {res['draws']} {res['worst_of_n']:.4f}, flagged "
            f"{res['flag_rate']:.2%}) on {res['scans']} scans ({res['seconds']:.0f} s)")
    clean_sub = clean_correct[:n_costly]
    wc = worst_case(per_attack)
    report = {
        **info, "profile": profile.name, "split": split, "sites": len(sites), "scans": n_costly, "cheap_scans": int(len(labels)),
        "defense": cfgmod.to_dict(profile)["defense"], "defense_overrides": dict(defense or {}),
        "suite": asdict(cfg), "seed": seed,
        "clean": clean_res | {"same_scans_as_worst_case": summarise(clean_sub, np.zeros(len(clean_sub), bool))},
        "attacks": rows, "worst_case": wc, "worst_of_n": wc.get("worst_of_n"), "majority_of_n": wc.get("majority_of_n"),
        "command": command,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - t_all,
    }
    out = Path(run) / "reports"
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    (out / f"suite{suffix}.json").write_text(json.dumps(report, indent=1))
    (out / f"suite{suffix}.md").write_text(render_suite(report))
    return report


def _check_budget(name: str, cfg, adv: torch.Tensor, x: torch.Tensor) -> None:
    """Every attack stays inside its budget and [0, 1]; a breach is a bug, never a result."""
    d = (adv - x).flatten(1)
    l2 = name.endswith("-l2")
    size = d.norm(dim=1).max() if l2 else d.abs().max()
    eps = cfg.eps_l2 if l2 else cfg.eps_linf
    if float(size) > eps * (1 + 1e-4) + 1e-6 or float(adv.min()) < 0 or float(adv.max()) > 1:
        raise RuntimeError(f"attack {name} left its budget: {'L2' if l2 else 'L-inf'} {float(size):.6f} > {eps}")


def render_suite(r: dict) -> str:
    """Markdown of a suite report."""
    c = r["clean"]
    lines = [f"# Attack suite: {r['run']}", "", f"{r['kind']}, profile `{r['profile']}`, {r['sites']} site(s); "
             f"defense mode `{r['defense'].get('mode', 'adaptive')}`, {r['defense'].get('draws', 1)} draw(s) averaged, "
             f"{r['defense']['steps']} purification step(s), t* {r['defense']['t_min']}..{r['defense']['t_max']}.", "",
             f"Produced by: `{r['command']}` ({r['seconds'] / 60:.1f} min, torch {r['machine']['torch']}, "
             f"{r['machine']['threads']} threads). Scans: class-balanced from the pooled {r.get('split', 'test')} "
             f"split; {r['scans']} for "
             f"the costly attacks, {r['cheap_scans']} for the classifier-side PGD. Each attacked scan goes through "
             f"the real system {r['suite']['draws']} times with fresh purification noise.", ""]
    rows = [[a["name"], a["scans"], _pct(a["robust_acc"]), _pct(a["worst_of_n"]), _pct(a["majority_of_n"]),
             _pct(a["flag_rate"]), f"{a['seconds']:.0f}"] for a in [{"name": "clean", **c}, *r["attacks"]]]
    w = r["worst_case"]
    if w:
        rows.append(["**worst case over the suite**", w["scans"], f"**{_pct(w['robust_acc'])}**",
                     f"**{_pct(w['worst_of_n'])}**", _pct(w["majority_of_n"]), "", ""])
    lines += table(["attack", "scans", "accuracy (one draw)", "worst of N", "majority of N", "flagged", "seconds"], rows)
    if w:
        lines += ["", f"Strongest single attack: `{w['strongest']}`. Clean on the same {w['scans']} scans: "
                  f"{_pct(c['same_scans_as_worst_case']['robust_acc'])}."]
    lines += ["", "## Attack parameters", "", "```json", json.dumps({a["name"]: a["params"] for a in r["attacks"]}, indent=1),
              "```"]
    return "\n".join(lines) + "\n"
