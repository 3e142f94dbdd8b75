"""``runtime``: the scanner-side command (no torch).

Commands:

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImageReadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
