"""``runtime serve``: the scanner side as a service (DICOM C-STORE in, records out, health and metrics over HTTP).

* **DICOM** (pynetdicom): C-ECHO, and C-STORE of MR, CT and Secondary Capture images from the calling AE
  titles in ``--allow`` only (others are rejected at association). Each instance is spooled to a file and
  read by the same reader as ``runtime infer`` (limits from the header before decoding, out-of-distribution
  refusal, the per-scan seed), classified behind the defense, and gets exactly one record keyed by its SOP
  Instance UID, with the study and series UIDs. The C-STORE is answered only once that record is written:
  Success (0x0000) for a diagnosis; 0xC001 for a scan refused as not a brain MRI like the site's; 0xC000 for
  one that cannot be read; 0xA700 (out of resources) when the queue is full or the service is stopping, so
  the sender keeps the instance and sends it again later. The pixel data is deleted after reading unless
  ``--keep`` is given.
* **HTTP** (the standard library's threading server: four endpoints need no framework; bound to
  127.0.0.1 unless ``--http-host`` says otherwise): ``/healthz`` (alive), ``/readyz`` (bundle verified and
  loaded, engine warmed, not stopping), ``/metrics`` (Prometheus text, prometheus-client), ``POST /v1/infer``
  (one image file as the body; returns its record).
* **Results back** (``--forward AE@host:port``): a DICOM Structured Report per instance (highdicom) with the
  finding, its probability, the flag and the model's identity, sent by C-STORE; reports wait in an outbox
  folder until acknowledged and every attempt is logged (``runtime.forward``).
* **Records** are appended to ``--out`` one whole line per ``write()`` and fsync'd; at start a torn last
  line (a crash mid-write) is cut, and the SOP Instance UIDs already recorded are known, so an instance sent
  again after a restart is acknowledged without a second record.
* **Back-pressure and shutdown:** a bounded queue (``--queue``); SIGTERM or SIGINT stops taking new work,
  finishes what is queued and in flight, flushes, and exits 0.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_READ = 0xC000
STATUS_REFUSED = 0xC001
MAX_BODY = 64 * 2**20  # POST /v1/infer bodies


class Journal:
    """The results file: one JSON record per line, keyed by ``key`` (a SOP Instance UID, or ``sha256:...``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.keys: set[str] = set()
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # a line torn by a crash: never acknowledged, so the sender sends it again
                with open(self.path, "r+b") as fh:
                    fh.truncate(end)
                print(f"runtime serve: cut a torn last line from {self.path}", file=sys.stderr)
            for line in data[:end].splitlines():
                try:
                    self.keys.add(json.loads(line)["key"])
                except (ValueError, KeyError, TypeError):
                    continue
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __contains__(self, key: str) -> bool:
        with self.lock:
            return key in self.keys

    def append(self, rec: dict) -> bool:
        """Write ``rec`` (one ``write()`` of a whole line, then fsync); False if its key is already recorded."""
        return self.append_many([rec])[0]

    def append_many(self, recs: list[dict]) -> list[bool]:
        """Write the records whose keys are new, each line whole in one ``write()``, then one fsync for all."""
        written = []
        with self.lock:
            for rec in recs:
                if rec["key"] in self.keys:
                    written.append(False)
                    continue
                os.write(self.fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())
                self.keys.add(rec["key"])
                written.append(True)
            if any(written):
                os.fsync(self.fd)
        return written

    def close(self) -> None:
        with self.lock:
            os.close(self.fd)


@dataclass
class Job:
    key: str
    path: Path
    meta: dict
    t0: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    record: dict | None = None
    header: object | None = None  # the DICOM header (for the Structured Report sent on)


class Metrics:
    """Prometheus metrics on a registry of this service's own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.instances = Counter("medfedpure_instances", "Instances answered, by outcome", ["outcome"], registry=r)
        self.flagged = Counter("medfedpure_flagged", "Instances flagged as perturbed and purified", registry=r)
        self.queue_depth = Gauge("medfedpure_queue_depth", "Instances waiting to be classified", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.latency = Histogram("medfedpure_latency_seconds", "Seconds per stage (total: receipt to record)",
                                 ["stage"], buckets=buckets, registry=r)
        self.ready = Gauge("medfedpure_ready", "1 when the bundle is loaded and the engine warmed", registry=r)
        self.forwarded = Counter("medfedpure_forwarded", "Structured Reports sent on (or attempts that failed)",
                                 ["outcome"], registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Service:
    """The loaded bundle, the queue, the worker that classifies, the journal, the metrics."""

    def __init__(self, args):
        from runtime.bundle import sha256
        from runtime.inference import Inference

        self.args = args
        self.metrics = Metrics()
        self.journal = Journal(args.out)
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=args.queue)
        self.stopping = threading.Event()
        self.idle = threading.Condition()
        self.in_flight = 0
        self.spool = Path(args.spool or tempfile.mkdtemp(prefix="medfedpure-spool-"))
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.infer = Inference(args)
        self.model_id = "sha256:" + sha256(self.infer.bundle.path / "manifest.json")
        self.forwarder = None
        if args.forward:
            from runtime.forward import Forwarder

            out = Path(args.out)
            self.forwarder = Forwarder(args.forward, out.with_name(out.name + ".outbox"),
                                       out.with_name(out.name + ".forward.jsonl"), args.ae_title, self.metrics)
        self._warm_up()
        self.worker = threading.Thread(target=self._work, name="classify", daemon=True)
        self.worker.start()
        self.metrics.ready.set(1)

    def _warm_up(self) -> None:
        import numpy as np

        size = self.infer.bundle.preprocess_config.size
        x = np.zeros((1, size, size), np.float32)
        x[0, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 0.5
        self.infer.pipe.run(x[:, None], seed=np.zeros((1, 1), np.int64), mode="always")

    @property
    def ready(self) -> bool:
        return not self.stopping.is_set() and self.worker.is_alive()

    # ------------------------------------------------------------------ work
    def submit(self, job: Job, timeout: float | None = None) -> dict | None:
        """Queue ``job`` and wait for its record; None when the service cannot take it (full or stopping)."""
        if self.stopping.is_set():
            return None
        with self.idle:
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                return None
            self.in_flight += 1
            self.metrics.queue_depth.set(self.jobs.qsize())
        job.done.wait(timeout)
        return job.record

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            batch = [first]
            while len(batch) < self.args.batch_size:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            self.metrics.queue_depth.set(self.jobs.qsize())
            try:
                self._classify(batch)
            except Exception as err:  # noqa: BLE001 - every job gets a record, whatever failed
                for job in batch:
                    if job.record is None:
                        job.record = self._finish(job, {"file": str(job.path), "error": f"internal error: {err}"})
            finally:
                for job in batch:
                    if not self.args.keep:
                        job.path.unlink(missing_ok=True)
                    job.done.set()
                with self.idle:
                    self.in_flight -= len(batch)
                    self.idle.notify_all()

    def _classify(self, batch: list[Job]) -> None:
        ready, xs, shas, pre, done = [], [], [], [], []
        for job in batch:
            t = time.perf_counter()
            x, sha, rec = self.infer.read(job.path)
            if rec is not None:
                done.append((job, rec))
                continue
            ready.append(job)
            xs.append(x)
            shas.append(sha)
            pre.append(1000.0 * (time.perf_counter() - t))
        if ready:
            done += zip(ready, self.infer.classify([j.path for j in ready], xs, shas, pre))
        self._finish_many(done)

    def _finish(self, job: Job, rec: dict) -> dict:
        return self._finish_many([(job, rec)])[0]

    def _finish_many(self, done: list[tuple[Job, dict]]) -> list[dict]:
        """Records of finished jobs: written together (one fsync), then forwarded and counted."""
        recs, reports = [], []
        for job, rec in done:
            rec = {"key": job.key, **job.meta, **rec, "received_ms": round(1000.0 * (time.perf_counter() - job.t0), 3)}
            if not self.args.keep:
                rec["file"] = None  # the spooled copy is deleted; the instance is named by its UIDs
            sr = None
            if self.forwarder is not None and job.header is not None:
                from runtime.forward import result_sr

                try:
                    sr = result_sr(job.header, rec, self.model_id)
                    rec["sr_sop_instance_uid"] = str(sr.SOPInstanceUID)
                except Exception as err:  # noqa: BLE001 - the diagnosis stands; say why no report was made
                    rec["sr_error"] = f"no Structured Report: {err}"
            recs.append(rec)
            reports.append(sr)
        written = self.journal.append_many(recs)
        for (job, _), rec, sr, new in zip(done, recs, reports, written):
            job.record = rec
            self._count(job, rec, new)
            if new and sr is not None:
                self.forwarder.put(sr)
        return recs

    def _count(self, job: Job, rec: dict, new: bool) -> None:
        outcome = "failed" if rec.get("error") else "refused" if rec.get("refused") else "diagnosed"
        if not new:
            outcome = "duplicate"
        m = self.metrics
        m.instances.labels(outcome).inc()
        if rec.get("flagged"):
            m.flagged.inc()
        for stage, ms in (rec.get("ms") or {}).items():
            m.latency.labels(stage).observe(ms / 1000.0)
        m.latency.labels("total").observe(time.perf_counter() - job.t0)

    # ------------------------------------------------------------------ stop
    def drain(self, timeout: float = 300.0) -> None:
        """Stop taking work; wait until everything queued or in flight has its record."""
        self.stopping.set()
        self.metrics.ready.set(0)
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.in_flight and time.monotonic() < deadline:
                self.idle.wait(0.5)

    def close(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
        self.journal.close()


# ---------------------------------------------------------------------- DICOM

STORAGE_CLASSES = ("MRImageStorage", "EnhancedMRImageStorage", "CTImageStorage", "EnhancedCTImageStorage",
                   "SecondaryCaptureImageStorage", "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
                   "MultiFrameGrayscaleWordSecondaryCaptureImageStorage")


def _dicom_meta(event) -> dict:
    ds = event.dataset  # the header elements only are looked at; pixels stay undecoded
    return {"sop_instance_uid": str(event.request.AffectedSOPInstanceUID),
            "study_instance_uid": str(getattr(ds, "StudyInstanceUID", "") or ""),
            "series_instance_uid": str(getattr(ds, "SeriesInstanceUID", "") or ""),
            "sop_class_uid": str(event.request.AffectedSOPClassUID), "calling_ae": event.assoc.requestor.ae_title,
            "source": "dicom"}


def make_store_handler(service: Service):
    def handle_store(event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in service.journal:  # acknowledged before (a resend after a restart): one record per instance
            service.metrics.instances.labels("duplicate").inc()
            return STATUS_SUCCESS
        if service.stopping.is_set():
            service.metrics.instances.labels("busy").inc()
            return STATUS_OUT_OF_RESOURCES
        try:
            meta = _dicom_meta(event)
            fd, name = tempfile.mkstemp(dir=service.spool, prefix="in-", suffix=".dcm")
            with os.fdopen(fd, "wb") as fh:
                fh.write(event.encoded_dataset())
        except Exception as err:  # noqa: BLE001 - a dataset pynetdicom cannot decode: refuse it, keep serving
            service.journal.append({"key": uid, "sop_instance_uid": uid, "source": "dicom",
                                    "error": f"unreadable dataset: {err}"})
            service.metrics.instances.labels("failed").inc()
            return STATUS_CANNOT_READ
        # the header decoded once above serves the Structured Report too (no second read of the spooled file)
        header = event.dataset if service.forwarder is not None else None
        rec = service.submit(Job(uid, Path(name), meta, header=header))
        if rec is None:
            Path(name).unlink(missing_ok=True)
            service.metrics.instances.labels("busy").inc()
            return STATUS_OUT_OF_RESOURCES
        if rec.get("error"):
            return STATUS_CANNOT_READ
        return STATUS_REFUSED if rec.get("refused") else STATUS_SUCCESS

    return handle_store


def start_dicom(service: Service, host: str, port: int, ae_title: str, allow: list[str], ssl_context=None):
    from pynetdicom import AE, evt
    from pynetdicom import sop_class as sc

    ae = AE(ae_title=ae_title)
    ae.require_calling_aet = list(allow)
    ae.maximum_pdu_size = 0
    ae.add_supported_context(sc.Verification)
    for name in STORAGE_CLASSES:
        ae.add_supported_context(getattr(sc, name))
    handlers = [(evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS), (evt.EVT_C_STORE, make_store_handler(service))]
    return ae.start_server((host, port), block=False, evt_handlers=handlers, ssl_context=ssl_context)


# ---------------------------------------------------------------------- HTTP


def _suffix(body: bytes) -> str:
    """The file suffix the reader expects, from the body's magic bytes (DICOM has none of these)."""
    for magic, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
                          (b"II+\x00", ".tif"), (b"MM\x00+", ".tif")):
        if body.startswith(magic):
            return suffix
    return ".dcm"


def make_http_handler(service: Service):
    class Handler(BaseHTTPRequestHandler):
        server_version = "medfedpure-runtime"

        def log_message(self, *a) -> None:  # quiet: the metrics say what happened
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, (json.dumps(obj) + "\n").encode())

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/healthz":
                self._json(200, {"status": "alive"})
            elif self.path == "/readyz":
                ok = service.ready
                self._json(200 if ok else 503, {"ready": ok, "bundle": str(service.infer.bundle.path),
                                                "signature": service.infer.bundle.signature.record()})
            elif self.path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                self._send(200, service.metrics.text(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            import hashlib

            if self.path != "/v1/infer":
                return self._json(404, {"error": f"no such endpoint {self.path}"})
            try:
                n = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(411, {"error": "a Content-Length is required"})
            if not 0 < n <= MAX_BODY:
                return self._json(413, {"error": f"the body must be 1 byte to {MAX_BODY // 2**20} MB, got {n}"})
            body = self.rfile.read(n)
            key = "sha256:" + hashlib.sha256(body).hexdigest()
            fd, name = tempfile.mkstemp(dir=service.spool, prefix="http-", suffix=_suffix(body))
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            rec = service.submit(Job(key, Path(name), {"source": "http"}))
            if rec is None:
                Path(name).unlink(missing_ok=True)
                return self._json(503, {"error": "busy or stopping; send it again later"})
            self._json(422 if rec.get("error") else 200, rec)

    return Handler


# ---------------------------------------------------------------------- main


def _ssl_context(args):
    if not args.tls_cert:
        return None
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_ca:  # mutual TLS: only senders with a certificate from this CA
        ctx.load_verify_locations(args.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def serve(args) -> int:
    if args.queue < 1 or args.batch_size < 1:
        raise ValueError("--queue and --batch-size must be at least 1")
    allow = [a.strip() for a in (args.allow or "").split(",") if a.strip()]
    if not allow:
        raise ValueError("--allow names the calling AE titles to accept (e.g. --allow SCANNER1,PACS)")
    service = Service(args)
    dicom = start_dicom(service, args.dicom_host, args.dicom_port, args.ae_title, allow, _ssl_context(args))
    http = ThreadingHTTPServer((args.http_host, args.http_port), make_http_handler(service))
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, name="http", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"runtime serve: DICOM {args.ae_title}@{args.dicom_host}:{dicom.server_address[1]} (calling AEs: "
          f"{', '.join(allow)}), HTTP {args.http_host}:{http.server_address[1]}, records -> {args.out}; ready",
          file=sys.stderr, flush=True)
    stop.wait()
    print("runtime serve: stopping: new instances are answered 'out of resources'; finishing the queue",
          file=sys.stderr, flush=True)
    service.drain()
    dicom.shutdown()
    http.shutdown()
    service.close()
    print(f"runtime serve: stopped; {len(service.journal.keys)} records in {args.out}", file=sys.stderr, flush=True)
    return 0


def add_parser(sub, trust) -> None:
    s = sub.add_parser("serve", help="receive scans over DICOM (C-STORE) and HTTP; health and metrics")
    s.add_argument("--bundle", required=True)
    s.add_argument("--engine", choices=["ort", "trt", "torch"], default="ort")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    s.add_argument("--threads", type=int, default=0, help="CPU threads for ONNX Runtime (0: its default)")
    s.add_argument("--dicom-host", default="127.0.0.1")
    s.add_argument("--dicom-port", type=int, default=11112, help="0: any free port")
    s.add_argument("--ae-title", default="MEDFEDPURE")
    s.add_argument("--allow", help="comma-separated calling AE titles accepted (others are rejected)")
    s.add_argument("--http-host", default="127.0.0.1")
    s.add_argument("--http-port", type=int, default=8080, help="0: any free port")
    s.add_argument("--out", required=True, help="results file (JSON lines), appended; one record per instance")
    s.add_argument("--queue", type=int, default=32, help="instances waiting at most; beyond: 'out of resources'")
    s.add_argument("--batch-size", type=int, default=8, help="instances classified together at most")
    s.add_argument("--keep", action="store_true", help="keep the received files (in --spool)")
    s.add_argument("--spool", help="folder for received files (default: a private temporary folder)")
    s.add_argument("--secret", help="the site secret file (default: BUNDLE.secret beside the bundle folder)")
    s.add_argument("--forward", metavar="AE@HOST:PORT",
                   help="send a DICOM Structured Report of each result there (C-STORE; retried until acknowledged)")
    s.add_argument("--tls-cert", help="PEM certificate for DICOM over TLS (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--tls-ca", help="PEM CA: require senders to present a certificate it signed")
    trust(s)
    s.set_defaults(func=serve, seed=None, draws=0)
