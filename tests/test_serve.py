"""runtime serve on loopback: C-ECHO, C-STORE with one record per SOP Instance UID, refusal of an unknown AE and of
unreadable data, health/readiness/metrics read back, POST /v1/infer, and SIGTERM with work in flight."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.envs import clean_env

pytestmark = pytest.mark.slow


def _dataset(i: int, tmp: Path, profile: str = "A", rows: int | None = None):
    from pydicom import dcmread

    from training.data.phantom import SCANNER_PROFILES, image_rng, make_phantom
    from training.demo import write_dicom

    img = make_phantom(image_rng(11, i), 64, bool(i % 2), SCANNER_PROFILES[profile])
    f = tmp / f"IM{i:04d}"
    write_dicom(f, img, "yes", 1000 + i)
    ds = dcmread(f)
    if rows is not None:  # a header that claims far more pixels than it has (a bomb, or a truncated transfer)
        ds.Rows = ds.Columns = rows
    return ds


class Server:
    def __init__(self, bundle: Path, out: Path, *extra: str):
        from runtime import signing

        pub = signing.default_signing_key().with_suffix(".pub")
        self.cmd = [sys.executable, "-m", "runtime.cli", "serve", "--bundle", str(bundle), "--trusted-key", str(pub),
                    "--dicom-port", "0", "--http-port", "0", "--allow", "SCANNER1,PACS", "--threads", "1",
                    "--out", str(out), *extra]
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True, env=clean_env()
                                     | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"DICOM \S+@[\d.]+:(\d+) .* HTTP [\d.]+:(\d+)", line)
            if m:
                self.dicom_port, self.http_port = int(m[1]), int(m[2])
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise AssertionError(f"runtime serve did not start:\n{''.join(self.lines)}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def _store(port: int, datasets, calling: str = "SCANNER1") -> list[int | None]:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage, Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDFEDPURE")
    if not assoc.is_established:
        return [None] * len(datasets)
    out = []
    for ds in datasets:
        st = assoc.send_c_store(ds)
        out.append(int(st.Status) if "Status" in st else None)
    assoc.release()
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_dicom_and_http_on_loopback(tiny_bundle, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    out = tmp_path / "results.jsonl"
    srv = Server(tiny_bundle, out)
    try:
        assert srv.get("/healthz")[0] == 200
        code, body = srv.get("/readyz")
        assert code == 200 and json.loads(body)["ready"] is True
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title="MEDFEDPURE")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()

        good = [_dataset(i, tmp_path, "ABCD"[i % 4]) for i in range(6)]
        status = _store(srv.dicom_port, good)
        assert all(s in (0x0000, 0xC001) for s in status), status  # diagnosed, or refused as not like the site's
        assert _store(srv.dicom_port, good[:1], calling="INTRUDER") == [None]  # rejected at association
        bomb = _dataset(99, tmp_path, rows=20000)
        assert _store(srv.dicom_port, [bomb]) == [0xC000]
        assert _store(srv.dicom_port, good[:2]) == status[:2]  # sent again: acknowledged, not recorded twice

        png = tmp_path / "scan.png"
        import cv2

        from training.data.phantom import SCANNER_PROFILES, image_rng, make_phantom

        cv2.imwrite(str(png), np.round(make_phantom(image_rng(5, 0), 64, True, SCANNER_PROFILES["B"]) * 65535)
                    .astype(np.uint16))
        req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v1/infer", data=png.read_bytes(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            rec = json.loads(r.read())
        assert rec["source"] == "http" and rec["key"].startswith("sha256:") and rec["error"] is None

        recs = _records(out)
        uids = [r["key"] for r in recs if r["source"] == "dicom"]
        assert sorted(uids) == sorted({str(d.SOPInstanceUID) for d in good} | {str(bomb.SOPInstanceUID)})
        for r in recs:
            if r["source"] == "dicom":
                assert r["study_instance_uid"] and r["series_instance_uid"] and r["file"] is None
        assert next(r for r in recs if r["key"] == str(bomb.SOPInstanceUID))["error"].startswith("image too large")

        metrics = srv.get("/metrics")[1].decode()

        def count(outcome: str) -> float:
            m = re.search(rf'medfedpure_instances_total{{outcome="{outcome}"}} ([\d.e+]+)', metrics)
            return float(m[1]) if m else 0.0

        refused = sum(s == 0xC001 for s in status)
        assert count("diagnosed") == len(good) - refused + 1  # + the PNG over HTTP
        assert count("refused") == refused and count("failed") == 1 and count("duplicate") == 2
        assert "medfedpure_latency_seconds_bucket" in metrics and "medfedpure_queue_depth" in metrics
        assert not list(Path(tmp_path).glob("medfedpure-spool-*/*"))  # no pixel data kept without --keep
    finally:
        assert srv.stop() == 0, "".join(srv.lines)
    assert "stopped" in "".join(srv.lines)


def test_sigterm_with_work_in_flight_loses_and_duplicates_nothing(tiny_bundle, tmp_path):
    out = tmp_path / "results.jsonl"
    sent = [_dataset(i, tmp_path, "ABCD"[i % 4]) for i in range(24)]
    srv = Server(tiny_bundle, out, "--batch-size", "2", "--queue", "4")
    statuses: dict[int, list] = {}

    def sender(k: int) -> None:
        statuses[k] = _store(srv.dicom_port, sent[k::3])

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    while not out.exists() or not out.read_text():  # stop once work is under way
        time.sleep(0.05)
    t0 = time.monotonic()
    assert srv.stop() == 0, "".join(srv.lines)
    assert time.monotonic() - t0 < 60
    for t in threads:
        t.join(timeout=60)
    acked = {str(ds.SOPInstanceUID) for k in range(3) for ds, st in zip(sent[k::3], statuses[k])
             if st in (0x0000, 0xC001, 0xC000)}
    recs = _records(out)
    keys = [r["key"] for r in recs]
    assert len(keys) == len(set(keys))  # no duplicate
    assert acked <= set(keys)  # every acknowledged instance has its record

    # restart, send everything again: the unacknowledged ones are processed, the others answered from the journal
    srv = Server(tiny_bundle, out)
    try:
        again = _store(srv.dicom_port, sent)
        assert all(s in (0x0000, 0xC001) for s in again), again
    finally:
        assert srv.stop() == 0
    keys = [r["key"] for r in _records(out)]
    assert sorted(keys) == sorted(str(ds.SOPInstanceUID) for ds in sent)  # zero lost, zero duplicated


def test_structured_reports_are_forwarded_and_retried_until_acknowledged(tiny_bundle, tmp_path):
    import socket

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage

    with socket.socket() as s:  # a port where, at first, nothing listens: the destination is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "results.jsonl"
    srv = Server(tiny_bundle, out, "--forward", f"ARCHIVE@127.0.0.1:{port}")
    received, got_two = [], threading.Event()

    def on_store(event):
        received.append(event.dataset)
        if len(received) >= 2:
            got_two.set()
        return 0x0000

    try:
        sent = [_dataset(i, tmp_path, "ABCD"[i % 4]) for i in range(2)]
        assert all(s in (0x0000, 0xC001) for s in _store(srv.dicom_port, sent))
        log = Path(str(out) + ".forward.jsonl")
        deadline = time.monotonic() + 60
        while not (log.exists() and '"failed"' in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert '"failed"' in log.read_text()  # tried, failed, logged
        assert len(list(Path(str(out) + ".outbox").glob("*.dcm"))) == 2  # and kept
        ae = AE(ae_title="ARCHIVE")
        ae.add_supported_context(ComprehensiveSRStorage)
        dest = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            assert got_two.wait(90), "the reports were not delivered once the destination came up"
        finally:
            dest.shutdown()
    finally:
        assert srv.stop() == 0, "".join(srv.lines)
    recs = {r["key"]: r for r in _records(out)}
    by_study = {str(d.SOPInstanceUID): d for d in sent}
    for sr in received:
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        rec = recs[str(ref.ReferencedSOPInstanceUID)]
        assert rec["sr_sop_instance_uid"] == str(sr.SOPInstanceUID)
        assert sr.StudyInstanceUID == by_study[rec["key"]].StudyInstanceUID
        values = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
        assert values["Model (sha256 of the signed bundle manifest)"].TextValue.startswith("sha256:")
        if rec["prediction"] is not None:
            assert values["Finding"].ConceptCodeSequence[0].CodeValue == rec["prediction"]
            assert abs(values["Probability of the finding"].MeasuredValueSequence[0].NumericValue
                       - rec["probability"]) < 1e-6
    assert not list(Path(str(out) + ".outbox").glob("*.dcm"))
    assert '"sent"' in Path(str(out) + ".forward.jsonl").read_text()


def test_dicom_over_tls_with_the_project_certificates(tiny_bundle, tmp_path):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from training.cli import main as training_main

    assert training_main(["certs", "--out", str(tmp_path / "certs"), "--sites", "1", "--host", "localhost"]) == 0
    tls = tmp_path / "certs" / "superlink"
    srv = Server(tiny_bundle, tmp_path / "r.jsonl", "--tls-cert", str(tls / "server.crt"), "--tls-key",
                 str(tls / "server.key"))
    try:
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context(Verification)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls / "ca.crt"))
        assoc = ae.associate("127.0.0.1", srv.dicom_port, ae_title="MEDFEDPURE", tls_args=(ctx, "localhost"))
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()
        plain = AE(ae_title="SCANNER1")
        plain.add_requested_context(Verification)
        assert not plain.associate("127.0.0.1", srv.dicom_port, ae_title="MEDFEDPURE").is_established
    finally:
        assert srv.stop() == 0, "".join(srv.lines)


def test_a_full_queue_answers_out_of_resources_and_loses_nothing(tiny_bundle, tmp_path):
    """The worker is held (its reader waits on an event): the queue fills, the next instance is turned away."""
    from types import SimpleNamespace

    from runtime import signing
    from runtime.serve import Job, Service

    args = SimpleNamespace(bundle=str(tiny_bundle), trusted_key=[str(signing.default_signing_key().with_suffix(".pub"))],
                           allow_unsigned=False, engine="ort", device="cpu", precision="fp32", threads=1, seed=None,
                           draws=0, secret=None, out=str(tmp_path / "r.jsonl"), queue=2, batch_size=1, keep=False,
                           spool=str(tmp_path / "spool"), forward=None, ae_title="MEDFEDPURE")
    service = Service(args)
    release, reading = threading.Event(), threading.Event()
    real_read = service.infer.read

    def held_read(path):
        reading.set()
        release.wait(60)
        return real_read(path)

    service.infer.read = held_read
    files = []
    for i in range(4):
        f = tmp_path / f"IM{i}"
        _dataset(i, tmp_path, "ABCD"[i % 4]).save_as(f)
        files.append(f)
    results: dict[int, dict | None] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, service.submit(Job(f"uid{i}", files[i], {}))))
               for i in range(3)]
    threads[0].start()
    assert reading.wait(30)  # the worker holds job 0
    threads[1].start()
    threads[2].start()
    deadline = time.monotonic() + 30
    while service.jobs.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.jobs.qsize() == 2  # jobs 1 and 2 wait: the queue is full
    assert service.submit(Job("uid3", files[3], {})) is None  # turned away: 'out of resources'
    release.set()
    for t in threads:
        t.join(60)
    assert all(results[i] is not None and results[i]["key"] == f"uid{i}" for i in range(3))
    service.drain()
    service.close()
    keys = [json.loads(line)["key"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(keys) == ["uid0", "uid1", "uid2"]
