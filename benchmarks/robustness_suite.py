"""Collect attack-suite reports (``RUN/reports/suite*.json``) into one ``suite.json`` and ``suite.md``.

``python -m benchmarks.robustness_suite LABEL=RUN/reports/suite-X.json ... --out benchmarks/results/robustness-suite``

Each entry keeps its report as written by ``python -m training evaluate --threat suite`` (per attack
``{name, params, scans, robust_acc, flag_rate, seconds, worst_of_n, majority_of_n}``, ``worst_case``,
``worst_of_n``, ``majority_of_n``, ``clean``); the markdown puts them side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.markdown import table


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def collect(entries: list[tuple[str, Path]], out: Path) -> dict:
    reports = {}
    for label, path in entries:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no suite report (run `python -m training evaluate --threat suite` first)")
        reports[label] = json.loads(path.read_text()) | {"report_file": str(path)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps({"runs": reports}, indent=1))
    names = []
    for r in reports.values():
        names += [a["name"] for a in r["attacks"] if a["name"] not in names]
    labels = list(reports)
    runs = list(reports.values())

    def cell(d):
        return "" if d is None else f"{_pct(d['robust_acc'])} ({_pct(d['worst_of_n'])}) [{d['scans']}]"

    rows = [["clean", *(cell(r["clean"]) for r in runs)]]
    rows += [[n, *(cell(next((a for a in r["attacks"] if a["name"] == n), None)) for r in runs)] for n in names]
    rows.append(["**worst case over the suite**", *(f"**{_pct(r['worst_case']['robust_acc'])}** "
                                                    f"({_pct(r['worst_case']['worst_of_n'])}) [{r['worst_case']['scans']}]"
                                                    for r in runs)])
    rows.append(["strongest attack", *(r["worst_case"]["strongest"] for r in runs)])
    rows.append(["defense", *(f"{r['defense'].get('mode', 'adaptive')}, {r['defense'].get('draws', 1)} draw(s), "
                              f"t* {r['defense']['t_min']}..{r['defense']['t_max']}" for r in runs)])
    rows.append(["split, minutes", *(f"{r.get('split', 'test')}, {r['seconds'] / 60:.1f}" for r in runs)])
    lines = ["# Attack suite: accuracy through the real system (one purification draw; worst of N in brackets)", "",
             *table(["", *(f"`{k}`" for k in labels)], rows)]
    lines += ["", "Cells: accuracy on one draw (worst of N draws) [scans]."]
    (out / "suite.md").write_text("\n".join(lines) + "\n")
    return reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.robustness_suite", description=__doc__.splitlines()[0])
    p.add_argument("entries", nargs="+", metavar="LABEL=SUITE_JSON")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    entries = []
    for e in a.entries:
        label, sep, path = e.partition("=")
        if not sep:
            print(f"error: {e!r} is not LABEL=SUITE_JSON", file=sys.stderr)
            return 2
        entries.append((label, Path(path)))
    try:
        collect(entries, Path(a.out))
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}/suite.json and suite.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
