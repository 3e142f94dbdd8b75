"""``runtime bench``: latency, throughput and the cost of safety of one bundle on one engine (no torch).

Traffic comes from a traffic file (``.npz``, written by ``python -m
benchmarks.traffic``): ``clean [N, S, S]`` and ``attacked [N, S, S]``
float32 scans in [0, 1] (the attacked ones made by the project's PGD, paper
setting, so the detector and the purifier do real work) and the original
images of the same scans (``raw_flat`` uint8 with ``raw_shapes [N, 2]``),
which the preprocessing stage is timed on. An attacked scan is timed with the
preprocessing of its clean original (an attack changes pixels, not sizes).

For every configuration (traffic x batch size x pipeline mode) the bench
runs ``warmup`` batches, reported apart as the first-run cost, then
batches for ``iters`` iterations or ``seconds`` seconds: the steady state.
Latency is per batch, end to end (preprocess + detect + purify + classify);
throughput is scans per second of steady-state wall time.
"""

from __future__ import annotations

import html
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime.markdown import table
from runtime.preprocess import PreprocessConfig, preprocess

PERCENTILES = (50, 90, 95, 99)
STAGES = ("preprocess", "ood", "detect", "purify", "classify")


def percentiles(values, ps=PERCENTILES) -> dict[str, float]:
    """``{"p50": ..., ...}`` of ``values`` (linear interpolation, numpy's default)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {f"p{p}": float("nan") for p in ps}
    return {f"p{p}": float(np.percentile(v, p)) for p in ps}


class Traffic:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such traffic file (make one with python -m benchmarks.traffic)")
        try:
            z = np.load(path, allow_pickle=False)
            self.clean = z["clean"].astype(np.float32)
            self.attacked = z["attacked"].astype(np.float32) if "attacked" in z else None
            self.labels = z["labels"].astype(np.int64) if "labels" in z else None  # older traffic files have none
            flat, shapes = z["raw_flat"], z["raw_shapes"]
            self.meta = json.loads(str(z["meta"])) if "meta" in z else {}
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f"{path}: not a traffic file ({err})") from None
        offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])])
        self.raw = [flat[offsets[i] : offsets[i + 1]].reshape(shapes[i]) for i in range(len(shapes))]
        if len(self.raw) != len(self.clean):
            raise ValueError(f"{path}: {len(self.raw)} originals for {len(self.clean)} scans")
        self.path = str(path)

    def __len__(self) -> int:
        return len(self.clean)


def parse_traffic(kind: str) -> float:
    """Fraction of attacked scans: ``clean`` 0, ``attacked`` 1, ``mix:F`` F."""
    if kind == "clean":
        return 0.0
    if kind == "attacked":
        return 1.0
    if kind.startswith("mix:"):
        try:
            f = float(kind[4:])
        except ValueError:
            f = -1.0
        if 0.0 <= f <= 1.0:
            return f
    raise ValueError(f"traffic must be clean, attacked or mix:F with F in [0, 1]; got {kind!r}")


def rss_mb() -> float:
    """Resident memory now (MB), from /proc where there is one."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e3 if sys.platform != "darwin" else r / 1e6


def fingerprint(engine, precision: str) -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
           "numpy": np.__version__, "engine": engine.describe(), "precision": precision}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            env["gpu"] = out.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _gpu_memory_mb(engine) -> float | None:
    torch = getattr(engine, "torch", None)
    if torch is not None and getattr(engine, "device", None) is not None and str(engine.device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e6
    return None


def bench_config(pipe, traffic: Traffic, cfg: PreprocessConfig, *, batch: int, attacked_fraction: float,
                 mode: str = "adaptive", iters: int = 30, seconds: float = 0.0, warmup: int = 3, seed: int = 0,
                 clock=time.perf_counter) -> dict:
    """Time one configuration; warm-up batches are reported apart and excluded from the steady state."""
    if attacked_fraction > 0 and traffic.attacked is None:
        raise ValueError(f"{traffic.path} holds no attacked scans")
    base, _, d = mode.partition(":")  # "always:3": every scan purified three times, probabilities averaged
    draws = int(d) if d else 1

    def seeds(it: int, n: int) -> np.ndarray:
        return (seed + it) * 100_000 + np.arange(n * draws, dtype=np.int64).reshape(n, draws)

    rng = np.random.default_rng(seed)
    n = len(traffic)
    order = rng.permutation(n)
    is_attacked = rng.random(n) < attacked_fraction
    pos = 0

    def next_batch():
        nonlocal pos
        idx = np.array([order[(pos + i) % n] for i in range(batch)])
        pos += batch
        return idx

    def one(it: int) -> dict:
        idx = next_batch()
        t0 = clock()
        for i in idx:  # the preprocessing of the scan's original image
            preprocess(traffic.raw[i].astype(np.float32) / 255.0, cfg)
        t_pre = clock() - t0
        x = np.where(is_attacked[idx][:, None, None], traffic.attacked[idx] if traffic.attacked is not None else 0.0,
                     traffic.clean[idx])[:, None].astype(np.float32)
        t1 = clock()
        res = pipe.run(x, seed=seeds(it, len(idx)), mode=base)
        total = t_pre + (clock() - t1)
        return {"total": total, "preprocess": t_pre, **res["timings"], "flagged": int(res["flagged"].sum()),
                "attacked": int(is_attacked[idx].sum())}

    warm = [one(i) for i in range(warmup)]
    steady, t_start, it = [], clock(), warmup
    while True:
        steady.append(one(it))
        it += 1
        elapsed = clock() - t_start
        if (seconds > 0 and elapsed >= seconds) or (seconds <= 0 and len(steady) >= iters):
            break
    return _summary(steady, warm, clock() - t_start, batch=batch, attacked_fraction=attacked_fraction, mode=mode)


def _summary(steady: list[dict], warm: list[dict], wall: float, *, batch: int, attacked_fraction: float,
             mode: str) -> dict:
    """One configuration's figures from its timed batches (the steady state) and its warm-up batches."""
    ms = {k: [1000.0 * r[k] for r in steady] for k in ("total", *STAGES)}
    scans = batch * len(steady)
    return {
        "batch_size": batch, "attacked_fraction": attacked_fraction, "mode": mode, "iterations": len(steady),
        "warmup_iterations": len(warm), "scans": scans,
        "latency_ms": percentiles(ms["total"]) | {"mean": float(np.mean(ms["total"]))},
        "latency_ms_per_scan": {k: v / batch for k, v in percentiles(ms["total"]).items()},
        "stage_ms": {k: percentiles(ms[k]) | {"mean": float(np.mean(ms[k]))} for k in STAGES},
        "throughput_scans_per_s": scans / wall, "throughput_scans_per_hour": 3600.0 * scans / wall,
        "flag_rate": sum(r["flagged"] for r in steady) / scans,
        "attacked_rate": sum(r["attacked"] for r in steady) / scans,
        "first_run_ms": [1000.0 * r["total"] for r in warm],
        "samples_ms": ms["total"],
    }


def run_bench(bundle_dir: str, traffic_path: str, *, engine: str = "ort", device: str = "cpu",
              precision: str = "fp32", threads: int = 0, batch_sizes=(1, 8, 32), traffics=("clean",),
              modes=("adaptive",), iters: int = 30, seconds: float = 0.0, warmup: int = 3, seed: int = 0,
              gpu_hour_price: float | None = None, log=print, trusted: list | None = None,
              allow_unsigned: bool = False, command: str = "") -> dict:
    from runtime.bundle import Bundle
    from runtime.engines import make_engine
    from runtime.pipeline import Pipeline, PurifyConfig

    fractions = {t: parse_traffic(t) for t in traffics}
    for m in modes:
        base, _, draws = m.partition(":")
        if base not in Pipeline.MODES or (draws and not (draws.isdigit() and 1 <= int(draws) <= 16)):
            raise ValueError(f"unknown mode {m!r}; choose from {Pipeline.MODES}, optionally MODE:DRAWS (1..16)")
    if any(b < 1 for b in batch_sizes) or (iters < 1 and seconds <= 0) or warmup < 0:
        raise ValueError("batch sizes and --iters must be >= 1 (or --seconds > 0), --warmup >= 0")
    traffic = Traffic(traffic_path)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    bundle = Bundle.load(bundle_dir, trusted=trusted, allow_unsigned=allow_unsigned)
    eng = make_engine(bundle, engine, device, precision, threads, log=log)
    pipe = Pipeline(eng, PurifyConfig.from_manifest(bundle.manifest), bundle.ood_threshold)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    cfg = bundle.preprocess_config
    if traffic.clean.shape[-1] != cfg.size:
        raise ValueError(f"traffic scans are {traffic.clean.shape[-1]} px, the bundle expects {cfg.size} px")
    configs = []
    for t_name, frac in fractions.items():
        for m in modes:
            for b in batch_sizes:
                r = bench_config(pipe, traffic, cfg, batch=b, attacked_fraction=frac, mode=m, iters=iters,
                                 seconds=seconds, warmup=warmup, seed=seed)
                r["traffic"] = t_name
                if gpu_hour_price is not None:
                    r["cost_per_10k_scans"] = gpu_hour_price * 10000.0 / r["throughput_scans_per_hour"]
                configs.append(r)
                log(f"  {t_name:10s} {m:9s} batch {b:3d}: p50 {r['latency_ms']['p50']:8.2f} ms, "
                    f"p95 {r['latency_ms']['p95']:8.2f} ms, {r['throughput_scans_per_s']:8.1f} scans/s, "
                    f"flagged {100 * r['flag_rate']:5.1f} %")
    return {
        "bundle": str(bundle_dir), "traffic_file": traffic.path, "traffic_meta": traffic.meta,
        "engine": engine, "device": device, "precision": precision, "threads": threads,
        "load_seconds": load_s, "memory": {"rss_before_load_mb": rss0, "rss_after_load_mb": rss_loaded,
                                            "peak_rss_mb": peak_rss_mb(), "gpu_peak_mb": _gpu_memory_mb(eng)},
        "gpu_hour_price": gpu_hour_price, "environment": fingerprint(eng, precision),
        "command": command,
        "configs": configs,
    }


# ----------------------------------------------------------------------------- reports


def render_markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"# Benchmark: {r['bundle']} on {r['engine']} ({r['device']}, {r['precision']})", "",
             f"Machine: {env['cpu']}, {env['cores']} cores" + (f"; GPU {env['gpu']}" if env.get("gpu") else "") + ".",
             f"Load {r['load_seconds']:.2f} s; RSS {r['memory']['rss_after_load_mb']:.0f} MB after load, peak "
             f"{r['memory']['peak_rss_mb']:.0f} MB. Traffic: {r['traffic_file']}.", ""]
    if r.get("command"):
        lines += [f"Produced by: `{r['command']}`", ""]
    cost = r.get("gpu_hour_price") is not None
    head = ["traffic", "mode", "batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "scans/s", "scans/hour", "flagged",
            *STAGES, "first run ms"] + (["cost / 10k scans"] if cost else [])
    rows = []
    for c in r["configs"]:
        lat, st = c["latency_ms"], c["stage_ms"]
        rows.append([c["traffic"], c["mode"], c["batch_size"], *(f"{lat[p]:.2f}" for p in ("p50", "p90", "p95", "p99")),
                     f"{c['throughput_scans_per_s']:.1f}", f"{c['throughput_scans_per_hour']:.0f}",
                     f"{100 * c['flag_rate']:.1f} %", *(f"{st[s]['p50']:.2f}" for s in STAGES),
                     f"{max(c['first_run_ms'] or [0]):.1f}"] + ([f"{c['cost_per_10k_scans']:.4f}"] if cost else []))
    lines += table(head, rows, align="ll" + "r" * (len(head) - 2))
    lines += ["", "Latency is per batch, end to end; stage columns are median ms per batch; first run is the slowest "
              "warm-up batch, excluded from the steady state."]
    return "\n".join(lines) + "\n"


def svg_lines(series: list[tuple[str, list[float], list[float]]], xlabel: str, ylabel: str, w=520, h=300,
               logx=False) -> str:
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    if not xs:
        return "<p>no data</p>"
    fx = (lambda v: np.log10(max(v, 1e-9))) if logx else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs))
    y0, y1 = 0.0, max(ys) or 1.0
    x1, y1 = (x1 if x1 > x0 else x0 + 1), y1 * 1.05
    L, B = 60, 40

    def px(v):
        return L + (fx(v) - x0) / (x1 - x0) * (w - L - 10)

    def py(v):
        return h - B - (v - y0) / (y1 - y0) * (h - B - 10)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 18 * len(series)}" font-size="11">',
           f'<line x1="{L}" y1="{h - B}" x2="{w - 10}" y2="{h - B}" stroke="#000"/>',
           f'<line x1="{L}" y1="10" x2="{L}" y2="{h - B}" stroke="#000"/>',
           f'<text x="{(w + L) / 2}" y="{h - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{html.escape(ylabel)}</text>',
           f'<text x="{L}" y="{h - B + 14}">{min(xs):.3g}</text>',
           f'<text x="{w - 10}" y="{h - B + 14}" text-anchor="end">{max(xs):.3g}</text>',
           f'<text x="{L - 4}" y="{py(y1 / 1.05) + 4}" text-anchor="end">{y1 / 1.05:.3g}</text>']
    for i, (name, sx, sy) in enumerate(series):
        c = colors[i % len(colors)]
        pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(sx, sy))
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        if len(sx) < 12:
            out += [f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.5" fill="{c}"/>' for a, b in zip(sx, sy)]
        out.append(f'<text x="{L}" y="{h + 14 + 18 * i}" fill="{c}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def svg_stage_bars(configs: list[dict], w=620) -> str:
    colors = {"preprocess": "#8c564b", "ood": "#9467bd", "detect": "#1f77b4", "purify": "#d62728", "classify": "#2ca02c"}
    rows = [(f"{c['traffic']} {c['mode']} b{c['batch_size']}", [c["stage_ms"][s]["mean"] / c["batch_size"] for s in STAGES])
            for c in configs]
    top = max((sum(v) for _, v in rows), default=1.0) or 1.0
    L, bar = 190, 16
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{30 + (bar + 6) * len(rows)}" font-size="11">']
    for i, (name, vals) in enumerate(rows):
        y, x = 10 + i * (bar + 6), L
        out.append(f'<text x="{L - 6}" y="{y + 12}" text-anchor="end">{html.escape(name)}</text>')
        for s, v in zip(STAGES, vals):
            wd = v / top * (w - L - 80)
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{wd:.1f}" height="{bar}" fill="{colors[s]}"><title>{s} {v:.2f} ms</title></rect>')
            x += wd
        out.append(f'<text x="{x + 4:.1f}" y="{y + 12}">{sum(vals):.2f} ms</text>')
    legend = " ".join(f'<tspan fill="{colors[s]}">■ {s}</tspan>' for s in STAGES)
    out.append(f'<text x="{L}" y="{24 + (bar + 6) * len(rows)}">{legend} (mean ms per scan)</text></svg>')
    return "\n".join(out)


def latency_cdf(r: dict) -> list[tuple[str, list[float], list[float]]]:
    """Per configuration of report ``r``: (name, ms per scan sorted, cumulative fraction of batches)."""
    cdf = []
    for c in r["configs"]:
        v = np.sort(np.asarray(c["samples_ms"]))
        cdf.append((f"{c['traffic']} {c['mode']} b{c['batch_size']}", list(v / c["batch_size"]),
                    list(np.arange(1, len(v) + 1) / len(v))))
    return cdf


def render_html(r: dict) -> str:
    cdf = latency_cdf(r)
    thr = {}
    for c in r["configs"]:
        thr.setdefault(f"{c['traffic']} {c['mode']}", []).append((c["batch_size"], c["throughput_scans_per_s"]))
    thr_series = [(k, [b for b, _ in sorted(v)], [t for _, t in sorted(v)]) for k, v in thr.items()]
    md = html.escape(render_markdown(r))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>MedFedPure benchmark</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{background:#f6f6f6;padding:1em;"
        "overflow-x:auto}</style></head><body>"
        f"<h1>Benchmark: {html.escape(r['bundle'])} on {html.escape(r['engine'])}</h1>"
        "<h2>Latency CDF (ms per scan, steady state)</h2>" + svg_lines(cdf, "ms per scan", "fraction of batches", logx=True)
        + "<h2>Throughput against batch size</h2>" + svg_lines(thr_series, "batch size", "scans / s")
        + "<h2>Where the time goes</h2>" + svg_stage_bars(r["configs"])
        + f"<h2>Table</h2><pre>{md}</pre><h2>Environment</h2><pre>{html.escape(json.dumps(r['environment'], indent=1))}</pre>"
        "</body></html>\n")


def write_reports(r: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(r, indent=1))
    (out / "bench.md").write_text(render_markdown(r))
    (out / "bench.html").write_text(render_html(r))
    return out
