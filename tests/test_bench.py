"""runtime bench: percentiles, warm-up kept apart, a complete report on the tiny bundle in seconds."""

import json

import numpy as np
import pytest

from runtime.bench import STAGES, bench_config, parse_traffic, percentiles


def test_percentiles_on_known_inputs():
    v = np.arange(1, 101)  # 1..100
    p = percentiles(v)
    assert p["p50"] == pytest.approx(50.5) and p["p90"] == pytest.approx(90.1)
    assert p["p95"] == pytest.approx(95.05) and p["p99"] == pytest.approx(99.01)
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0}


def test_traffic_kinds():
    assert parse_traffic("clean") == 0.0 and parse_traffic("attacked") == 1.0 and parse_traffic("mix:0.25") == 0.25
    for bad in ("mix:2", "mix:x", "dirty"):
        with pytest.raises(ValueError, match="traffic must be"):
            parse_traffic(bad)


class _FakeTraffic:
    def __init__(self, n=8, size=16):
        rng = np.random.default_rng(0)
        self.clean = rng.random((n, size, size)).astype(np.float32)
        self.attacked = self.clean.copy()
        self.raw = [(c * 255).astype(np.uint8) for c in self.clean]
        self.path = "fake"

    def __len__(self):
        return len(self.clean)


class _SlowFirstPipe:
    """Its first call costs 1 s of (fake) clock; every later one 10 ms."""

    def __init__(self, clock):
        self.calls, self.clock = 0, clock

    def run(self, x, seed=0, mode="adaptive"):
        self.clock.t += 1.0 if self.calls == 0 else 0.01
        self.calls += 1
        n = len(x)
        return {"flagged": np.zeros(n, bool), "timings": {"ood": 0.0, "detect": 0.0, "purify": 0.0, "classify": 0.0}}


class _Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_warmup_is_excluded_from_the_steady_state():
    from runtime.preprocess import PreprocessConfig

    clock = _Clock()
    r = bench_config(_SlowFirstPipe(clock), _FakeTraffic(), PreprocessConfig(size=16), batch=2, attacked_fraction=0.0,
                     iters=5, warmup=1, clock=clock)
    assert r["iterations"] == 5 and len(r["first_run_ms"]) == 1
    assert r["first_run_ms"][0] == pytest.approx(1000.0)
    assert r["latency_ms"]["p99"] == pytest.approx(10.0) and r["scans"] == 10
    assert r["throughput_scans_per_s"] == pytest.approx(10 / 0.05)
    r0 = bench_config(_SlowFirstPipe(clock), _FakeTraffic(), PreprocessConfig(size=16), batch=2, attacked_fraction=0.0,
                      iters=5, warmup=0, clock=clock)
    assert r0["latency_ms"]["p99"] > 500.0  # without warm-up the slow first batch is in the steady state


class _RecordingPipe:
    def __init__(self):
        self.calls = []

    def run(self, x, seed=0, mode="adaptive"):
        self.calls.append((np.asarray(seed), mode))
        n = len(x)
        return {"flagged": np.ones(n, bool), "timings": {"ood": 0.0, "detect": 0.0, "purify": 0.0, "classify": 0.0}}


def test_a_mode_with_draws_gives_each_scan_that_many_distinct_seeds():
    from runtime.bench import run_bench
    from runtime.preprocess import PreprocessConfig

    pipe = _RecordingPipe()
    r = bench_config(pipe, _FakeTraffic(), PreprocessConfig(size=16), batch=4, attacked_fraction=0.0,
                     mode="always:3", iters=2, warmup=1)
    seeds, mode = pipe.calls[-1]
    assert mode == "always" and seeds.shape == (4, 3) and len(np.unique(np.concatenate([c[0].ravel() for c in pipe.calls]))) == 36
    assert r["mode"] == "always:3"
    with pytest.raises(ValueError, match="MODE:DRAWS"):
        run_bench("no-bundle", "no-traffic", modes=("always:0",))


@pytest.mark.slow
def test_bench_on_the_tiny_bundle(tiny_run, tiny_bundle, tmp_path):
    import time

    from benchmarks.traffic import main as traffic_main
    from runtime.cli import main

    data = tmp_path / "traffic.npz"
    assert traffic_main(["--run", str(tiny_run), "--n", "8", "--out", str(data)]) == 0
    t0 = time.perf_counter()
    assert main(["bench", "--bundle", str(tiny_bundle), "--data", str(data), "--batch-sizes", "1,4",
                 "--traffic", "clean,attacked,mix:0.5", "--mode", "adaptive,classify", "--iters", "3", "--warmup", "1",
                 "--gpu-hour-price", "2.5", "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    assert time.perf_counter() - t0 < 60
    r = json.loads((tmp_path / "rep" / "bench.json").read_text())
    assert len(r["configs"]) == 3 * 2 * 2
    for key in ("load_seconds", "memory", "environment", "engine", "precision", "traffic_file"):
        assert key in r, key
    assert r["memory"]["peak_rss_mb"] > 0 and r["environment"]["cores"] >= 1 and "onnxruntime" in r["environment"]
    for c in r["configs"]:
        assert set(c["latency_ms"]) >= {"p50", "p90", "p95", "p99"} and set(c["stage_ms"]) == set(STAGES)
        assert c["throughput_scans_per_s"] > 0 and c["throughput_scans_per_hour"] == pytest.approx(
            3600 * c["throughput_scans_per_s"])
        assert 0 <= c["flag_rate"] <= 1 and c["iterations"] == 3 and len(c["first_run_ms"]) == 1
        assert c["cost_per_10k_scans"] > 0
        if c["mode"] == "classify":
            assert c["flag_rate"] == 0 and c["stage_ms"]["detect"]["p50"] == 0
    att = [c for c in r["configs"] if c["traffic"] == "attacked"]
    assert all(c["attacked_rate"] == 1.0 for c in att)
    html = (tmp_path / "rep" / "bench.html").read_text()
    assert html.count("<svg") == 3 and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "| traffic | mode | batch |" in (tmp_path / "rep" / "bench.md").read_text()
    # bad input: a clear error, no traceback
    assert main(["bench", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path)]) == 2
    assert main(["bench", "--bundle", str(tiny_bundle), "--data", str(data), "--traffic", "mix:3",
                 "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_suite_measures_every_ratio_in_one_run(tiny_run, tiny_bundle, tmp_path):
    from benchmarks.suite import main

    assert main(["--run", str(tiny_run), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "s"), "--n", "6",
                 "--iters", "2", "--warmup", "1", "--blocks", "2", "--sweep-max", "16", "--traffic", str(tmp_path / "t.npz")]) == 0
    r = json.loads((tmp_path / "s" / "summary.json").read_text())
    for k in ("ort_speedup_clean", "ort_speedup_attacked", "clean_overhead_vs_classify", "respaced_1_cost_ratio",
              "respaced_10_gap_points"):
        assert np.isfinite(r["ratios"][k]), k
    assert r["ratios"]["respaced_1_cost_ratio"] >= 10  # one step against >= t_min DDPM steps
    for k in ("clean", "attacked"):  # the paired timing saw every contender on every scan
        assert set(r["paired"][k]["median_ms"]) == {"runtime", "runtime_classify"}
        alt = r["alternating"][k]  # runtime against eager: one ratio per block pair, the median reported
        assert len(alt["speedup_per_block"]) == 2 == len(alt["block_median_ms"]["eager"])
        assert r["ratios"][f"ort_speedup_{k}"] == pytest.approx(float(np.median(alt["speedup_per_block"])))
        # the int8 denoiser's runtime took part in the same rounds, with its own ratio
        assert len(alt["block_median_ms"]["runtime_int8"]) == 2
        assert r["ratios"][f"ort_int8_speedup_{k}"] == pytest.approx(float(np.median(alt["int8"]["speedup_per_block"])))
    assert r["int8_parity"]["passed"] and {c["traffic"] for c in r["latency_int8_configs"]} == {"clean", "attacked"}
    acc = r["traffic_accuracy"]  # the traffic file carries labels: fp32 and int8 accuracy on the same seeds
    assert acc["scans"] == 6 and all(0 <= acc[k][p] <= 1 for k in ("clean", "attacked") for p in ("fp32", "int8", "agreement"))
    md = (tmp_path / "s" / "summary.md").read_text()
    assert "Ratios measured in this run" in md and "## The int8 denoiser" in md and (tmp_path / "s" / "latency" / "bench.html").exists()
