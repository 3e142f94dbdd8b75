"""Convergence plot in the layout of the paper's Fig. 3: mean site accuracy per round, one line per method."""

from __future__ import annotations

import json
from pathlib import Path


def curves(run_dir: Path) -> tuple[str, list[int], list[float], list[float]]:
    """(method, rounds, mean clean acc, mean PGD acc) of a run's classifier evaluations."""
    from training.federated.server_app import nanmean, read_rows

    rows = [r for r in read_rows(run_dir) if r["phase"] == "classifier" and r["kind"] == "eval"]
    method = rows[0]["method"] if rows else Path(run_dir).name
    rounds = sorted({r["round"] for r in rows})
    clean = [nanmean([r for r in rows if r["round"] == k], "clean_acc") for k in rounds]
    pgd = [nanmean([r for r in rows if r["round"] == k], "pgd_acc") for k in rounds]
    return method, rounds, clean, pgd


def convergence_plot(run_dirs: list[str | Path], out: str | Path) -> Path | None:
    """Write the plot; returns its path (None when no run has a classifier evaluation yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [curves(Path(d)) for d in run_dirs]
    data = [d for d in data if d[1]]
    if not data:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for method, rounds, clean, pgd in data:
        axes[0].plot(rounds, clean, marker="o", label=method)
        axes[1].plot(rounds, pgd, marker="o", label=method)
    for ax, title in zip(axes, ("clean accuracy", "PGD accuracy (paper setting)")):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over sites")
    axes[1].legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    (out.with_suffix(".json")).write_text(json.dumps(
        [{"method": m, "rounds": r, "clean_acc": c, "pgd_acc": p} for m, r, c, p in data], indent=1))
    return out
