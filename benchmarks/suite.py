"""The benchmark suite (``make bench``): latency, the cost of safety and robustness against compute, in one run.

``python -m benchmarks.suite --run RUN --bundle BUNDLE --out benchmarks/results/bench-NAME``

The bundle's manifest names the site it was exported for
(``provenance.site``); the traffic and the PyTorch pipeline are that site's
of RUN, and a site RUN does not have is refused.

1. Traffic: ``benchmarks/data/<bundle>.npz``, the site's test scans (made if
   missing, ``benchmarks.traffic``; one made for another site is refused).
2. Latency suite, ``runtime bench`` on the ONNX Runtime engine: batch sizes
   1, 8, 32; clean and attacked traffic; the defense (``adaptive``), purify
   every scan (``always``) and the classifier alone (``classify``); where the
   bundle has the int8 denoiser (``export.quantize``), the defense with it
   at batch 1 too (``latency-int8/``).
3. The PyTorch eager pipeline (``training.defense.DefensePipeline``, the same
   models) on the same traffic at batch 1, timed the same way; then the
   runtime and the eager pipeline in alternating blocks over the same scans,
   which give the runtime-against-PyTorch ratios (drift in the machine's
   load over the minutes between two separate blocks then cancels out);
   the int8 runtime takes part in the same rounds.
4. Robustness against compute on the test scans of every site of the run
   (``training.evaluate.sweep_run``): the defense at a 5 %
   clean flag rate with 1, 2, 5, 10 DDIM steps and with every DDPM step
   from t*, under paper-setting PGD.

Every ratio is measured within this one run (these machines are noisy):
runtime against PyTorch, the defense against classify-only and
always-purify, k respaced steps against full DDPM. Writes ``summary.md`` and
``summary.json`` (and the latency reports under ``latency/``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.markdown import table

TARGETS = {"ort_speedup": 2.0, "clean_overhead": 1.25, "respaced_gap_points": 1.0, "respaced_cost_ratio": 10.0}


class Contenders:
    """The pipelines the suite times at batch 1 on one traffic file, loaded once.

    ``scan_fns(kind)`` gives, per pipeline, a function of a scan index that
    preprocesses the scan's original and runs the pipeline on its
    ``clean`` or ``attacked`` version: the runtime's defense (ONNX Runtime),
    the runtime's classifier alone, and the PyTorch eager defense (the same
    models, ``training.defense.DefensePipeline``) of the site the bundle was
    exported for (its manifest's ``provenance.site``).
    """

    def __init__(self, run: str, bundle: str, traffic_path: str, defense: dict | None = None, *,
                 trusted: list | None = None, allow_unsigned: bool = False):
        from benchmarks.traffic import check_site, load_site, manifest_site
        from runtime.bench import Traffic
        from runtime.bundle import Bundle
        from runtime.engines import OrtEngine
        from runtime.pipeline import Pipeline, PurifyConfig

        b = Bundle.load(bundle, trusted=trusted, allow_unsigned=allow_unsigned)
        self.site = check_site(run, manifest_site(b.manifest, bundle))
        self.traffic = Traffic(traffic_path)
        check_traffic_site(self.traffic, self.site)
        cfg = PurifyConfig.from_manifest(b.manifest)
        self.runtime = Pipeline(OrtEngine(b), cfg)
        # The int8 denoiser (export.quantize), where the bundle has one: timed beside fp32, never instead of it.
        self.runtime_int8 = Pipeline(OrtEngine(b, precision="int8"), cfg) if "int8" in b.precisions else None
        self.int8_parity = b.manifest.get("parity", {}).get("int8")
        profile, site, _ = load_site(run, self.site, defense)
        if site.pipe is None:
            raise ValueError(f"{run}: no detector and denoiser in this run; no PyTorch defense to compare with")
        self.eager = site.pipe
        self.cfg = profile.preprocess
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.traffic)

    def preprocess(self, i: int) -> None:
        from runtime.preprocess import preprocess

        preprocess(self.traffic.raw[i].astype(np.float32) / 255.0, self.cfg)

    def source(self, kind: str) -> np.ndarray:
        return self.traffic.attacked if kind == "attacked" else self.traffic.clean

    def run_eager(self, x: np.ndarray, generator: torch.Generator) -> dict:
        with torch.no_grad():
            return self.eager.run(torch.from_numpy(x[None, None]), generator)

    def scan_fns(self, kind: str) -> dict:
        src = self.source(kind)

        def runtime(i):
            self.preprocess(i)
            self.runtime.run(src[i][None, None], seed=i)

        def runtime_classify(i):
            self.preprocess(i)
            self.runtime.run(src[i][None, None], seed=i, mode="classify")

        def eager(i):
            self.preprocess(i)
            self.run_eager(src[i], self.generator)

        fns = {"runtime": runtime, "runtime_classify": runtime_classify, "eager": eager}
        if self.runtime_int8 is not None:
            def runtime_int8(i):
                self.preprocess(i)
                self.runtime_int8.run(src[i][None, None], seed=i)

            fns["runtime_int8"] = runtime_int8
        return fns


def check_traffic_site(traffic, site: int) -> None:
    """A traffic file made for another site than ``site`` (its ``meta.site``) is a one-line ValueError."""
    made_for = traffic.meta.get("site")
    if made_for is not None and made_for != site:
        raise ValueError(f"{traffic.path} holds test scans of site {made_for}, the bundle is site {site}'s "
                         f"(make it again with python -m benchmarks.traffic --bundle, or pass another --traffic)")


def torch_eager_latency(c: Contenders, *, attacked: bool, iters: int, warmup: int, seed: int = 0) -> dict:
    """Batch-1 end-to-end latency (ms) of the PyTorch eager pipeline on the traffic file."""
    from runtime.bench import percentiles

    src = c.source("attacked" if attacked else "clean")
    g = torch.Generator().manual_seed(seed)
    samples, flagged = [], 0
    for it in range(warmup + iters):
        i = it % len(c)
        t0 = time.perf_counter()
        c.preprocess(i)
        out = c.run_eager(src[i], g)
        dt = time.perf_counter() - t0
        if it >= warmup:
            samples.append(1000.0 * dt)
            flagged += int(out["flagged"].sum())
    return {"latency_ms": percentiles(samples), "flag_rate": flagged / max(len(samples), 1), "iterations": iters,
            "threads": torch.get_num_threads()}


def alternating_speedup(c: Contenders, *, blocks: int, per_block: int, warmup: int) -> dict:
    """Runtime (ORT) against the PyTorch eager defense, batch 1, in alternating blocks.

    Each block times ``per_block`` scans through one pipeline after
    ``warmup`` untimed ones (so a library's thread pool is warm when its
    block starts); blocks alternate runtime, eager, eager, runtime, ... over
    the same scans. Load on a shared machine that drifts over minutes then
    hits both pipelines alike, and the speed-up is the median over block
    pairs of (eager block median / runtime block median). Call-by-call
    interleaving is avoided on purpose (see :func:`paired_latency`).

    Where the bundle has the int8 denoiser, its runtime takes part in every
    round (runtime, int8, eager, then the reverse order) and gets its own
    speed-up under ``int8``; the fp32 figures stay the headline.
    """
    out = {}
    for kind in ("clean", "attacked"):
        fns = c.scan_fns(kind)
        names = ["runtime"] + (["runtime_int8"] if "runtime_int8" in fns else []) + ["eager"]
        med: dict[str, list[float]] = {n: [] for n in names}
        for blk in range(blocks):
            order = names if blk % 2 == 0 else names[::-1]
            start = (blk * per_block) % len(c)
            for name in order:
                for w in range(warmup):
                    fns[name]((start + w) % len(c))
                ms = []
                for j in range(per_block):
                    t0 = time.perf_counter()
                    fns[name]((start + j) % len(c))
                    ms.append(1000.0 * (time.perf_counter() - t0))
                med[name].append(float(np.median(ms)))
        ratios = [e / max(r, 1e-9) for e, r in zip(med["eager"], med["runtime"], strict=True)]
        out[kind] = {"block_median_ms": med, "speedup_per_block": ratios, "speedup": float(np.median(ratios)),
                     "blocks": blocks, "scans_per_block": per_block}
        if "runtime_int8" in med:
            r8 = [e / max(r, 1e-9) for e, r in zip(med["eager"], med["runtime_int8"], strict=True)]
            out[kind]["int8"] = {"speedup_per_block": r8, "speedup": float(np.median(r8))}
    return out


def traffic_accuracy(c: Contenders) -> dict | None:
    """Accuracy of the runtime's defense on the traffic's clean and attacked scans, fp32 and (if any) int8 denoiser.

    Batch 1, noise seed = scan index, the same for both, so the two differ
    only by the denoiser's precision; ``agreement`` is the fraction of equal
    predictions. None for a traffic file without labels.
    """
    labels = c.traffic.labels
    if labels is None:
        return None
    pipes = {"fp32": c.runtime} | ({"int8": c.runtime_int8} if c.runtime_int8 is not None else {})
    out: dict = {"scans": int(len(labels))}
    for kind in ("clean", "attacked"):
        src = c.source(kind)
        pred = {name: np.array([int(p.run(src[i][None, None], seed=i)["probs"][0].argmax()) for i in range(len(src))])
                for name, p in pipes.items()}
        out[kind] = {name: float((v == labels).mean()) for name, v in pred.items()}
        if "int8" in pred:
            out[kind]["agreement"] = float((pred["int8"] == pred["fp32"]).mean())
    return out


def paired_latency(c: Contenders, *, iters: int, warmup: int) -> dict:
    """Batch-1 latency of the runtime's defense and its classifier alone, timed on the same scan in turn.

    Noise on a shared machine then hits both alike; the overhead is the
    median of per-scan ratios. The PyTorch eager pipeline is not interleaved
    with them: ONNX Runtime's and PyTorch's thread pools, alternated call by
    call in one process, slow each other down (measured: the eager pipeline
    ran 3x slower interleaved than in its own block), so runtime against
    PyTorch is compared in alternating blocks (:func:`alternating_speedup`).
    """
    out = {}
    names = ["runtime", "runtime_classify"]
    for kind in ("clean", "attacked"):
        fns = c.scan_fns(kind)
        ms: dict[str, list[float]] = {n: [] for n in names}
        for it in range(warmup + iters):
            i = it % len(c)
            order = names[it % len(names):] + names[: it % len(names)]
            for n in order:
                t0 = time.perf_counter()
                fns[n](i)
                if it >= warmup:
                    ms[n].append(1000.0 * (time.perf_counter() - t0))
        a = {n: np.asarray(v) for n, v in ms.items()}
        out[kind] = {"median_ms": {n: float(np.median(v)) for n, v in a.items()}, "scans": iters,
                     "overhead_vs_classify": float(np.median(a["runtime"] / a["runtime_classify"]))}
    return out


def _traffic_file(run: str, bundle: str, traffic_path: str | None, site: int, n: int, log) -> Path:
    """The traffic file of the suite: ``traffic_path`` or ``benchmarks/data/<bundle>.npz``, made if missing."""
    from benchmarks.traffic import make_traffic
    from runtime.bench import Traffic

    traffic = Path(traffic_path) if traffic_path else Path("benchmarks/data") / f"{Path(bundle).name}.npz"
    if traffic.exists():
        check_traffic_site(Traffic(traffic), site)
    else:
        log(f"making traffic {traffic} from site {site} of {run} ...")
        make_traffic(run, str(traffic), site=site, n=n)
    return traffic


def _latency_suite(bundle: str, traffic: Path, out_p: Path, int8: bool, *, iters: int, warmup: int, log,
                   trust: dict) -> tuple[dict, dict | None]:
    """``runtime bench`` on ONNX Runtime (and, where ``int8``, the int8 denoiser at batch 1), reports written."""
    from runtime.bench import run_bench, write_reports

    log("latency suite (runtime, ONNX Runtime) ...")
    lat = run_bench(bundle, str(traffic), engine="ort", batch_sizes=(1, 8, 32), traffics=("clean", "attacked"),
                    modes=("adaptive", "always", "classify"), iters=iters, warmup=warmup, log=log, **trust)
    write_reports(lat, out_p / "latency")
    lat8 = None
    if int8:
        log("latency, the runtime with the int8 denoiser (batch 1) ...")
        lat8 = run_bench(bundle, str(traffic), engine="ort", precision="int8", batch_sizes=(1,),
                         traffics=("clean", "attacked"), modes=("adaptive",), iters=iters, warmup=warmup, log=log, **trust)
        write_reports(lat8, out_p / "latency-int8")
    return lat, lat8


def _p50(lat: dict, traffic_kind: str, mode: str, batch: int = 1) -> float:
    c = [c for c in lat["configs"] if c["traffic"] == traffic_kind and c["mode"] == mode and c["batch_size"] == batch]
    return c[0]["latency_ms"]["p50"]


def _ratios(lat: dict, eager: dict, paired: dict, alternating: dict) -> dict:
    """The ratios measured within the run, before the robustness sweep adds its own."""
    ratios = {
        "ort_speedup_clean": alternating["clean"]["speedup"],
        "ort_speedup_attacked": alternating["attacked"]["speedup"],
        "ort_speedup_clean_separate_blocks": eager["clean"]["latency_ms"]["p50"] / _p50(lat, "clean", "adaptive"),
        "ort_speedup_attacked_separate_blocks": eager["attacked"]["latency_ms"]["p50"] / _p50(lat, "attacked", "adaptive"),
        "clean_overhead_vs_classify": paired["clean"]["overhead_vs_classify"],
        "clean_overhead_vs_classify_unpaired": _p50(lat, "clean", "adaptive") / _p50(lat, "clean", "classify"),
        "always_vs_classify_clean": _p50(lat, "clean", "always") / _p50(lat, "clean", "classify"),
        "attacked_vs_classify": _p50(lat, "attacked", "adaptive") / _p50(lat, "clean", "classify"),
    }
    for k in ("clean", "attacked"):
        if "int8" in alternating[k]:
            ratios[f"ort_int8_speedup_{k}"] = alternating[k]["int8"]["speedup"]
    return ratios


def _compute_sweep(run: str, defense: dict, sweep_max: int, ratios: dict, log) -> dict:
    """Robustness against compute; adds the respaced-steps ratios to ``ratios``."""
    from training.evaluate import sweep_run

    log("robustness against compute (paper-setting PGD) ...")
    sweep = sweep_run(run, flag_rates=(defense["flag_rate"],), steps=(1, 2, 5, 10, 0), max_scans=sweep_max,
                      defense=defense, tag="suite", log=log)
    rows = {r["steps"]: r for r in sweep["rows"]}
    full = rows["full"]
    for k in (1, 2, 5, 10):
        r = rows[k]
        ratios[f"respaced_{k}_cost_ratio"] = full["evals_per_attacked_scan"] / max(r["evals_per_attacked_scan"], 1e-9)
        ratios[f"respaced_{k}_gap_points"] = 100.0 * (full["robust_acc"] - r["robust_acc"])
    return sweep


def _without_samples(configs: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "samples_ms"} for c in configs]


def run_suite(run: str, bundle: str, out: str, *, n: int = 64, iters: int = 20, warmup: int = 3, blocks: int = 10,
              sweep_max: int = 64, skip_sweep: bool = False, traffic_path: str | None = None,
              trusted: list | None = None, allow_unsigned: bool = False, command: str = "", log=print) -> dict:
    """Run the suite on site ``provenance.site`` of ``run`` (the bundle's manifest); write ``out/summary.*``.

    ``trusted`` and ``allow_unsigned`` go to ``runtime.bundle.Bundle.load``;
    ``command`` is recorded in the summary as the command that produced it.
    """
    from benchmarks.traffic import check_site, manifest_site
    from runtime.bundle import Bundle
    from training import config as cfgmod

    t_all = time.perf_counter()
    trust = {"trusted": trusted, "allow_unsigned": allow_unsigned}
    b = Bundle.load(bundle, **trust)
    site = check_site(run, manifest_site(b.manifest, bundle))
    defense = cfgmod.to_dict(cfgmod.from_dict(b.manifest["provenance"]["profile"]))["defense"]
    traffic = _traffic_file(run, bundle, traffic_path, site, n, log)
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    lat, lat8 = _latency_suite(bundle, traffic, out_p, "int8" in b.precisions, iters=iters, warmup=warmup, log=log,
                               trust=trust)
    contenders = Contenders(run, bundle, str(traffic), defense=defense, **trust)
    log(f"PyTorch eager pipeline of site {site}, batch 1 ...")
    eager = {k: torch_eager_latency(contenders, attacked=(k == "attacked"), iters=iters, warmup=warmup)
             for k in ("clean", "attacked")}
    log("paired timing, batch 1 (runtime defense and runtime classifier in turn) ...")
    paired = paired_latency(contenders, iters=max(iters, 3 * n // 2), warmup=warmup)
    log("runtime against PyTorch eager in alternating blocks, batch 1 ...")
    alternating = alternating_speedup(contenders, blocks=blocks, per_block=max(iters, 8), warmup=warmup)
    accuracy = traffic_accuracy(contenders)
    ratios = _ratios(lat, eager, paired, alternating)
    sweep = None if skip_sweep else _compute_sweep(run, defense, sweep_max, ratios, log)
    report = {"run": run, "bundle": bundle, "site": site, "traffic": str(traffic), "latency": {k: v for k, v in lat.items() if k != "configs"},
              "latency_configs": _without_samples(lat["configs"]),
              "torch_eager": eager, "paired": paired, "alternating": alternating, "ratios": ratios, "sweep": sweep, "targets": TARGETS,
              "int8_parity": contenders.int8_parity, "traffic_accuracy": accuracy,
              "latency_int8_configs": _without_samples(lat8["configs"]) if lat8 else None,
              "command": command, "seconds": time.perf_counter() - t_all}
    (out_p / "summary.json").write_text(json.dumps(report, indent=1, default=float))
    (out_p / "summary.md").write_text(render(report))
    return report


@dataclass(frozen=True)
class SuiteSummary:
    """What ``summary.md`` shows of one suite run, read from its ``summary.json`` dict (:meth:`of`).

    ``int8_p50`` (ms per traffic kind) is the int8 denoiser's defense at batch
    1, None where the bundle has no int8 denoiser; ``int8_parity`` and
    ``int8_accuracy`` are None where the report has no such paragraph.
    """

    run: str
    bundle: str
    site: int | None
    traffic: str
    command: str
    seconds: float
    environment: dict
    eager_threads: int
    eager_p50: dict[str, float]
    configs: list[dict]
    int8_p50: dict[str, float] | None
    paired: dict | None
    alternating: dict | None
    ratios: dict[str, float]
    sweep_rows: list[dict] | None
    int8_parity: dict | None
    int8_accuracy: dict | None

    @classmethod
    def of(cls, r: dict) -> SuiteSummary:
        c8 = r.get("latency_int8_configs")
        q = r.get("int8_parity")
        acc = r.get("traffic_accuracy")
        return cls(run=r["run"], bundle=r["bundle"], site=r.get("site"), traffic=r["traffic"],
                   command=r.get("command") or "", seconds=r["seconds"], environment=r["latency"]["environment"],
                   eager_threads=r["torch_eager"]["clean"]["threads"],
                   eager_p50={k: v["latency_ms"]["p50"] for k, v in r["torch_eager"].items()},
                   configs=r["latency_configs"],
                   int8_p50={c["traffic"]: c["latency_ms"]["p50"] for c in c8} if c8 else None,
                   paired=r.get("paired") or None, alternating=r.get("alternating") or None, ratios=r["ratios"],
                   sweep_rows=r["sweep"]["rows"] if r.get("sweep") else None,
                   int8_parity=q if q and q.get("passed") else None,
                   int8_accuracy=acc if acc and "agreement" in acc["attacked"] else None)

    def p50(self, traffic_kind: str, mode: str, batch: int = 1) -> float:
        c = [c for c in self.configs if c["traffic"] == traffic_kind and c["mode"] == mode and c["batch_size"] == batch]
        return c[0]["latency_ms"]["p50"] if c else float("nan")


def _md_header(s: SuiteSummary) -> list[str]:
    env = s.environment
    of_site = f"site {s.site} of " if s.site is not None else ""
    produced = f"`{s.command}` " if s.command else ""
    return [f"# Benchmark suite: {s.bundle}", "",
            f"Produced by: {produced}({s.seconds / 60:.1f} min) on {env['cpu']}, {env['cores']} cores; "
            f"ONNX Runtime {env.get('onnxruntime', '?')}, PyTorch {torch.__version__} ({s.eager_threads} threads). "
            f"Traffic: `{s.traffic}` (test scans of {of_site}`{s.run}` and their paper-setting PGD versions).", ""]


def _md_latency(s: SuiteSummary) -> list[str]:
    rows = [(name, f"{s.p50('clean', m):.2f} ms", f"{s.p50('attacked', m):.2f} ms")
            for m, name in (("adaptive", "runtime, the defense (detect, purify flagged, classify)"),
                            ("always", "runtime, purify every scan"), ("classify", "runtime, classifier only"))]
    if s.int8_p50 is not None:
        rows.append(("runtime with the int8 denoiser, the defense", f"{s.int8_p50['clean']:.2f} ms",
                     f"{s.int8_p50['attacked']:.2f} ms"))
    rows.append(("PyTorch eager, the defense", f"{s.eager_p50['clean']:.2f} ms", f"{s.eager_p50['attacked']:.2f} ms"))
    return ["## Latency, batch 1 (median of steady-state batches, end to end incl. preprocessing)", "",
            *table(["pipeline", "clean traffic", "attacked traffic"], rows)]


def _md_paired(s: SuiteSummary) -> list[str]:
    if s.paired is None:
        return []
    rows = []
    for k in ("clean", "attacked"):
        m = s.paired[k]["median_ms"]
        rows.append((k, f"{m['runtime']:.2f}", f"{m['runtime_classify']:.2f}", s.paired[k]["scans"]))
    return ["", "Paired timing (the same scan through both runtime pipelines in turn, order rotated; medians, ms):", "",
            *table(["traffic", "runtime defense", "runtime classifier only", "scans"], rows)]


def _joined(values, fmt: str) -> str:
    return " ".join(format(v, fmt) for v in values)


def _md_alternating(s: SuiteSummary) -> list[str]:
    alt = s.alternating
    if alt is None:
        return []
    int8 = "int8" in alt["clean"]
    rounds = "runtime, int8, eager, eager, int8, runtime" if int8 else "runtime, eager, eager, runtime"
    per_traffic = [(k, alt[k]) for k in ("clean", "attacked")]
    lines = ["", f"Runtime defense against the PyTorch eager defense in {alt['clean']['blocks']} alternating blocks "
             f"of {alt['clean']['scans_per_block']} scans ({rounds}, ...; block medians, ms):", "",
             *table(["traffic", "runtime, per block", "eager, per block", "speed-up per block", "median speed-up"],
                    [(k, _joined(a["block_median_ms"]["runtime"], ".1f"), _joined(a["block_median_ms"]["eager"], ".1f"),
                      _joined(a["speedup_per_block"], ".2f"), f"{a['speedup']:.2f}") for k, a in per_traffic],
                    align="llllr")]
    if int8:
        lines += ["", "The int8 denoiser's runtime in the same rounds:", "",
                  *table(["traffic", "runtime int8, per block", "speed-up over eager per block", "median speed-up"],
                         [(k, _joined(a["block_median_ms"]["runtime_int8"], ".1f"),
                           _joined(a["int8"]["speedup_per_block"], ".2f"), f"{a['int8']['speedup']:.2f}")
                          for k, a in per_traffic], align="lllr")]
    return lines


def _md_target_row(name: str, v: float, target: str, ok: bool) -> tuple[str, ...]:
    return name, f"{v:.2f}", target, "yes" if ok else "**no**"


def _md_ratios(s: SuiteSummary) -> list[str]:
    ratios = s.ratios
    sep = (f"; the separate blocks of the first table give {ratios['ort_speedup_clean_separate_blocks']:.2f} clean, "
           f"{ratios['ort_speedup_attacked_separate_blocks']:.2f} attacked") if "ort_speedup_clean_separate_blocks" in ratios else ""
    lines = ["", "## Ratios measured in this run, against the targets", "",
             "Runtime against PyTorch: median over the alternating block pairs" + sep + ". Blocks, not calls, "
             "alternate: the two libraries' thread pools slow each other down when interleaved call by call. Overhead of the defense: median of per-scan "
             "ratios from the paired timing (the block timings give "
             f"{ratios['clean_overhead_vs_classify_unpaired']:.2f}).", ""]
    speedups = [("runtime speed-up over PyTorch eager, clean", "ort_speedup_clean"),
                ("runtime speed-up over PyTorch eager, attacked", "ort_speedup_attacked")]
    if "ort_int8_speedup_attacked" in ratios:
        speedups += [("runtime with the int8 denoiser over PyTorch eager, clean", "ort_int8_speedup_clean"),
                     ("runtime with the int8 denoiser over PyTorch eager, attacked", "ort_int8_speedup_attacked")]
    rows = [_md_target_row(name, ratios[k], ">= 2", ratios[k] >= 2) for name, k in speedups]
    rows.append(_md_target_row("defense / classify-only cost, clean traffic", ratios["clean_overhead_vs_classify"],
                               "<= 1.25", ratios["clean_overhead_vs_classify"] <= 1.25))
    rows.append(_md_target_row("always-purify / classify-only cost, clean traffic", ratios["always_vs_classify_clean"],
                               "(reference)", True))
    if s.sweep_rows is not None:
        for k in (1, 2, 5, 10):
            gap, cost = ratios[f"respaced_{k}_gap_points"], ratios[f"respaced_{k}_cost_ratio"]
            rows.append((f"{k} DDIM step(s) against full DDPM from t*: robust accuracy gap (points) / cost ratio",
                         f"{gap:+.2f} / {cost:.1f}x", "<= 1 / >= 10x", "yes" if gap <= 1 and cost >= 10 else "**no**"))
    return lines + table(["comparison", "measured", "target", "met"], rows, align="lrrl")


def _md_sweep(s: SuiteSummary) -> list[str]:
    if s.sweep_rows is None:
        return []
    lines = ["", "## Robustness against compute (paper-setting PGD L-inf, test scans)", "",
             *table(["purification steps", "clean acc", "robust acc", "denoiser evals / attacked scan", "s / scan"],
                    [(row["steps"], f"{100 * row['clean_acc']:.2f} %", f"{100 * row['robust_acc']:.2f} %",
                      f"{row['evals_per_attacked_scan']:.2f}", f"{row['seconds_per_scan']:.3f}")
                     for row in s.sweep_rows], align="r" * 5)]
    lines.append(f"\n{s.sweep_rows[0]['n']} scans per cell.")
    return lines


def _md_int8(s: SuiteSummary) -> list[str]:
    lines = []
    q = s.int8_parity
    if q is not None:
        lines += ["", "## The int8 denoiser", "", f"The int8 denoiser against fp32 (export's check on {q['n_scans']} test scans purified at t* = "
                  f"{q['t_star']}, the same noise): purified images differ by {q['purified_mean_abs_int8_vs_fp32']:.4f} "
                  f"(mean absolute, images in [0, 1]) where another noise draw changes them by "
                  f"{q['purified_mean_abs_other_noise_vs_fp32']:.4f}; {q['prediction_flips_int8']} "
                  f"{'prediction flips' if q['prediction_flips_int8'] == 1 else 'predictions flip'} "
                  f"(another noise draw: {q['prediction_flips_other_noise']}); accuracy on purified scans "
                  f"{100 * q['accuracy_fp32']:.2f} % fp32, {100 * q['accuracy_int8']:.2f} % int8. Calibrated on "
                  f"{q['calibration']['n_scans']} validation scans."]
    acc = s.int8_accuracy
    if acc is not None:
        lines += ["", f"On this run's traffic ({acc['scans']} test scans, batch 1, the same noise seeds): accuracy of the "
                  f"runtime's defense on clean scans {100 * acc['clean']['fp32']:.2f} % fp32, "
                  f"{100 * acc['clean']['int8']:.2f} % int8 (same prediction on {100 * acc['clean']['agreement']:.1f} %); "
                  f"on their PGD versions {100 * acc['attacked']['fp32']:.2f} % fp32, {100 * acc['attacked']['int8']:.2f} % "
                  f"int8 (same prediction on {100 * acc['attacked']['agreement']:.1f} %)."]
    return lines


def _md_configs(s: SuiteSummary) -> list[str]:
    lines = ["", "## All latency configurations (runtime)", "",
             *table(["traffic", "mode", "batch", "p50 ms", "p95 ms", "p99 ms", "scans/s", "flagged"],
                    [(c["traffic"], c["mode"], c["batch_size"],
                      *(f"{c['latency_ms'][p]:.2f}" for p in ("p50", "p95", "p99")),
                      f"{c['throughput_scans_per_s']:.1f}", f"{100 * c['flag_rate']:.1f} %") for c in s.configs],
                    align="ll" + "r" * 6)]
    lines += ["", "Per-stage times, first-run cost, memory and plots: `latency/bench.md`, `latency/bench.html`"
              + (" (int8 denoiser: `latency-int8/`)." if s.int8_p50 is not None else ".")]
    return lines


def render(r: dict) -> str:
    """``summary.md`` of a suite run's summary dict."""
    s = SuiteSummary.of(r)
    sections = (_md_header, _md_latency, _md_paired, _md_alternating, _md_ratios, _md_sweep, _md_int8, _md_configs)
    return "\n".join(line for section in sections for line in section(s)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the trained run the bundle was exported from")
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64, help="scans in the traffic file")
    p.add_argument("--iters", type=int, default=20, help="steady-state batches per latency configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--blocks", type=int, default=10, help="alternating blocks per pipeline (runtime against PyTorch)")
    p.add_argument("--sweep-max", type=int, default=64, help="test scans in the robustness-vs-compute sweep")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--traffic", help="traffic file (default: benchmarks/data/<bundle name>.npz, made if missing)")
    p.add_argument("--trusted-key", action="append", metavar="PUB",
                   help="public key (PEM) whose signed bundles are accepted, besides "
                        "$MEDFEDPURE_HOME/trusted-keys/*.pub (repeatable)")
    p.add_argument("--allow-unsigned", action="store_true", help="run a bundle that is unsigned or signed by an untrusted key")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    try:
        r = run_suite(args.run, args.bundle, args.out, n=args.n, iters=args.iters, warmup=args.warmup, blocks=args.blocks,
                      sweep_max=args.sweep_max, skip_sweep=args.skip_sweep, traffic_path=args.traffic,
                      trusted=args.trusted_key, allow_unsigned=args.allow_unsigned,
                      command=shlex.join(["python", "-m", "benchmarks.suite", *argv]))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/summary.md")
    for k, v in r["ratios"].items():
        print(f"  {k:32s} {v:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
