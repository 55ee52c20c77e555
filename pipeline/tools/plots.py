"""Plots from run directories (read from ``metrics.jsonl``, so they work on finished or live runs).

    python launch/plots.py agvm runs/NAME [runs/OTHER ...] [--out FILE]

``agvm`` draws AGVM's Phi and mu per module over iterations (the AGVM paper's Figure 1
view): one row per run, Phi on the left (log scale), mu on the right. ``plot_series``
draws a study's rows (AP vs global batch, time vs batch, memory vs parameters).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.train.tracking import read_metrics  # noqa: E402


def agvm_series(run_dir: Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{"phi"|"mu": {module: (iterations, values)}} from a run's AGVM records."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {"phi": {}, "mu": {}}
    for record in read_metrics(run_dir):
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "agvm" and parts[1] in out:
                its, values = out[parts[1]].setdefault(parts[2], ([], []))
                its.append(record["iteration"])
                values.append(value)
    return out


def plot_agvm(run_dirs: list[Path], out: Path) -> Path:
    series = {d: agvm_series(d) for d in run_dirs}
    empty = [str(d) for d, s in series.items() if not s["phi"]]
    if empty:
        raise SystemExit(f"no AGVM records (agvm/phi/...) in {', '.join(empty)}/metrics.jsonl: "
                         "was it trained with optim.name=agvm_sgd or agvm_adamw?")
    fig, axes = plt.subplots(len(run_dirs), 2, figsize=(11, 3.6 * len(run_dirs)), squeeze=False)
    for row, (run_dir, s) in zip(axes, series.items()):
        for module, (its, values) in s["phi"].items():
            row[0].plot(its, values, label=module)
        for module, (its, values) in s["mu"].items():
            row[1].plot(its, values, label=module)
        row[0].set(title=f"{run_dir.name}: Phi = 1 - cos(G1, G2)", xlabel="iteration", yscale="log")
        row[1].set(title=f"{run_dir.name}: mu (lr multiplier)", xlabel="iteration")
        row[1].axhline(1.0, color="grey", lw=0.5)
        row[0].legend(fontsize=8)
        row[1].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_series(rows: list[dict], x: str, y: str, series: "callable", out: Path, title: str,
                logx: bool = True, marked: "callable" = None, baseline: float | None = None) -> Path | None:
    """One line per ``series(row)`` of ``y`` against ``x``, with error bars where rows carry
    ``<y>_std`` (merged seeds); rows where ``marked(row)`` (e.g. diverged) are crosses at the
    bottom in their line's colour; ``baseline``: a horizontal reference line (e.g. 0 for differences).
    None when no row has both values."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    crosses: dict[str, list[float]] = {}
    for row in rows:
        if row.get(x) is None:
            continue
        if marked is not None and marked(row):
            crosses.setdefault(series(row), []).append(row[x])
        elif row.get(y) is not None:
            lines.setdefault(series(row), []).append((row[x], row[y], row.get(f"{y}_std") or 0.0))
    if not lines and not crosses:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, label in enumerate(sorted(set(lines) | set(crosses))):
        colour = f"C{k % 10}"
        points = sorted(lines.get(label, []))
        xs, ys, errs = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        if any(errs):  # mean +- standard deviation over seeds
            ax.errorbar(xs, ys, yerr=errs, marker="o", color=colour, label=label, capsize=3)
        else:
            ax.plot(xs, ys, marker="o", color=colour, label=label)
        if label in crosses:  # side by side, so several diverged series at one x stay visible
            xs = [v * (1 + 0.04 * k) for v in crosses[label]]
            ax.scatter(xs, [0] * len(xs), marker="x", color=colour, s=70, zorder=3, label=f"{label}: diverged")
    if baseline is not None:
        ax.axhline(baseline, color="black", linewidth=0.8)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=x, ylabel=y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/plots.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    agvm = sub.add_parser("agvm", help="Phi and mu per module over iterations")
    agvm.add_argument("run_dirs", nargs="+", type=Path)
    agvm.add_argument("--out", type=Path, help="image file (default: <first run>/agvm_phi_mu.png)")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        parser.error(f"no metrics.jsonl in {', '.join(missing)}: pass run directories (runs/NAME)")
    out = plot_agvm(args.run_dirs, args.out or args.run_dirs[0] / "agvm_phi_mu.png")
    print(f"wrote {out}")
    return 0


def cli() -> None:
    """The command (``launch/plots.py``): ``main`` with its exit status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
