"""The model-size study mode: parameters x ZeRO stage -> peak memory per rank and images/s.

Each cell (a study point: a backbone, a ZeRO stage, a world size) gets the memory planner's
estimate; where the estimate fits this machine, a few real training steps measure the peak and
the throughput too. Every cell says which it is: ``measured`` or ``estimated``. Cells are kept
in ``<study>/<point>/cell.json``, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.studies.spec import Point, Study, markdown_table, write_csv
from pipeline.tools.planner import GIB, build_plan, measure_peak

log = logging.getLogger(__name__)
COLUMNS = ["point", "backbone", "zero", "ranks", "parameters", "estimate_gib", "measured_gib", "error_pct",
           "images_per_s", "tflops_per_rank", "label"]


def machine_budget(ranks: int) -> float:
    """Bytes one rank may use here: 90% of a GPU, or 80% of the available RAM shared by the ranks."""
    if torch.cuda.is_available():
        if ranks > torch.cuda.device_count():
            return 0.0
        return 0.9 * torch.cuda.get_device_properties(0).total_memory
    available = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                         if ln.startswith("MemAvailable:"))) * 1024
    return 0.8 * available / ranks


def measure_cell(study: Study, point: Point, iters: int = 3) -> dict:
    """Estimate one cell, and measure it when the estimate fits this machine."""
    cfg = load_config(study.config, point.override_args())
    plan, probe = build_plan(cfg, point.ranks)
    budget = machine_budget(point.ranks)
    cell = {"point": point.name, **point.labels, "ranks": point.ranks, "parameters": plan.facts.parameters,
            "zero": point.labels.get("zero", plan.stage), "estimate_gib": plan.total / GIB,
            "budget_gib": budget / GIB, "label": "estimated",
            "components_gib": {k: v / GIB for k, v in plan.device.items()}}
    if plan.total < budget:
        summary = measure_peak(study.config, point.override_args(), point.ranks, iters)
        cell.update(measured_gib=summary["peak_mem_gib"], images_per_s=summary["images_per_s"],
                    tflops_per_rank=summary.get("tflops_per_rank"),
                    device=summary["device"], label="measured",
                    error_pct=100 * (cell["estimate_gib"] - summary["peak_mem_gib"]) / summary["peak_mem_gib"])
    return cell


def run_model_size_study(study: Study, iters: int = 3) -> None:
    from tqdm import tqdm

    for point in tqdm(study.points, desc=study.name, unit="cell"):
        path = study.run_dir(point) / "cell.json"
        if path.is_file():
            continue
        cell = measure_cell(study, point, iters)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell, indent=2))
        tqdm.write(f"{point.name}: {cell['parameters']:,} parameters, estimate {cell['estimate_gib']:.2f} GiB"
                   + (f", measured {cell['measured_gib']:.2f} GiB" if cell["label"] == "measured" else " (not run)"))


def report_model_size(study: Study) -> dict[str, Path]:
    """results.csv / results.md and memory_vs_parameters.png (filled: measured, hollow: estimated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(p.read_text()) for p in (study.run_dir(pt) / "cell.json" for pt in study.points) if p.is_file()]
    flat = [{k: v for k, v in r.items() if k != "components_gib"} for r in rows]
    out = {"csv": write_csv(flat, study.root / "results.csv")}
    out["md"] = study.root / "results.md"
    out["md"].write_text(f"# Model-size study {study.name}\n\nFrom `{study.source}`; peak memory per rank.\n\n"
                         + markdown_table(flat, COLUMNS))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for zero in sorted({str(r["zero"]) for r in rows}):
        mine = sorted((r for r in rows if str(r["zero"]) == zero), key=lambda r: r["parameters"])
        line, = ax.plot([r["parameters"] for r in mine], [r["estimate_gib"] for r in mine], "--", marker="o",
                        mfc="none", label=f"ZeRO-{zero} estimate")
        measured = [r for r in mine if r["label"] == "measured"]
        ax.plot([r["parameters"] for r in measured], [r["measured_gib"] for r in measured], "o",
                color=line.get_color(), label=f"ZeRO-{zero} measured")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="peak memory per rank (GiB)",
           title=f"{study.name}: memory vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["memory_vs_parameters"] = study.root / "memory_vs_parameters.png"
    fig.savefig(out["memory_vs_parameters"], dpi=120)
    plt.close(fig)
    return out
