"""Load on ``runtime serve``: N instances over K concurrent DICOM associations, and a SIGTERM in the middle.

    python -m benchmarks.serve_load --bundle runs/demo/bundle-site-0 --scans runs/demo/heldout-scans \\
        --n 500 --associations 4 --out benchmarks/results/serve-load

1. ``runtime infer --batch-size 1`` over the scan files: the reference per-scan latency (sum of its stages).
2. ``runtime serve`` on loopback; N instances (the scans, each sent under its own SOP Instance UID, so an
   instance is a new acquisition of the same pixels) sent by K concurrent associations; latency of each
   C-STORE from request to response (the response comes after the record is written). Counts: answered,
   records per UID (lost / duplicated).
3. The same load again with a SIGTERM after a third of it; the service restarts and the unacknowledged
   instances are sent again: lost and duplicated records after the restart.

Writes ``OUT/serve-load.json`` and ``OUT/serve-load.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from runtime.markdown import table


def _instances(scans: Path, n: int):
    """N DICOM data sets: the folder's DICOM files cycled, each copy with new SOP Instance and series UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from runtime.inputs import is_dicom_file

    files = sorted(f for f in scans.iterdir() if f.is_file() and is_dicom_file(f))
    if not files:
        raise SystemExit(f"{scans}: no DICOM files (make demo writes some in runs/demo/heldout-scans)")
    base = [dcmread(f) for f in files]
    out = []
    for i in range(n):
        ds = copy.deepcopy(base[i % len(base)])  # Dataset.copy() is shallow: the UIDs would be shared
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        out.append(ds)
    return out, files


class Serve:
    def __init__(self, args, out: Path):
        cmd = [sys.executable, "-m", "runtime.cli", "serve", "--bundle", args.bundle, "--dicom-port", "0",
               "--http-port", "0", "--allow", "LOAD", "--threads", str(args.threads), "--out", str(out),
               "--queue", str(args.queue)] + sum((["--trusted-key", k] for k in args.trusted_key or []), [])
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"DICOM \S+@[\d.]+:(\d+) .* HTTP [\d.]+:(\d+)", line)
            if m:
                self.port, self.http = int(m[1]), int(m[2])
                threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
                return
        raise SystemExit("runtime serve did not start:\n" + "".join(self.log))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=300)


def _send(port: int, datasets, k: int, stop_after: int | None = None, on_stop=None) -> list[tuple[str, int | None, float]]:
    """Send over ``k`` concurrent associations; (uid, status or None, seconds) per instance."""
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    results: list = []
    lock = threading.Lock()
    sent = [0]

    def worker(part) -> None:
        ae = AE(ae_title="LOAD")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDFEDPURE")
        for ds in part:
            if not assoc.is_established:
                with lock:
                    results.append((str(ds.SOPInstanceUID), None, float("nan")))
                continue
            t = time.perf_counter()
            st = assoc.send_c_store(ds)
            dt = time.perf_counter() - t
            with lock:
                results.append((str(ds.SOPInstanceUID), int(st.Status) if "Status" in st else None, dt))
                sent[0] += 1
                fire = stop_after is not None and sent[0] == stop_after
            if fire:
                on_stop()
        if assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=worker, args=(datasets[i::k],)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()] if path.exists() else []


def _pct(v, q) -> float:
    v = [x for x in v if np.isfinite(x)]
    return float(np.percentile(v, q)) if v else float("nan")


def reference(args, files: list[Path], out: Path) -> dict:
    rec = out / "infer-b1.jsonl"
    cmd = [sys.executable, "-m", "runtime.cli", "infer", *map(str, files), "--bundle", args.bundle, "--batch-size",
           "1", "--threads", str(args.threads), "--out", str(rec), "--quiet"] + sum(
        (["--trusted-key", k] for k in args.trusted_key or []), [])
    subprocess.run(cmd, check=True)
    recs = [json.loads(line) for line in rec.read_text().splitlines()]
    ms = [sum(r["ms"].values()) for r in recs if r.get("ms")]
    return {"scans": len(ms), "p50_ms": _pct(ms, 50), "p95_ms": _pct(ms, 95)}


def load_phase(args, datasets: list, out: Path, ref: dict) -> dict:
    """Send every instance over ``args.associations`` associations to one service: answers, latency, records."""
    res_file = out / "load.jsonl"
    res_file.unlink(missing_ok=True)
    srv = Serve(args, res_file)
    t0 = time.perf_counter()
    res = _send(srv.port, datasets, args.associations)
    wall = time.perf_counter() - t0
    assert srv.stop() == 0
    lat = [1000.0 * r[2] for r in res]
    keys = _keys(res_file)
    answered = sum(r[1] is not None for r in res)
    load = {"instances": args.n, "associations": args.associations, "answered": answered,
            "statuses": {hex(s): sum(r[1] == s for r in res) for s in sorted({r[1] for r in res if r[1] is not None})},
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99), "seconds": wall,
            "throughput_per_s": args.n / wall, "records": len(keys), "unique_records": len(set(keys)),
            "lost": len({str(d.SOPInstanceUID) for d in datasets} - set(keys)), "duplicated": len(keys) - len(set(keys))}
    load["p95_vs_infer_b1"] = load["p95_ms"] / ref["p95_ms"]
    print(f"load: {answered}/{args.n} answered, p50 {load['p50_ms']:.1f} / p95 {load['p95_ms']:.1f} / p99 "
          f"{load['p99_ms']:.1f} ms, {load['throughput_per_s']:.1f} instances/s; lost {load['lost']}, duplicated "
          f"{load['duplicated']}; p95 / infer batch-1 p95 = {load['p95_vs_infer_b1']:.2f}", flush=True)
    return load


def sigterm_phase(args, datasets: list, out: Path) -> dict:
    """SIGTERM the service a third of the way in, restart it, resend what was not acknowledged: nothing may be lost
    or recorded twice."""
    term_file = out / "sigterm.jsonl"
    term_file.unlink(missing_ok=True)
    srv = Serve(args, term_file)
    stopped: dict = {}

    def do_stop() -> None:
        stopped["rc"] = srv.stop()

    res = _send(srv.port, datasets, args.associations, stop_after=args.n // 3,
                on_stop=lambda: threading.Thread(target=do_stop).start())
    while "rc" not in stopped:
        time.sleep(0.1)
    acked = {u for u, s, _ in res if s in (0x0000, 0xC000, 0xC001)}  # answered with a record
    before = _keys(term_file)
    srv = Serve(args, term_file)
    resend = [d for d in datasets if str(d.SOPInstanceUID) not in acked]
    res2 = _send(srv.port, resend, args.associations)
    assert srv.stop() == 0
    after = _keys(term_file)
    term = {"exit_status_at_sigterm": stopped["rc"], "acknowledged_before_stop": len(acked),
            "records_before_restart": len(before), "acknowledged_without_record": len(acked - set(before)),
            "resent": len(resend), "resent_answered": sum(r[1] is not None for r in res2),
            "records_after": len(after), "lost": len({str(d.SOPInstanceUID) for d in datasets} - set(after)),
            "duplicated": len(after) - len(set(after))}
    print(f"SIGTERM: exit {term['exit_status_at_sigterm']}, {term['acknowledged_before_stop']} acknowledged, "
          f"{term['resent']} resent after restart; lost {term['lost']}, duplicated {term['duplicated']}", flush=True)
    return term


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--scans", required=True, help="folder with DICOM files (the demo's held-out scans)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--associations", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queue", type=int, default=32)
    p.add_argument("--trusted-key", action="append")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets, files = _instances(Path(args.scans), args.n)
    if len({str(d.SOPInstanceUID) for d in datasets}) != args.n:
        raise SystemExit("the instances do not have distinct SOP Instance UIDs")
    ref = reference(args, files, out)
    print(f"runtime infer, batch 1: p50 {ref['p50_ms']:.1f} ms, p95 {ref['p95_ms']:.1f} ms per scan", flush=True)
    report = {"bundle": args.bundle, "reference_infer_b1": ref, "load": load_phase(args, datasets, out, ref),
              "sigterm": sigterm_phase(args, datasets, out),
              "command": " ".join(["python -m benchmarks.serve_load", *(argv or sys.argv[1:])])}
    (out / "serve-load.json").write_text(json.dumps(report, indent=1))
    (out / "serve-load.md").write_text(render(report))
    return 0


def render(r: dict) -> str:
    ref, ld, t = r["reference_infer_b1"], r["load"], r["sigterm"]
    return "\n".join([
        f"# runtime serve under load: {r['bundle']}", "", f"Produced by: `{r['command']}`", "",
        f"Reference, `runtime infer --batch-size 1` on the same scans: p50 {ref['p50_ms']:.1f} ms, p95 "
        f"{ref['p95_ms']:.1f} ms per scan ({ref['scans']} scans).", "",
        *table(["instances", "associations", "answered", "p50 ms", "p95 ms", "p99 ms", "instances/s", "lost",
                "duplicated", "p95 / infer b1 p95"],
               [(ld["instances"], ld["associations"], ld["answered"], f"{ld['p50_ms']:.1f}", f"{ld['p95_ms']:.1f}",
                 f"{ld['p99_ms']:.1f}", f"{ld['throughput_per_s']:.1f}", ld["lost"], ld["duplicated"],
                 f"{ld['p95_vs_infer_b1']:.2f}")], align="r" * 10), "",
        f"Statuses: {ld['statuses']}. Latency is from the C-STORE request to its response, which the service "
        "sends after the instance's record is written.", "",
        "## SIGTERM in the middle of the load", "",
        f"Exit status {t['exit_status_at_sigterm']}; {t['acknowledged_before_stop']} instances acknowledged before "
        f"the stop ({t['acknowledged_without_record']} of them without a record); {t['resent']} sent again after "
        f"the restart. After: {t['records_after']} records, **lost {t['lost']}, duplicated {t['duplicated']}**.", ""])


if __name__ == "__main__":
    sys.exit(main())
