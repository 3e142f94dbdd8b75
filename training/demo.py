"""``make demo``: the main job end to end on the embedded default (synthetic phantoms, CPU, no download).

1. federated training on Flower: synthetic brain-MRI phantoms from four
   scanner profiles -> four simulated hospitals, one scanner each; the
   denoiser, then the personalized mixture of experts;
2. export of site 0's signed bundle (ONNX, checked against PyTorch);
3. site 0's held-out test phantoms written as files a scanner would send
   (16-bit PNG and extensionless DICOM), never seen in training;
4. ``runtime infer`` on those files (no torch on that path), scored against
   their labels;
5. ``runtime bench`` on clean and PGD-attacked traffic;
6. ``report.html``, and a closing summary: every artefact with its path, the
   runtime's accuracy, its latency, and the commands to run next.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from training import config as cfgmod

PHASES = ("federated training", "export", "held-out scans as files", "runtime infer", "runtime bench", "report")


class Phases:
    """One line per phase with its time, so a newcomer sees where the minutes go."""

    def __init__(self, total: int = len(PHASES)):
        self.total, self.k, self.times = total, 0, {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.k += 1
        print(f"\n== [{self.k}/{self.total}] {name} ...", flush=True)
        t = time.perf_counter()
        with warnings.catch_warnings():  # libraries (Ray, Flower) reset the filters when they start
            warnings.simplefilter("ignore")
            quiet_libraries()
            yield
        self.times[name] = time.perf_counter() - t
        print(f"== [{self.k}/{self.total}] {name}: done in {self.times[name]:.0f} s", flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def quiet_libraries() -> None:
    """Warnings that mean nothing to a user of the demo (deprecations inside Flower, Ray, ONNX export)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # Ray's workers are separate processes
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    with contextlib.suppress(ImportError):
        import flwr.common.logger  # noqa: F401 - sets its own level on import; set ours after it
    for name in ("flwr", "ray", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def write_dicom(path: Path, img: np.ndarray, label: str, index: int) -> None:
    """One 16-bit MR slice as a DICOM file (what a scanner or PACS sends)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["medfedpure-demo", str(index)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["medfedpure-demo-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["medfedpure-demo-series"])
    ds.Modality, ds.PatientID, ds.PatientName = "MR", "PHANTOM", "Phantom^Demo"
    ds.SeriesDescription, ds.InstanceNumber = "synthetic phantom (demo)", index + 1
    pixels = np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_heldout_scans(run: Path, site: int, out: Path) -> Path:
    """Site ``site``'s test phantoms as files in ``out`` (even: 16-bit PNG, odd: extensionless DICOM); returns
    the labels CSV (``file,label``), kept beside the folder so that the folder holds scans only."""
    import cv2

    from training.data.datasets import synthetic_originals
    from training.federated.task import site_data
    from training.runs import read_source

    profile = cfgmod.load_toml(run / "config.toml")
    source = read_source(run)
    n = int(source.partition(":")[2] or 1200)
    data = site_data(source, profile, site, profile.federated.sites)
    test = data["test"]
    images, labels = synthetic_originals(n, profile.preprocess.size, test.groups, seed=profile.seed)
    if not np.array_equal(labels, test.labels):
        raise RuntimeError("the re-rendered phantoms do not match the run's test split")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        name = data.class_names[int(y)]
        if i % 2 == 0:
            f = out / f"scan-{i:03d}.png"
            if not cv2.imwrite(str(f), np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)):
                raise OSError(f"could not write {f}")
        else:
            f = out / f"IM{i:04d}"
            write_dicom(f, img, name, i)
        rows.append((f.name, name))
    labels_csv = out.with_name(out.name + "-labels.csv")
    with labels_csv.open("w", newline="") as fh:
        csv.writer(fh).writerows([("file", "label"), *rows])
    return labels_csv


def score_records(records: Path, labels_csv: Path) -> dict:
    """Accuracy of ``runtime infer``'s records against the files' labels; refused scans count as not diagnosed."""
    with labels_csv.open() as fh:
        truth = {r["file"]: r["label"] for r in csv.DictReader(fh)}
    recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    diagnosed = [r for r in recs if r.get("prediction") is not None]
    correct = sum(r["prediction"] == truth.get(Path(r["file"]).name) for r in diagnosed)
    tumors = [r for r in diagnosed if truth.get(Path(r["file"]).name) == "yes"]
    ms = [sum(v for v in (r.get("ms") or {}).values()) for r in diagnosed if r.get("ms")]
    return {"files": len(truth), "records": len(recs), "diagnosed": len(diagnosed),
            "refused": sum(bool(r.get("refused")) for r in recs), "errors": sum(bool(r.get("error")) for r in recs),
            "flagged": sum(bool(r.get("flagged")) for r in diagnosed), "correct": correct,
            "accuracy": correct / len(truth) if truth else float("nan"),
            "sensitivity": (sum(r["prediction"] == "yes" for r in tumors) / len(tumors)) if tumors else float("nan"),
            "median_ms_per_scan": float(np.median(ms)) if ms else None}


def _runtime(argv: list[str]) -> None:
    from runtime.cli import main as runtime_main

    rc = runtime_main(argv)
    if rc != 0:
        raise RuntimeError(f"`runtime {' '.join(argv)}` exited with status {rc}")


def run_demo(out: str | Path, profile: str = "demo", n: int = 1200, resume: bool = False, site: int = 0,
             backend: str = "ray") -> int:
    from runtime import signing
    from training.federated.run import run_federated

    out = Path(out)
    prof = cfgmod.get_profile(profile)
    phase = Phases()
    print(f"MedFedPure demo: {prof.federated.sites} simulated hospitals, {n} synthetic phantoms, profile {profile}; "
          f"outputs in {out}/")
    with phase("federated training"):
        summary = run_federated(prof, f"synth:{n}", out, resume=resume, threads_per_site=1, backend=backend)
    bundle, pub = out / f"bundle-site-{site}", signing.default_signing_key().with_suffix(".pub")
    with phase("export"):
        from export.bundle import export_site

        export_site(out, site, bundle, force=True, int8=False, parity_scans=16, torch_programs=False,
                    log=lambda *_: None)
        print(f"signed bundle {bundle} (key {pub})")
    scans = out / "heldout-scans"
    with phase("held-out scans as files"):
        labels_csv = write_heldout_scans(out, site, scans)
        print(f"{sum(1 for _ in scans.iterdir())} files in {scans}/ (PNG and DICOM), labels in {labels_csv}")
    records = out / "runtime-results.jsonl"
    with phase("runtime infer"):
        _runtime(["infer", str(scans), "--bundle", str(bundle), "--trusted-key", str(pub), "--threads", "2",
                  "--out", str(records), "--quiet"])
        score = score_records(records, labels_csv)
        (out / "runtime-accuracy.json").write_text(json.dumps(score, indent=1))
        print(f"{score['correct']}/{score['files']} held-out files right ({100 * score['accuracy']:.1f} %), "
              f"{score['refused']} refused, {score['flagged']} flagged")
    bench = out / "bench"
    with phase("runtime bench"):
        from benchmarks.traffic import make_traffic

        make_traffic(str(out), str(bench / "traffic.npz"), site=site, n=32)
        _runtime(["bench", "--bundle", str(bundle), "--data", str(bench / "traffic.npz"), "--trusted-key", str(pub),
                  "--traffic", "clean,attacked", "--batch-sizes", "1", "--iters", "40", "--threads", "2",
                  "--out", str(bench), "--quiet"])
        b = json.loads((bench / "bench.json").read_text())
    with phase("report"):
        from training.html_report import write_html_report

        report = write_html_report(out, bench=bench, infer=out / "runtime-accuracy.json")
    _closing(out, summary, score, b, bundle, scans, records, bench, report, pub, phase)
    return 0


def _closing(out, summary, score, bench, bundle, scans, records, bench_dir, report, pub, phase) -> None:
    lat = {c["traffic"]: c["latency_ms"] for c in bench["configs"]}
    print(f"\n{'=' * 72}\nMedFedPure demo finished in {phase.elapsed / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in phase.times.items())})\n")
    print(f"Federated training, {summary['sites']} hospitals: mean clean accuracy through the defended pipeline "
          f"{100 * summary['mean_clean_acc']:.1f} %, under PGD {100 * summary['mean_pgd_acc']:.1f} % "
          f"(each site's own test phantoms; per site in {out}/summary.md)")
    print(f"Scanner side (runtime, ONNX Runtime, no torch): {score['correct']}/{score['files']} held-out files "
          f"diagnosed right ({100 * score['accuracy']:.1f} %), sensitivity {100 * score['sensitivity']:.1f} %")
    for kind, v in lat.items():
        print(f"Latency, {kind} traffic, one scan at a time: p50 {v['p50']:.1f} ms, p95 {v['p95']:.1f} ms")
    print("\nArtefacts:")
    for what, path in (("run (models, per-round metrics)", out), ("summary", out / "summary.md"),
                       ("signed bundle", bundle), ("held-out scan files", scans), ("runtime records", records),
                       ("benchmark", bench_dir / "bench.md"), ("one-page report", report)):
        print(f"  {what:34s} {path}")
    print("\nNext, with your own data:")
    print(f"  runtime info --bundle {bundle} --trusted-key {pub}")
    print(f"  runtime infer /path/to/scans --bundle {bundle} --trusted-key {pub} --out results.csv")
    print("  python -m training train --method medfedpure --profile edge --data /path/to/scans --sites 4 --out runs/mine")
    print("  python -m export --run runs/mine --site 0 --out bundles/mine-site-0")
