"""``RUN/report.html``: one self-contained page for a trained run.

Convergence, the per-site table, robustness, a purification grid (phantom
runs only: a page with real scans in it must never be committed or sent
around), and, when the run has a runtime benchmark, the latency CDF and the
split of time by stage. Every figure is inline (SVG, or PNG as a data URI):
the page makes no request, so it opens from a USB stick or an e-mail.

``python -m training html --run RUN [--bench DIR] [--infer FILE]``
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from runtime.bench import latency_cdf, svg_lines, svg_stage_bars

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "th{background:#f0f0f0}td:first-child{text-align:left}.grid img{image-rendering:pixelated;width:96px;"
         "height:96px;margin:1px}.grid td{text-align:center;font-size:11px}.note{color:#555;font-size:0.9em}")


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.1f} %"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def png_data_uri(img: np.ndarray) -> str:
    """A [H, W] image in [0, 1] as an inline PNG."""
    ok, buf = cv2.imencode(".png", np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
    if not ok:
        raise ValueError("could not encode an image as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def convergence_section(run: Path) -> str:
    f = run / "convergence.json"
    if not f.exists():
        return "<p class='note'>No convergence record (a centralised run).</p>"
    series = []
    for c in json.loads(f.read_text()):
        for key, label in (("clean_acc", "clean"), ("pgd_acc", "PGD")):
            if c.get(key):
                series.append((f"{c['method']} {label}", [float(r) for r in c["rounds"]], [float(v) for v in c[key]]))
    return svg_lines(series, "round", "accuracy through the pipeline (sites' test scans)")


def sites_section(summary: dict) -> str:
    rows = [[str(s["site"]), str(s["num-examples"]), _pct(s.get("clean_acc")), _pct(s.get("clean_balanced_acc")),
             _pct(s.get("clean_sensitivity")), _pct(s.get("pooled_balanced_acc")), _pct(s.get("flag_rate_clean"))]
            for s in summary["per_site"]]
    rows.append(["mean", str(sum(s["num-examples"] for s in summary["per_site"])), _pct(summary.get("mean_clean_acc")),
                 _pct(summary.get("mean_balanced_acc")), _pct(summary.get("mean_sensitivity")),
                 _pct(summary.get("mean_pooled_balanced_acc")), "–"])
    return _table(["site", "test scans", "clean accuracy", "balanced accuracy", "sensitivity",
                   "pooled balanced accuracy", "clean scans flagged"], rows)


def robustness_section(summary: dict) -> str:
    atk = summary.get("eval_attack", {})
    rows = [[str(s["site"]), _pct(s.get("clean_acc")), _pct(s.get("pgd_acc")), _pct(s.get("clean_acc_classifier")),
             _pct(s.get("pgd_acc_classifier")), _pct(s.get("flag_rate_pgd"))] for s in summary["per_site"]]
    rows.append(["mean", _pct(summary.get("mean_clean_acc")), _pct(summary.get("mean_pgd_acc")), "", "", ""])
    what = (f"PGD {atk.get('norm', '')} eps {atk.get('eps', '')}, {atk.get('steps', '')} steps of {atk.get('step', '')}, "
            "crafted on each site's classifier (the paper's setting; an attacker who knows the defense does better: "
            "see <code>evaluate --threat suite</code>)") if atk else ""
    return (f"<p class='note'>{html.escape(what, quote=False).replace('&lt;code&gt;', '<code>').replace('&lt;/code&gt;', '</code>')}</p>"
            + _table(["site", "clean (pipeline)", "PGD (pipeline)", "clean (classifier alone)", "PGD (classifier alone)",
                      "attacked scans flagged"], rows))


@torch.no_grad()
def _predict(classifier, x: torch.Tensor) -> np.ndarray:
    return classifier(x).softmax(1).numpy()


def purification_grid(run: Path, site: int = 0, n: int = 6, seed: int = 0) -> str:
    """Phantom test scans of ``site``: clean, PGD-attacked, the perturbation, purified; with the classifier's answer."""
    from training.attacks.pgd import PAPER_LINF, pgd
    from training.runs import load_sites, read_source

    if not read_source(run).startswith("synth"):
        return ("<p class='note'>The purification grid is drawn for phantom runs only: this page never embeds "
                "real scans.</p>")
    _, sites, _ = load_sites(run)
    s = sites[min(site, len(sites) - 1)]
    if s.pipe is None:
        return "<p class='note'>This run has no purifier (no defense to show).</p>"
    test = s.data["test"]
    k = min(n, len(test))
    x = torch.as_tensor(test.images[:k])[:, None].float()
    y = torch.as_tensor(test.labels[:k]).long()
    g = torch.Generator().manual_seed(seed)
    adv = pgd(s.classifier, x, y, PAPER_LINF, g).detach()
    scores = s.pipe.score(adv)
    flagged, t_star = s.pipe.decide(scores)
    always = torch.where(flagged, t_star, torch.full_like(t_star, s.pipe.cfg.t_min))
    purified = s.pipe.purify_flagged(adv, torch.ones_like(flagged), always, g).detach()
    names = s.data.class_names
    probs = {key: _predict(s.classifier, v) for key, v in (("clean", x), ("attacked", adv), ("purified", purified))}
    diff = (adv - x).abs()
    diff = diff / max(float(diff.max()), 1e-8)
    cells = []
    for key, imgs in (("clean", x), ("attacked", adv), ("perturbation (scaled)", diff), ("purified", purified)):
        row = [f"<td><b>{html.escape(key)}</b></td>"]
        for i in range(k):
            cap = ""
            if key in probs:
                p = probs[key][i]
                cap = f"{html.escape(names[int(p.argmax())])} {p.max():.2f}"
            elif key.startswith("perturbation"):
                cap = f"score {float(scores[i]):.4f}" + (" flagged" if bool(flagged[i]) else "")
            row.append(f"<td><img alt='{html.escape(key)} {i}' src='{png_data_uri(imgs[i, 0].numpy())}'><br>{cap}</td>")
        cells.append("<tr>" + "".join(row) + "</tr>")
    truth = "".join(f"<td>truth: {html.escape(names[int(v)])}</td>" for v in y)
    return (f"<p class='note'>Site {s.site}'s first {k} phantom test scans. Captions: the classifier's answer on "
            f"that image (alone, no defense) and its probability; under the perturbation, the detection score "
            f"(tau {s.pipe.tau:.4f}). Purified: one reverse-diffusion pass from t* (at least t_min).</p>"
            f"<table class='grid'><tr><td></td>{truth}</tr>{''.join(cells)}</table>")


def bench_section(bench: dict) -> str:
    cdf = latency_cdf(bench)
    rows = [[html.escape(f"{c['traffic']} {c['mode']} b{c['batch_size']}"), f"{c['latency_ms']['p50']:.2f}",
             f"{c['latency_ms']['p95']:.2f}", f"{c['throughput_scans_per_s']:.1f}", _pct(c.get("flag_rate"))]
            for c in bench["configs"]]
    return (f"<p class='note'>Bundle {html.escape(str(bench['bundle']))}, engine {html.escape(bench['engine'])} "
            f"({html.escape(bench['device'])}, {html.escape(bench['precision'])}).</p>"
            + _table(["configuration", "p50 ms / batch", "p95 ms / batch", "scans / s", "flagged"], rows)
            + "<h3>Latency CDF (ms per scan)</h3>" + svg_lines(cdf, "ms per scan", "fraction of batches", logx=True)
            + "<h3>Where the time goes</h3>" + svg_stage_bars(bench["configs"]))


def infer_section(infer: dict) -> str:
    def fmt(k: str, v) -> str:
        if k in ("accuracy", "sensitivity"):
            return _pct(v)
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    rows = [[html.escape(k.replace("_", " ")), html.escape(fmt(k, v))] for k, v in infer.items()
            if not isinstance(v, (dict, list))]
    return ("<p class='note'>Accuracy counts a refused scan (no diagnosis) as not right.</p>"
            + _table(["held-out files", "value"], rows))


def render(run: Path, summary: dict | None, bench: dict | None, infer: dict | None, grid: str) -> str:
    title = f"MedFedPure run {run.name}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(f"<p>{html.escape(summary['method'])}, {summary['sites']} sites, profile "
                     f"{html.escape(summary['profile'])}, partition {html.escape(str(summary['partition']))}; "
                     f"mean clean accuracy through the pipeline <b>{_pct(summary['mean_clean_acc'])}</b>, "
                     f"under PGD <b>{_pct(summary['mean_pgd_acc'])}</b>.</p>")
    parts += ["<h2>Convergence</h2>", convergence_section(run)]
    if summary:
        parts += ["<h2>Sites</h2>", sites_section(summary), "<h2>Robustness</h2>", robustness_section(summary)]
    parts += ["<h2>Purification</h2>", grid]
    if infer:
        parts += ["<h2>Scanner side: runtime infer on held-out files</h2>", infer_section(infer)]
    if bench:
        parts += ["<h2>Scanner side: latency</h2>", bench_section(bench)]
    else:
        parts.append("<p class='note'>No runtime benchmark for this run (<code>runtime bench</code> writes one).</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html_report(run: str | Path, bench: str | Path | None = None, infer: str | Path | None = None,
                      out: str | Path | None = None, grid: bool = True) -> Path:
    """Write ``RUN/report.html`` (or ``out``); ``bench``: a ``runtime bench`` report folder or its bench.json;
    ``infer``: a JSON summary of a ``runtime infer`` on held-out files (the demo writes one)."""
    run = Path(run)
    if not (run / "config.toml").exists():
        raise FileNotFoundError(f"{run}: not a run folder (no config.toml)")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    bench_r = None
    if bench is not None:
        b = Path(bench)
        b = b / "bench.json" if b.is_dir() else b
        bench_r = json.loads(b.read_text())
    infer_r = json.loads(Path(infer).read_text()) if infer is not None else None
    grid_html = purification_grid(run) if grid else "<p class='note'>Not drawn.</p>"
    out = Path(out) if out else run / "report.html"
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(render(run, summary, bench_r, infer_r, grid_html))
    tmp.replace(out)
    return out
