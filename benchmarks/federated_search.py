"""The federated recipe search's table: one row per run, chosen on validation scans, test figures beside.

``python -m benchmarks.federated_search runs/search/* --out benchmarks/results/federated-br35h/ablation``

Each run is a finished federated run folder (``python -m training train --method ...``); its
``summary.json`` holds, per site, the figures on the site's own validation scans and on the pooled
validation scans (the choice), and on the site's own test scans and the pooled test scans (the report).
The rows are ranked by the mean over sites of the pooled validation balanced accuracy, then the sites'
own validation balanced accuracy (PROTOCOL.md rule 10: choose on validation scans, report test scans).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from runtime.markdown import table
from training import config as cfgmod

KEYS = (  # summary.json key -> column
    ("mean_pooled_val_balanced_acc", "pooled val bal."),
    ("mean_val_balanced_acc", "site val bal."),
    ("mean_clean_acc", "site test acc"),
    ("min_site_clean_acc", "worst site test acc"),
    ("mean_balanced_acc", "site test bal."),
    ("mean_pooled_balanced_acc", "pooled test bal."),
    ("min_pooled_balanced_acc", "worst site pooled test bal."),
    ("mean_sensitivity", "sensitivity"),
)


def _recipe(run: Path) -> str:
    """What differs in a run's configuration from its profile's defaults, as ``key=value`` items."""
    p = cfgmod.load_toml(run / "config.toml")
    base = cfgmod.to_dict(cfgmod.get_profile(p.name))
    mine = cfgmod.to_dict(p)
    out = []

    def walk(a, b, prefix):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict) and not k.endswith("kwargs"):
                walk(a[k], v, f"{prefix}{k}.")
            elif a.get(k) != v and not k.startswith("eval") and "attack" not in prefix:
                out.append(f"{prefix}{k}={v}")

    walk(base, mine, "")
    return ", ".join(x.replace("federated.", "").replace("classifier.", "") for x in out)


def collect(runs: list[Path]) -> list[dict]:
    rows = []
    for run in runs:
        f = run / "summary.json"
        if not f.exists():
            continue
        s = json.loads(f.read_text())
        minutes = sum(s.get("phase_seconds", {}).values()) / 60 if s.get("phase_seconds") else float("nan")
        rows.append({"run": str(run), "method": s["method"], "recipe": _recipe(run), "minutes": minutes,
                     **{k: s.get(k, float("nan")) for k, _ in KEYS}})

    def rank(r):
        a, b = r["mean_pooled_val_balanced_acc"], r["mean_val_balanced_acc"]
        return (-(a if a == a else -1), -(b if b == b else -1))

    return sorted(rows, key=rank)


def pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def emit(out: Path | None, text: str, data) -> None:
    """Print ``text``; with ``out``, also write it to ``OUT.md`` and ``data`` to ``OUT.json``."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(text)


def render(rows: list[dict]) -> str:
    lines = table(["run", "method", "recipe (what differs from the profile)", *(c for _, c in KEYS), "train min"],
                  [[f"`{Path(r['run']).name}`", r["method"], r["recipe"] or "profile defaults",
                    *(pct(r[k]) for k, _ in KEYS), f"{r['minutes']:.1f}"] for r in rows],
                  align="lll" + "r" * (len(KEYS) + 1))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.federated_search", description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print)")
    args = ap.parse_args(argv)
    rows = collect(args.runs)
    if not rows:
        print("error: none of these folders holds a finished federated run (summary.json)", file=sys.stderr)
        return 2
    emit(args.out, render(rows), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
