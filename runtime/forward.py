"""Results back into the hospital's systems: a DICOM Structured Report per instance, sent by C-STORE.

The report (highdicom's Comprehensive SR, in the study of the scan it is about) holds the finding, its
probability, whether the scan was flagged and purified or refused, and the model's identity (the sha256 of
the bundle's signed manifest). Reports wait in an outbox folder until the destination has acknowledged them:
a destination that is down costs retries (with a growing pause), never a report; every attempt is logged.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

SCHEME = "99MEDFEDPURE"
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AE@host:port`` -> (ae, host, port)."""
    ae, sep, rest = text.partition("@")
    host, sep2, port = rest.rpartition(":")
    if not (sep and sep2 and ae and host and port.isdigit()):
        raise ValueError(f"--forward {text!r}: expected AE@host:port, e.g. PACS@10.0.0.5:104")
    return ae, host, int(port)


def result_sr(source, rec: dict, model_id: str, institution: str | None = None):
    """The Structured Report of ``rec`` (a record of ``runtime serve``) about ``source`` (the scan's header)."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.uid import generate_uid

    src = source.copy()
    for k in TYPE2:  # the SR copies the patient and study modules; type 2 attributes may be empty
        if k not in src:
            setattr(src, k, "")

    def text(code: str, meaning: str, value: str):
        return hd.sr.TextContentItem(name=CodedConcept(code, SCHEME, meaning), value=value, relationship_type="CONTAINS")

    items = []
    if rec.get("prediction") is not None:
        items += [hd.sr.CodeContentItem(name=CodedConcept("121071", "DCM", "Finding"),
                                        value=CodedConcept(str(rec["prediction"]), SCHEME, f"tumor: {rec['prediction']}"),
                                        relationship_type="CONTAINS"),
                  hd.sr.NumContentItem(name=CodedConcept("PROB", SCHEME, "Probability of the finding"),
                                       value=float(rec["probability"]), unit=CodedConcept("1", "UCUM", "no units"),
                                       relationship_type="CONTAINS")]
    else:
        items.append(text("NODX", "No diagnosis", str(rec.get("refusal") or rec.get("error") or "not diagnosed")))
    items += [text("FLAG", "Flagged as perturbed and purified", "yes" if rec.get("flagged") else "no"),
              text("MODEL", "Model (sha256 of the signed bundle manifest)", model_id)]
    root = hd.sr.ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = items
    return hd.sr.ComprehensiveSR(evidence=[src], content=root, series_instance_uid=generate_uid(), series_number=900,
                                 sop_instance_uid=generate_uid(), instance_number=1, manufacturer="MedFedPure",
                                 institution_name=institution)


class Forwarder:
    """Sends the outbox's reports to ``destination`` (AE@host:port) from a thread of its own."""

    def __init__(self, destination: str, outbox: Path, log_path: Path, calling_ae: str, metrics=None,
                 retry_seconds: float = 2.0, max_pause: float = 60.0):
        self.ae_title, self.host, self.port = parse_destination(destination)
        self.outbox, self.log_path, self.calling_ae, self.metrics = Path(outbox), Path(log_path), calling_ae, metrics
        self.outbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.retry, self.max_pause = retry_seconds, max_pause
        self.wake, self.stop_event = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="forward", daemon=True)
        self.thread.start()

    def put(self, sr) -> None:
        """Queue a report (written to the outbox before this returns, so it survives a crash)."""
        tmp = self.outbox / f".{sr.SOPInstanceUID}.partial"
        sr.save_as(tmp, enforce_file_format=True)
        tmp.replace(self.outbox / f"{sr.SOPInstanceUID}.dcm")
        self.wake.set()

    def pending(self) -> int:
        return sum(1 for _ in self.outbox.glob("*.dcm"))

    def _log(self, **entry) -> None:
        with self.lock, self.log_path.open("a") as fh:
            fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}) + "\n")

    def _send(self, files: list[Path]) -> int:
        from pydicom import dcmread
        from pynetdicom import AE
        from pynetdicom.sop_class import ComprehensiveSRStorage

        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(ComprehensiveSRStorage)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            for f in files:
                self._count("failed")
                self._log(sr=f.stem, outcome="failed", reason="association not established")
            return 0
        sent = 0
        try:
            for f in files:
                st = assoc.send_c_store(dcmread(f))
                status = int(st.Status) if "Status" in st else None
                if status == 0:
                    f.unlink(missing_ok=True)
                    sent += 1
                    self._count("sent")
                    self._log(sr=f.stem, outcome="sent")
                else:
                    self._count("failed")
                    self._log(sr=f.stem, outcome="failed", status=None if status is None else hex(status))
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.forwarded.labels(outcome).inc()

    def _run(self) -> None:
        pause = self.retry
        while not self.stop_event.is_set():
            files = sorted(self.outbox.glob("*.dcm"))
            if not files:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                ok = self._send(files) == len(files)
            except Exception as err:  # noqa: BLE001 - a destination that misbehaves: retry later
                self._log(outcome="failed", reason=str(err))
                ok = False
            if ok:
                pause = self.retry
            else:  # wait, longer each time, then try again; the reports stay in the outbox
                self.stop_event.wait(pause)
                pause = min(self.max_pause, pause * 2)

    def close(self, timeout: float = 10.0) -> None:
        """Try once more to empty the outbox, then stop; what is left is sent at the next start."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            self.wake.set()
            time.sleep(0.2)
        self.stop_event.set()
        self.wake.set()
        self.thread.join(timeout=5)
