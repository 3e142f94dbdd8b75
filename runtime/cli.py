"""``runtime``: the scanner-side command (no torch).

Commands:

- ``runtime infer INPUT... --bundle DIR --engine ort|trt|torch``: preprocess ->
  detect -> purify the flagged scans -> classify; one JSON line per scan with
  the prediction, probabilities, detection score, flag, t* and the noise seed.
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


def _inputs(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += list_images(p)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise ValueError("no image files found in the given inputs")
    return files


def cmd_preprocess(args) -> int:
    import cv2

    cfg = PreprocessConfig(size=args.size)
    files = _inputs(args.inputs)
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


def cmd_infer(args) -> int:
    import json
    import time

    from runtime.bundle import Bundle
    from runtime.engines import make_engine
    from runtime.pipeline import Pipeline, PurifyConfig

    t_load = time.perf_counter()
    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    engine = make_engine(bundle, args.engine, args.device, args.precision, args.threads, log=lambda s: print(s, file=sys.stderr))
    pipe = Pipeline(engine, PurifyConfig.from_manifest(m))
    t_load = time.perf_counter() - t_load
    pp = m["preprocessing"]
    cfg = PreprocessConfig(size=int(pp["size"]), threshold=float(pp["threshold"]), margin=float(pp["margin"]),
                           normalize=bool(pp["normalize"]))
    files = _inputs(args.inputs)
    out = open(args.out, "w") if args.out else sys.stdout
    names = bundle.class_names
    done = bad = flagged = 0
    try:
        for start in range(0, len(files), args.batch_size):
            chunk, xs = [], []
            for f in files[start : start + args.batch_size]:
                try:
                    xs.append(preprocess(read_image(f), cfg))
                    chunk.append(f)
                except (ImageReadError, ValueError) as err:
                    if not args.skip_bad:
                        raise
                    bad += 1
                    reason = err.reason if isinstance(err, ImageReadError) else str(err)
                    out.write(json.dumps({"file": str(f), "error": reason}) + "\n")
            if not xs:
                continue
            seed = args.seed + start
            res = pipe.run(np.stack(xs)[:, None], seed=seed)
            for i, f in enumerate(chunk):
                k = int(res["probs"][i].argmax())
                out.write(json.dumps({
                    "file": str(f), "prediction": names[k], "probabilities": {n: round(float(p), 6) for n, p in zip(names, res["probs"][i])},
                    "score": float(res["scores"][i]), "flagged": bool(res["flagged"][i]), "t_star": int(res["t_star"][i]),
                    "seed": seed, "engine": args.engine, "precision": args.precision,
                }) + "\n")
            done += len(chunk)
            flagged += int(res["flagged"].sum())
            if not args.quiet:
                print(f"  {done}/{len(files)} scans", file=sys.stderr)
    finally:
        if args.out:
            out.close()
    print(f"{done} scans classified ({flagged} flagged and purified){f', {bad} unreadable' if bad else ''}; "
          f"engine {json.dumps(engine.describe())}; load {t_load:.1f} s" + (f"; results in {args.out}" if args.out else ""),
          file=sys.stderr)
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
    inf.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    inf.add_argument("--threads", type=int, default=0, help="CPU threads for ONNX Runtime (0: its default)")
    inf.add_argument("--batch-size", type=int, default=8)
    inf.add_argument("--seed", type=int, default=0, help="purification noise seed (recorded with each result)")
    inf.add_argument("--out", help="JSON lines file (default: stdout)")
    inf.add_argument("--skip-bad", action="store_true", help="report unreadable files and go on")
    inf.add_argument("--quiet", action="store_true")
    inf.set_defaults(func=cmd_infer)
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
