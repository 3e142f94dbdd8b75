"""``runtime``: the scanner-side command (no torch).

Commands:

- ``runtime infer INPUT... --bundle DIR --engine ort|trt|torch [--out F.jsonl|F.csv]``:
  preprocess -> detect -> purify the flagged scans -> classify. One record
  per input: file and its sha256, prediction and its probability, all
  probabilities, detection score, flag, t*, purification steps, per-stage
  milliseconds (ood / detect / purify / classify are the scan's share of its
  batch), the out-of-distribution score and whether the scan was refused
  (a refused scan gets no diagnosis), the noise seed (derived from the scan's
  content and the site secret, so the same scan gets the same answer in any
  batch), engine, provider and precision, the bundle's signature, and an
  error (null when it succeeded). Every input named, directly or through a
  folder, gets one record; a file that cannot be read gets its error in its
  record and the others go on. Exit 0: every input succeeded (diagnosed or
  refused); 3: some failed (the rest are written); 2: usage or bundle error
  (no bundle, an unsigned or tampered bundle, nothing to read, ...).
- ``runtime info --bundle DIR``: verify a bundle and print what it holds and who signed it.
- ``runtime keygen --out KEY``: an Ed25519 key pair for signing (``runtime calibrate``).
- ``runtime bench --bundle DIR --data TRAFFIC.npz --batch-sizes 1,8,32 --traffic clean,attacked --out DIR``:
  latency percentiles, per-stage time, throughput, flag rate, first-run
  cost, memory and the machine (``runtime/bench.py``).
- ``runtime calibrate --bundle DIR --clean DIR --flag-rate 0.05 --out NEW``:
  tau from a site's own clean scans, written into a copy of the bundle with a
  new manifest (the files and their sha256 are unchanged), signed with the
  site's key (``--signing-key``); the manifest records the previous tau and signer.

Every command that reads a bundle verifies its signature against the keys
this machine trusts (``--trusted-key FILE`` or ``$MEDFEDPURE_HOME/trusted-keys``,
see ``runtime.signing``); ``--allow-unsigned`` runs an unsigned bundle or one
by an untrusted key, and every result record then says so. Errors are one
line on stderr, never a traceback.
- ``runtime preprocess INPUT... --out DIR``: the shared preprocessing
  (crop to the head, pad to square, resize, [0, 1]) applied to image files or
  folders, written as 8-bit PNG plus ``index.csv`` (source, original size,
  status). Shows exactly what the models will see.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from runtime.imageio import ImageReadError, read_image
from runtime.inference import Inference, trust_args
from runtime.preprocess import PreprocessConfig, preprocess


def _inputs(paths: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to read, and (path, reason) for every named input that will not be read (``runtime.inputs``).

    A usage error (nothing at all to read) is a ``ValueError``.
    """
    from runtime.inputs import collect

    items = collect(paths)
    files = [i.path for i in items if i.reason is None]
    skipped = [(i.path, i.reason) for i in items if i.reason is not None]
    if not files:
        reasons = "; ".join(f"{m}: {r}" for m, r in skipped[:5]) or "no inputs"
        raise ValueError(f"nothing to read ({reasons})")
    return files, skipped


def _check_out_file(out: str | None) -> None:
    """Refuse an ``--out`` that cannot be written before any work is done."""
    if not out:
        return
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"--out {out}: is a folder; name a results file (.jsonl or .csv)")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a folder")
    if not parent.is_dir():
        raise ValueError(f"--out {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--out {out}: not writable")


def cmd_preprocess(args) -> int:
    import cv2

    cfg = PreprocessConfig(size=args.size)
    files, missing = _inputs(args.inputs)
    for m, reason in missing:
        print(f"skipped {m}: {reason}", file=sys.stderr)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rows, bad = [], 0
    rows += [{"source": str(m), "output": "", "height": "", "width": "", "status": f"skipped: {r}"} for m, r in missing]
    bad += len(missing)
    for i, f in enumerate(files, 1):
        try:
            img = read_image(f)
            x = preprocess(img, cfg)
        except (ImageReadError, ValueError) as err:
            if not args.skip_bad:
                raise
            reason = err.reason if isinstance(err, ImageReadError) else str(err)
            bad += 1
            rows.append({"source": str(f), "output": "", "height": "", "width": "", "status": f"skipped: {reason}"})
            print(f"skipped {f}: {reason}", file=sys.stderr)
            continue
        name = f"{i:06d}_{f.stem[:100]}.png"
        ok, png = cv2.imencode(".png", np.round(x * 255.0).astype(np.uint8))
        _atomic_write(out / name, png.tobytes())
        rows.append({"source": str(f), "output": name, "height": img.shape[0], "width": img.shape[1], "status": "ok"})
        if not args.quiet and (i % 100 == 0 or i == len(files)):
            print(f"  {i}/{len(files)} files", file=sys.stderr)
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["source", "output", "height", "width", "status"])
    w.writeheader()
    w.writerows(rows)
    _atomic_write(out / "index.csv", buf.getvalue().encode())
    print(f"wrote {len(rows) - bad} preprocessed scans ({cfg.size} px) to {out}" + (f"; skipped {bad}" if bad else ""))
    return 0


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class _Writer:
    """One record per scan to stdout, a JSON-lines file or a CSV file (by the suffix of ``--out``).

    A results file is written as ``.NAME.partial`` beside it and renamed
    into place when the run ends; an interrupted run leaves the partial
    file, with every record written so far.
    """

    def __init__(self, out: str | None, class_names: list[str]):
        self.csv = bool(out) and out.lower().endswith(".csv")
        self.out = Path(out) if out else None
        self.partial = self.out.with_name(f".{self.out.name}.partial") if self.out else None
        self.fh = open(self.partial, "w", newline="") if self.out else sys.stdout
        self.owned = bool(out)
        if self.csv:
            self.fields = (["file", "sha256", "prediction", "probability"] + [f"prob_{c}" for c in class_names]
                           + ["refused", "ood_score", "score", "flagged", "t_star", "purification_steps",
                              "ms_preprocess", "ms_ood", "ms_detect", "ms_purify", "ms_classify", "seed", "engine",
                              "provider", "precision", "bundle_signature", "error"])
            self.writer = csv.DictWriter(self.fh, fieldnames=self.fields)
            self.writer.writeheader()

    def write(self, rec: dict) -> None:
        import json

        if self.csv:
            row = {k: v for k, v in rec.items() if k in self.fields}
            for c, v in (rec.get("probabilities") or {}).items():
                row[f"prob_{c}"] = v
            for k, v in (rec.get("ms") or {}).items():
                row[f"ms_{k}"] = v
            self.writer.writerow(row)
        else:
            self.fh.write(json.dumps(rec) + "\n")

    def flush(self) -> None:
        self.fh.flush()

    def close(self, complete: bool = True) -> None:
        if self.owned:
            self.fh.close()
            if complete:
                os.replace(self.partial, self.out)
            else:
                print(f"stopped early: the records written so far are in {self.partial}", file=sys.stderr)


def cmd_infer(args) -> int:
    import time

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    _check_out_file(args.out)
    files, missing = _inputs(args.inputs)
    job = Inference(args)
    out = _Writer(args.out, job.bundle.class_names)
    total, last_shown, complete = len(files) + len(missing), time.perf_counter(), False
    try:
        for f, reason in missing:
            out.write(job.skipped(f, reason))
        for start in range(0, len(files), args.batch_size):
            batch: dict[str, list] = {"files": [], "xs": [], "shas": [], "pre_ms": []}
            for f in files[start : start + args.batch_size]:
                t0 = time.perf_counter()
                x, sha, rec = job.read(f)
                if rec is not None:
                    out.write(rec)
                    continue
                for k, v in zip(("files", "xs", "shas", "pre_ms"), (f, x, sha, 1000.0 * (time.perf_counter() - t0))):
                    batch[k].append(v)
            if batch["xs"]:
                for rec in job.classify(**batch):
                    out.write(rec)
            out.flush()
            if not args.quiet and total > 1 and (time.perf_counter() - last_shown > 2.0
                                                 or start + args.batch_size >= len(files)):
                last_shown = time.perf_counter()
                print(f"  {min(total, len(missing) + start + args.batch_size)}/{total} inputs "
                      f"({job.counts['failed']} failed)", file=sys.stderr)
        complete = True
    finally:
        out.close(complete)
    print(job.summary(), file=sys.stderr)
    return 3 if job.counts["failed"] else 0


def cmd_info(args) -> int:
    import json

    from runtime.bundle import Bundle

    bundle = Bundle.load(args.bundle, **trust_args(args))  # checks the signature and every sha256
    m = bundle.manifest
    d, pur, o = m["detector"], m["purification"], m["ood"]
    prov = m.get("provenance", {}) if isinstance(m.get("provenance"), dict) else {}
    metrics = prov.get("metrics", {})
    prev = d["calibration"].get("previous") or {}
    lines = [
        f"bundle {bundle.path}: verified (schema {m['schema_version']}, {len(m['files'])} files, every sha256 matches)",
        f"  signature     {bundle.signature.describe()}",
        f"  created       {m.get('created', '?')}",
        f"  classes       {', '.join(bundle.class_names)}",
        f"  input         {m['input']['shape']} float32 in [0, 1]; preprocessing {json.dumps(m['preprocessing'])}",
        f"  detector      {d.get('score', '?')}",
        f"  tau           {d['tau']:.6g} ({d['calibration'].get('flag_rate')} clean flag rate on "
        f"{d['calibration'].get('n_scans')} {d['calibration'].get('split')} scans)"
        + (f"; recalibrated from tau {prev.get('tau'):.6g} (signed by key {prev.get('signed_by', '?')})"
           if isinstance(prev.get("tau"), (int, float)) else ""),
        f"  refusal       out-of-distribution score ({o.get('kind', '?')}) above {o['threshold']:.6g}: no diagnosis "
        f"({o.get('calibration', {}).get('refusal_rate')} of {o.get('calibration', {}).get('n_scans')} clean "
        f"{o.get('calibration', {}).get('split')} scans refused)",
        f"  purification  t* {pur['t_star']['t_min']}..{pur['t_star']['t_max']}, "
        f"{pur['steps'] or 'every'} step(s), {pur.get('sampler', '')}; "
        + ("every scan purified" if pur.get("mode") == "always" else "flagged scans purified")
        + (f", {pur['draws']} draws averaged" if pur.get("draws", 1) > 1 else ""),
        f"  provenance    run {prov.get('run', '?')}, site {prov.get('site', '?')}, code {prov.get('code_revision', '?')}, "
        f"split {str(prov.get('split_digest', '?'))[:12]}",
    ]
    if metrics:
        lines.append(f"  measured      {json.dumps(metrics)}")
    for name, meta in sorted(m["files"].items()):
        lines.append(f"  {name:22s} {meta['bytes'] / 1e6:8.2f} MB  {meta['sha256'][:16]}")
    print("\n".join(lines))
    return 0


def _calibration_out(out: str, bundle) -> Path:
    """``--out`` of ``runtime calibrate``: a new or empty folder, other than the bundle, in a writable folder."""
    out = Path(out)
    if out.resolve() == bundle.path.resolve():
        raise ValueError("--out must be a new folder; the original bundle is kept as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new --out")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder {out.parent} does not exist or is not writable")
    return out


def _clean_scores(args, bundle) -> tuple[np.ndarray, int]:
    """Detection scores of the readable scans of ``--clean`` (fp32), and how many could not be read."""
    from runtime.engines import make_engine

    files, missing = _inputs(args.clean)
    for f, reason in missing:
        print(f"skipped {f}: {reason}", file=sys.stderr)
    engine = make_engine(bundle, args.engine, args.device, "fp32", args.threads, log=lambda s: print(s, file=sys.stderr))
    cfg = bundle.preprocess_config
    scores, skipped = [], 0
    for start in range(0, len(files), args.batch_size):
        xs = []
        for f in files[start : start + args.batch_size]:
            try:
                xs.append(preprocess(read_image(f), cfg))
            except (ImageReadError, ValueError, OSError) as err:
                skipped += 1
                print(f"skipped {f}: {err.reason if isinstance(err, ImageReadError) else err}", file=sys.stderr)
        if xs:
            scores.append(np.asarray(engine.score(np.stack(xs)[:, None].astype(np.float32))))
        if not args.quiet and len(files) > args.batch_size:
            print(f"  {min(start + args.batch_size, len(files))}/{len(files)} clean scans scored", file=sys.stderr)
    return (np.concatenate(scores) if scores else np.zeros(0)), skipped


def _clean_tau(s: np.ndarray, flag_rate: float, min_scans: int) -> float:
    """tau: the ``1 - flag_rate`` quantile of the clean scores ``s``; refused with too few scans or out of range."""
    from runtime.bundle import MAX_SCORE

    if len(s) < min_scans:
        raise ValueError(f"only {len(s)} readable clean scans; at least {min_scans} are needed to set tau "
                         f"at a {flag_rate:g} flag rate")
    tau = float(np.quantile(s.astype(np.float64), 1.0 - flag_rate))
    if not np.isfinite(tau) or not 0.0 <= tau <= MAX_SCORE:
        raise ValueError(f"the clean scans give tau {tau!r}, outside [0, {MAX_SCORE}]: are they scans of this kind?")
    return tau


def _calibrated_manifest(bundle, args, tau: float, n_scans: int) -> dict:
    """A copy of the bundle's manifest with tau and its calibration replaced; the previous ones recorded in it."""
    import datetime as dt
    import json

    m = json.loads(json.dumps(bundle.manifest))
    old = m["detector"]
    m["detector"] = {**old, "tau": tau, "calibration": {
        "rule": old["calibration"].get("rule", "tau"), "flag_rate": args.flag_rate, "split": "site clean scans",
        "n_scans": n_scans, "source": str(Path(args.clean[0]) if len(args.clean) == 1 else args.clean),
        "statistic": "quantile 1 - flag_rate of clean scores", "engine": args.engine,
        "calibrated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "previous": {"tau": old["tau"], "calibration": old.get("calibration"),
                     "signed_by": bundle.signature.key_id, "signer": bundle.signature.signer}}}
    return m


def _write_signed_copy(bundle, m: dict, out: Path, key_path: Path, site_pub, signer: str) -> dict:
    """Write the bundle's files with manifest ``m`` to ``out``, signed with ``key_path`` and verified; the signature."""
    import json
    import shutil

    from runtime import signing
    from runtime.bundle import Bundle

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir()
        for name in m["files"]:  # plain names inside the bundle: Bundle.load checked every one
            shutil.copyfile(bundle.path / name, tmp / name)
        (tmp / "manifest.json").write_text(json.dumps(m, indent=1, allow_nan=False))
        sig = signing.sign_manifest(tmp, key_path, signer=signer, role="site calibration")
        trusted = {signing.key_id(site_pub): (site_pub, str(key_path))}
        signing.verify_manifest(tmp, (tmp / "manifest.json").read_bytes(), trusted=trusted)
        Bundle.load(tmp, allow_unsigned=True)  # the copy verifies against its manifest
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sig


def cmd_calibrate(args) -> int:
    from runtime import signing
    from runtime.bundle import Bundle

    if not 0.0 < args.flag_rate < 1.0:
        raise ValueError(f"--flag-rate must be in (0, 1), got {args.flag_rate}")
    bundle = Bundle.load(args.bundle, **trust_args(args))
    out = _calibration_out(args.out, bundle)
    key_path = signing.signing_key_path(args.signing_key, lambda m: print(m, file=sys.stderr),
                                        made="this site's signing key")
    site_pub = signing.load_public(key_path)
    s, skipped = _clean_scores(args, bundle)
    tau = _clean_tau(s, args.flag_rate, args.min_scans)
    m = _calibrated_manifest(bundle, args, tau, int(len(s)))
    sig = _write_signed_copy(bundle, m, out, key_path, site_pub, args.signer or f"site calibration ({out.name})")
    print(f"tau {tau:.6g} (was {bundle.manifest['detector']['tau']:.6g}) from {len(s)} clean scans at a "
          f"{args.flag_rate:g} flag rate{f'; {skipped} unreadable skipped' if skipped else ''}; new bundle {out}, "
          f"signed with key {sig['key_id']} ({key_path}; a scanner trusts it with --trusted-key "
          f"{key_path.with_suffix('.pub')})")
    return 0


def cmd_keygen(args) -> int:
    from runtime import signing

    key, pub = signing.generate_key(args.out)
    raw = signing.load_public(pub)
    line = f"wrote {key} (private, 0600) and {pub} (public); key id {signing.key_id(raw)}"
    if args.trust:
        d = signing.trusted_dir()
        d.mkdir(parents=True, exist_ok=True)
        dst = d / f"{signing.key_id(raw)}.pub"
        dst.write_bytes(pub.read_bytes())
        line += f"; trusted on this machine ({dst})"
    print(line)
    return 0


def cmd_bench(args) -> int:
    from runtime.bench import run_bench, write_reports

    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    r = run_bench(args.bundle, args.data, **trust_args(args), engine=args.engine, device=args.device, precision=args.precision,
                  threads=args.threads, batch_sizes=sizes, traffics=[t for t in args.traffic.split(",") if t],
                  modes=[m for m in args.mode.split(",") if m], iters=args.iters, seconds=args.seconds,
                  warmup=args.warmup, seed=args.seed, gpu_hour_price=args.gpu_hour_price,
                  log=(lambda *_: None) if args.quiet else (lambda s: print(s, file=sys.stderr)),
                  command=args.command_line)
    out = write_reports(r, args.out)
    print(f"wrote {out}/bench.json, bench.md and bench.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runtime", description="MedFedPure at the scanner (no torch needed).")
    sub = p.add_subparsers(dest="command", required=True)

    def trust(parser) -> None:
        parser.add_argument("--trusted-key", action="append", metavar="PUB",
                            help="public key (PEM) whose signed bundles are accepted, besides "
                                 "$MEDFEDPURE_HOME/trusted-keys/*.pub (repeatable)")
        parser.add_argument("--allow-unsigned", action="store_true",
                            help="run a bundle that is unsigned or signed by an untrusted key; every record says so")

    from runtime.serve import add_parser as add_serve

    add_serve(sub, trust)

    pp = sub.add_parser("preprocess", help="apply the shared preprocessing to images; write PNGs and index.csv")
    pp.add_argument("inputs", nargs="+", help="image files (PNG, JPEG, TIFF, DICOM) or folders")
    pp.add_argument("--out", required=True)
    pp.add_argument("--size", type=int, default=PreprocessConfig().size)
    pp.add_argument("--skip-bad", action="store_true", help="list and skip unreadable files instead of stopping")
    pp.add_argument("--quiet", action="store_true")
    pp.set_defaults(func=cmd_preprocess)

    inf = sub.add_parser("infer", help="classify scans behind the defense with a site's bundle")
    inf.add_argument("inputs", nargs="+", help="image files (PNG, JPEG, TIFF, DICOM) or folders")
    inf.add_argument("--bundle", required=True, help="bundle folder written by `python -m export`")
    inf.add_argument("--engine", choices=("ort", "trt", "torch"), default="ort")
    inf.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    inf.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                     help="int8: the int8 denoiser beside the fp32 classifier and detector (--engine ort)")
    inf.add_argument("--threads", type=int, default=0, help="CPU threads for ONNX Runtime (0: its default)")
    inf.add_argument("--batch-size", type=int, default=8)
    inf.add_argument("--seed", type=int, default=None,
                     help="use this purification noise seed for every scan (to reproduce a recorded result); "
                          "by default each scan's seed is derived from its content and the site secret")
    inf.add_argument("--draws", type=int, default=0,
                     help="purify each flagged scan this many times (each with its own noise) and average the "
                          "probabilities (default: the bundle's purification.draws, 1); seeds of draw d>0 follow "
                          "from the same content and secret (with --seed N: N + d)")
    inf.add_argument("--secret", help="the site secret file (default: BUNDLE.secret beside the bundle folder; "
                                      "made on first use, 0600)")
    inf.add_argument("--out", help="results file: .jsonl (JSON lines) or .csv (default: JSON lines on stdout)")
    inf.add_argument("--skip-bad", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    inf.add_argument("--quiet", action="store_true")
    trust(inf)
    inf.set_defaults(func=cmd_infer)

    info = sub.add_parser("info", help="verify a bundle and print what it holds and who signed it")
    info.add_argument("--bundle", required=True)
    trust(info)
    info.set_defaults(func=cmd_info)

    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles (runtime calibrate)")
    kg.add_argument("--out", required=True, help="private key file to write (its public key: same name, .pub)")
    kg.add_argument("--trust", action="store_true", help="also trust the public key on this machine")
    kg.set_defaults(func=cmd_keygen)

    b = sub.add_parser("bench", help="latency, throughput and the cost of safety; writes JSON, markdown and HTML")
    b.add_argument("--bundle", required=True)
    b.add_argument("--data", required=True, help="traffic file (.npz) from python -m benchmarks.traffic")
    b.add_argument("--engine", choices=("ort", "trt", "torch"), default="ort")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="int8: the int8 denoiser beside the fp32 classifier and detector (--engine ort)")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--batch-sizes", default="1,8,32", help="comma-separated")
    b.add_argument("--traffic", default="clean", help="comma-separated: clean, attacked, mix:F")
    b.add_argument("--mode", default="adaptive", help="comma-separated: adaptive (the defense), always (purify "
                   "every scan), classify (classifier only); MODE:D averages D purifications, e.g. always:3")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--iters", type=int, default=30, help="steady-state batches per configuration")
    g.add_argument("--seconds", type=float, default=0.0, help="steady-state seconds per configuration instead")
    b.add_argument("--warmup", type=int, default=3, help="batches run first and reported apart")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--gpu-hour-price", type=float, help="price of one machine hour: adds cost per 10,000 scans")
    b.add_argument("--out", required=True, help="report folder")
    b.add_argument("--quiet", action="store_true")
    trust(b)
    b.set_defaults(func=cmd_bench)

    cal = sub.add_parser("calibrate", help="re-derive tau from a site's own clean scans; writes a new bundle")
    cal.add_argument("--bundle", required=True)
    cal.add_argument("--clean", required=True, nargs="+", help="clean scans: files, folders or globs")
    cal.add_argument("--flag-rate", type=float, default=0.05, help="fraction of clean scans to flag")
    cal.add_argument("--out", required=True, help="new bundle folder (the original is left as it is)")
    cal.add_argument("--engine", choices=("ort", "trt", "torch"), default="ort")
    cal.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    cal.add_argument("--threads", type=int, default=0)
    cal.add_argument("--batch-size", type=int, default=16)
    cal.add_argument("--min-scans", type=int, default=20, help="fewest clean scans accepted")
    cal.add_argument("--signing-key", help="the site's Ed25519 private key that signs the new bundle "
                                          "(default: $MEDFEDPURE_HOME/signing/ed25519.key, made on first use)")
    cal.add_argument("--signer", help="name recorded as the signer")
    cal.add_argument("--quiet", action="store_true")
    trust(cal)
    cal.set_defaults(func=cmd_calibrate)
    return p


def _os_message(err: OSError) -> str:
    what = err.strerror or type(err).__name__
    return f"{err.filename}: {what}" if err.filename else what


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["runtime", *argv])
    try:
        return args.func(args)
    except (ImageReadError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`runtime info | head`): stop quietly, and keep Python's exit flush from failing too
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as err:  # unwritable --out, a full disk, a folder where a file was expected, ...
        print(f"error: {_os_message(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
