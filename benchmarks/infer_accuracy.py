"""`runtime infer` on a run's test split, scored: accuracy, flag rate and per-stage milliseconds.

``python -m benchmarks.infer_accuracy files --run RUN [--site S] --out LIST.txt``
    writes the test split's image paths (as the data source names them), one per line;
``runtime infer $(cat LIST.txt) --bundle B --out results.jsonl``
    classifies them with the torch-free runtime (from the original image files);
``python -m benchmarks.infer_accuracy score --run RUN [--site S] --results results.jsonl [--reference robustness.json]``
    prints accuracy against the split's labels, flag rate, median per-stage
    milliseconds and, with ``--reference``, the PyTorch pipeline's clean
    accuracy on the same scans.

Labels are read from the split here, after inference: ``runtime infer`` never
sees them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _test_split(run: str, site: int):
    from benchmarks.traffic import load_site

    return load_site(run, site)[1].data


def _source_root(run: str) -> Path:
    from training.runs import read_source

    return Path(read_source(run))


def cmd_files(args) -> int:
    data = _test_split(args.run, args.site)
    root = _source_root(args.run)
    paths = [str(p if Path(p).is_absolute() else root / p) for p in data["test"].paths]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} test files are not on disk, e.g. {missing[0]}")
    Path(args.out).write_text("\n".join(paths) + "\n")
    print(f"{len(paths)} test scans listed in {args.out}")
    return 0


def score(run: str, site: int, results: str, reference: str | None = None) -> dict:
    data = _test_split(run, site)
    root = _source_root(run)
    test = data["test"]
    label_of = {str(Path(p if Path(p).is_absolute() else root / p).resolve()): int(y) for p, y in zip(test.paths, test.labels)}
    names = data.class_names
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    hits, n, flagged, failed, unknown = 0, 0, 0, 0, 0
    ms: dict[str, list[float]] = {}
    for r in rows:
        key = str(Path(r["file"]).resolve())
        if r.get("error"):
            failed += 1
            continue
        if key not in label_of:
            unknown += 1
            continue
        n += 1
        hits += int(r["prediction"] == names[label_of[key]])
        flagged += int(r["flagged"])
        for stage, v in r["ms"].items():
            ms.setdefault(stage, []).append(float(v))
    out = {"run": run, "site": site, "results": results, "scans": n, "failed": failed, "not_in_split": unknown,
           "accuracy": hits / max(n, 1), "flag_rate": flagged / max(n, 1),
           "median_ms": {k: float(np.median(v)) for k, v in ms.items()},
           "engine": rows[0].get("engine") if rows else None, "provider": rows[0].get("provider") if rows else None}
    out["median_ms_total"] = float(np.median(np.sum([ms[k] for k in ms], axis=0))) if ms else 0.0
    if reference:
        ref = json.loads(Path(reference).read_text())
        match = [x for x in ref["sites"] if x["site"] == site]
        if not match:
            have = ", ".join(str(x["site"]) for x in ref["sites"]) or "none"
            raise ValueError(f"{reference} has no site {site} (its sites: {have})")
        s = match[0]
        out["reference"] = {"file": reference, "clean_acc_pipeline": s["clean"]["acc"], "n": s["clean"]["n"],
                            "flag_rate": s["clean"].get("flag_rate")}
    return out


def cmd_score(args) -> int:
    r = score(args.run, args.site, args.results, args.reference)
    print(json.dumps(r, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.infer_accuracy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("files")
    f.add_argument("--run", required=True)
    f.add_argument("--site", type=int, default=0)
    f.add_argument("--out", required=True)
    f.set_defaults(func=cmd_files)
    s = sub.add_parser("score")
    s.add_argument("--run", required=True)
    s.add_argument("--site", type=int, default=0)
    s.add_argument("--results", required=True)
    s.add_argument("--reference", help="RUN/reports/robustness.json of the PyTorch pipeline")
    s.add_argument("--out", help="write the summary as JSON")
    s.set_defaults(func=cmd_score)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
