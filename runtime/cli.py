"""``runtime``: the scanner-side command (no torch).

Commands:

- ``runtime infer INPUT... --bundle DIR --engine ort|trt|torch [--out F.jsonl|F.csv]``:
  preprocess -> detect -> purify the flagged scans -> classify. One record
  per input: file and its sha256, prediction and its probability, all
  probabilities, detection score, flag, t*, purification steps, per-stage
  milliseconds (detect / purify / classify are the scan's share of its
  batch), the noise seed, engine, provider and precision, and an error
  (null when it succeeded). A file that cannot be read gets its error in its
  record and the others go on. Exit 0: every input succeeded; 3: some failed
  (the rest are written); 2: usage error (no bundle, nothing to read, ...).
- ``runtime info --bundle DIR``: verify a bundle and print what it holds.
- ``runtime bench --bundle DIR --data TRAFFIC.npz --batch-sizes 1,8,32 --traffic clean,attacked --out DIR``:
  latency percentiles, per-stage time, throughput, flag rate, first-run
  cost, memory and the machine (``runtime/bench.py``).
- ``runtime calibrate --bundle DIR --clean DIR --flag-rate 0.05 --out NEW``:
  tau from a site's own clean scans, written into a copy of the bundle with a
  new manifest (the files and their sha256 are unchanged).
- ``runtime preprocess INPUT... --out DIR``: the shared preprocessing
  (crop to the head, pad to square, resize, [0, 1]) applied to image files or
  folders, written as 8-bit PNG plus ``index.csv`` (source, original size,
  status). Shows exactly what the models will see.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from runtime.imageio import ImageReadError, list_images, read_image
from runtime.preprocess import PreprocessConfig, preprocess

GLOB_CHARS = "*?["


def _inputs(paths: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to read, and (path, reason) for inputs that name nothing readable.

    An input is a file, a folder (searched recursively for supported
    suffixes) or a glob pattern. A usage error (nothing at all to read) is a
    ``ValueError``; a missing path among others is reported, not fatal.
    """
    import glob

    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = list_images(p)
            if not found:
                missing.append((p, "folder holds no PNG, JPEG, TIFF or DICOM files"))
            files += found
        elif p.exists():
            files.append(p)
        elif any(c in raw for c in GLOB_CHARS):
            found = sorted(Path(m) for m in glob.glob(raw, recursive=True) if Path(m).is_file())
            if not found:
                missing.append((p, "pattern matches no files"))
            files += found
        else:
            missing.append((p, "no such file or folder"))
    if not files:
        reasons = "; ".join(f"{m}: {r}" for m, r in missing) or "no inputs"
        raise ValueError(f"nothing to read ({reasons})")
    return files, missing


def _provider(engine) -> str:
    d = engine.describe()
    if d.get("engine") == "ort":
        return sorted({v[0] for v in d["providers"].values()})[0] if d.get("providers") else "?"
    if d.get("engine") == "trt":
        return f"TensorRT {d.get('tensorrt')} {d.get('gpu')}"
    return f"torch {d.get('device')}"


def cmd_preprocess(args) -> int:
    import cv2

    cfg = PreprocessConfig(size=args.size)
    files, missing = _inputs(args.inputs)
    for m, reason in missing:
        print(f"skipped {m}: {reason}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, bad = [], 0
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
        name = f"{i:06d}_{f.stem}.png"
        cv2.imwrite(str(out / name), np.round(x * 255.0).astype(np.uint8))
        rows.append({"source": str(f), "output": name, "height": img.shape[0], "width": img.shape[1], "status": "ok"})
        if not args.quiet and (i % 100 == 0 or i == len(files)):
            print(f"  {i}/{len(files)} files", file=sys.stderr)
    with open(out / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["source", "output", "height", "width", "status"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows) - bad} preprocessed scans ({cfg.size} px) to {out}" + (f"; skipped {bad}" if bad else ""))
    return 0


class _Writer:
    """One record per scan to stdout, a JSON-lines file or a CSV file (by the suffix of ``--out``)."""

    def __init__(self, out: str | None, class_names: list[str]):
        self.csv = bool(out) and out.lower().endswith(".csv")
        self.fh = open(out, "w", newline="") if out else sys.stdout
        self.owned = bool(out)
        if self.csv:
            self.fields = (["file", "sha256", "prediction", "probability"] + [f"prob_{c}" for c in class_names]
                           + ["score", "flagged", "t_star", "purification_steps", "ms_preprocess", "ms_detect",
                              "ms_purify", "ms_classify", "seed", "engine", "provider", "precision", "error"])
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

    def close(self) -> None:
        if self.owned:
            self.fh.close()


def _file_sha256(path: Path) -> str | None:
    from runtime.bundle import sha256

    try:
        return sha256(path)
    except OSError:
        return None


def cmd_infer(args) -> int:
    import json
    import time

    from runtime.bundle import Bundle
    from runtime.engines import make_engine
    from runtime.pipeline import Pipeline, PurifyConfig

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    files, missing = _inputs(args.inputs)
    t_load = time.perf_counter()
    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    engine = make_engine(bundle, args.engine, args.device, args.precision, args.threads, log=lambda s: print(s, file=sys.stderr))
    pipe = Pipeline(engine, PurifyConfig.from_manifest(m))
    t_load = time.perf_counter() - t_load
    cfg = bundle.preprocess_config
    names = bundle.class_names
    provider = _provider(engine)
    steps = pipe.cfg.steps
    base = {"engine": args.engine, "provider": provider, "precision": args.precision}
    out = _Writer(args.out, names)
    done = bad = flagged = 0
    total = len(files) + len(missing)
    show = not args.quiet and total > 1
    last_shown = time.perf_counter()
    try:
        for f, reason in missing:
            out.write({"file": str(f), "sha256": None, "error": reason, **base})
            bad += 1
        for start in range(0, len(files), args.batch_size):
            chunk, xs, pre_ms, shas = [], [], [], []
            for f in files[start : start + args.batch_size]:
                t0 = time.perf_counter()
                try:
                    x = preprocess(read_image(f), cfg)
                except (ImageReadError, ValueError, MemoryError, OSError) as err:
                    bad += 1
                    reason = err.reason if isinstance(err, ImageReadError) else (str(err) or type(err).__name__)
                    out.write({"file": str(f), "sha256": _file_sha256(f), "error": reason, **base})
                    continue
                pre_ms.append(1000.0 * (time.perf_counter() - t0))
                xs.append(x)
                chunk.append(f)
                shas.append(_file_sha256(f))
            if xs:
                seed = args.seed + start
                res = pipe.run(np.stack(xs)[:, None], seed=seed)
                n, n_flag = len(chunk), int(res["flagged"].sum())
                tm = res["timings"]
                for i, f in enumerate(chunk):
                    k = int(res["probs"][i].argmax())
                    is_flagged = bool(res["flagged"][i])
                    t_star = int(res["t_star"][i])
                    out.write({
                        "file": str(f), "sha256": shas[i], "prediction": names[k],
                        "probability": round(float(res["probs"][i][k]), 6),
                        "probabilities": {c: round(float(p), 6) for c, p in zip(names, res["probs"][i])},
                        "score": float(res["scores"][i]), "flagged": is_flagged, "t_star": t_star,
                        "purification_steps": (steps or t_star) if is_flagged else 0,
                        "ms": {"preprocess": round(pre_ms[i], 3), "detect": round(1000.0 * tm["detect"] / n, 3),
                               "purify": round(1000.0 * tm["purify"] / n_flag, 3) if is_flagged else 0.0,
                               "classify": round(1000.0 * tm["classify"] / n, 3)},
                        "seed": seed, **base, "error": None,
                    })
                done += n
                flagged += n_flag
            out.flush()
            if show and (time.perf_counter() - last_shown > 2.0 or start + args.batch_size >= len(files)):
                last_shown = time.perf_counter()
                print(f"  {done + bad}/{total} inputs ({bad} failed)", file=sys.stderr)
    finally:
        out.close()
    print(f"{done} scans classified ({flagged} flagged and purified){f', {bad} failed' if bad else ''}; "
          f"engine {json.dumps(engine.describe())}; load {t_load:.1f} s" + (f"; results in {args.out}" if args.out else ""),
          file=sys.stderr)
    return 3 if bad else 0


def cmd_info(args) -> int:
    import json

    from runtime.bundle import Bundle

    bundle = Bundle.load(args.bundle)  # verifies every sha256
    m = bundle.manifest
    d, pur = m["detector"], m["purification"]
    prov = m.get("provenance", {})
    metrics = prov.get("metrics", {})
    lines = [
        f"bundle {bundle.path}: verified (schema {m['schema_version']}, {len(m['files'])} files, every sha256 matches)",
        f"  created       {m.get('created', '?')}",
        f"  classes       {', '.join(bundle.class_names)}",
        f"  input         {m['input']['shape']} float32 in [0, 1]; preprocessing {json.dumps(m['preprocessing'])}",
        f"  detector      {d.get('score', '?')}",
        f"  tau           {d['tau']:.6g} ({d['calibration'].get('flag_rate')} clean flag rate on "
        f"{d['calibration'].get('n_scans')} {d['calibration'].get('split')} scans)",
        f"  purification  t* {pur['t_star']['t_min']}..{pur['t_star']['t_max']}, "
        f"{pur['steps'] or 'every'} step(s), {pur.get('sampler', '')}",
        f"  provenance    run {prov.get('run', '?')}, site {prov.get('site', '?')}, code {prov.get('code_revision', '?')}, "
        f"split {str(prov.get('split_digest', '?'))[:12]}",
    ]
    if metrics:
        lines.append(f"  measured      {json.dumps(metrics)}")
    for name, meta in sorted(m["files"].items()):
        lines.append(f"  {name:22s} {meta['bytes'] / 1e6:8.2f} MB  {meta['sha256'][:16]}")
    print("\n".join(lines))
    return 0


def cmd_calibrate(args) -> int:
    import datetime as dt
    import json
    import shutil

    from runtime.bundle import Bundle
    from runtime.engines import make_engine

    if not 0.0 < args.flag_rate < 1.0:
        raise ValueError(f"--flag-rate must be in (0, 1), got {args.flag_rate}")
    bundle = Bundle.load(args.bundle)
    out = Path(args.out)
    if out.resolve() == bundle.path.resolve():
        raise ValueError("--out must be a new folder; the original bundle is kept as it is")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new --out")
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
            except (ImageReadError, ValueError) as err:
                skipped += 1
                print(f"skipped {f}: {err.reason if isinstance(err, ImageReadError) else err}", file=sys.stderr)
        if xs:
            scores.append(np.asarray(engine.score(np.stack(xs)[:, None].astype(np.float32))))
        if not args.quiet and len(files) > args.batch_size:
            print(f"  {min(start + args.batch_size, len(files))}/{len(files)} clean scans scored", file=sys.stderr)
    s = np.concatenate(scores) if scores else np.zeros(0)
    if len(s) < args.min_scans:
        raise ValueError(f"only {len(s)} readable clean scans; at least {args.min_scans} are needed to set tau "
                         f"at a {args.flag_rate:g} flag rate")
    tau = float(np.quantile(s.astype(np.float64), 1.0 - args.flag_rate))
    m = json.loads(json.dumps(bundle.manifest))
    old = m["detector"]
    m["detector"] = {**old, "tau": tau, "calibration": {
        "rule": old["calibration"].get("rule", "tau"), "flag_rate": args.flag_rate, "split": "site clean scans",
        "n_scans": int(len(s)), "source": str(Path(args.clean[0]) if len(args.clean) == 1 else args.clean),
        "statistic": "quantile 1 - flag_rate of clean scores", "engine": args.engine,
        "calibrated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "previous": {"tau": old["tau"], "calibration": old.get("calibration")}}}
    out.mkdir(parents=True, exist_ok=True)
    for name in m["files"]:
        shutil.copy2(bundle.path / name, out / name)
    (out / "manifest.json").write_text(json.dumps(m, indent=1))
    Bundle.load(out)  # the copy verifies against its manifest
    print(f"tau {tau:.6g} (was {old['tau']:.6g}) from {len(s)} clean scans at a {args.flag_rate:g} flag rate"
          f"{f'; {skipped} unreadable skipped' if skipped else ''}; new bundle {out}")
    return 0


def cmd_bench(args) -> int:
    from runtime.bench import run_bench, write_reports

    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    r = run_bench(args.bundle, args.data, engine=args.engine, device=args.device, precision=args.precision,
                  threads=args.threads, batch_sizes=sizes, traffics=[t for t in args.traffic.split(",") if t],
                  modes=[m for m in args.mode.split(",") if m], iters=args.iters, seconds=args.seconds,
                  warmup=args.warmup, seed=args.seed, gpu_hour_price=args.gpu_hour_price,
                  log=(lambda *_: None) if args.quiet else (lambda s: print(s, file=sys.stderr)))
    out = write_reports(r, args.out)
    print(f"wrote {out}/bench.json, bench.md and bench.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runtime", description="MedFedPure at the scanner (no torch needed).")
    sub = p.add_subparsers(dest="command", required=True)
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
    inf.add_argument("--seed", type=int, default=0, help="purification noise seed (recorded with each result)")
    inf.add_argument("--out", help="results file: .jsonl (JSON lines) or .csv (default: JSON lines on stdout)")
    inf.add_argument("--skip-bad", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    inf.add_argument("--quiet", action="store_true")
    inf.set_defaults(func=cmd_infer)

    info = sub.add_parser("info", help="verify a bundle and print what it holds")
    info.add_argument("--bundle", required=True)
    info.set_defaults(func=cmd_info)

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
                   "every scan), classify (classifier only)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--iters", type=int, default=30, help="steady-state batches per configuration")
    g.add_argument("--seconds", type=float, default=0.0, help="steady-state seconds per configuration instead")
    b.add_argument("--warmup", type=int, default=3, help="batches run first and reported apart")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--gpu-hour-price", type=float, help="price of one machine hour: adds cost per 10,000 scans")
    b.add_argument("--out", required=True, help="report folder")
    b.add_argument("--quiet", action="store_true")
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
    cal.add_argument("--quiet", action="store_true")
    cal.set_defaults(func=cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImageReadError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
