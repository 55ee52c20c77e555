"""Run, plan or report a scaling study (a grid of training runs; see pipeline/studies/spec.py).

The command is ``launch/study.py``; this module is its logic.

    python launch/study.py studies/mini_batch_scaling.yaml            # run here, one point after another
    python launch/study.py STUDY --list                               # the points, nothing run
    python launch/study.py STUDY --plan --hostfile hosts --gpus-per-node 8   # launch_plan.sh for a cluster
    python launch/study.py STUDY --report                             # CSV, table and plots from what ran
    python launch/study.py STUDY --archive docs/studies/NAME/runs     # finished points' results, no checkpoints

Every point is validated for its launch shape (``pipeline.train.validate``) before the first one
starts. Running is resumable: finished points (trained to the end, or diverged) are skipped; a
point that crashes is retried once from its last checkpoint (train.resume=auto), then marked
failed in ``study_status.json`` and in the results, never dropped. A point that exits with a
configuration or data error (exit status 2) is marked failed at once: retrying cannot help.
The runner's exit status is 1 when any point failed. Each point is a W&B run in the group
named after the study.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tqdm import tqdm

from pipeline.checkpoint.manager import complete_tags
from pipeline.config import REPO_ROOT, load_config, resolve_repo_path
from pipeline.distributed.launcher import free_port
from pipeline.errors import EXIT_CONFIG, ConfigError
from pipeline.studies.spec import (STATUS_FILE, Comparison, Point, Study, aggregate_seeds, collect_rows, load_study,
                                   markdown_table, paired_differences, point_result, read_status, series_key, write_csv,
                                   write_status)
from pipeline.train.validate import validate
from pipeline.utils.files import write_json

if TYPE_CHECKING:
    from pipeline.tools.step_time import RunPrediction

# What a finished point's results are (``collect_rows``, the plots) without its checkpoints: an
# archive of them is a few tens of KB per point, small enough for git, and copied back into the
# study directory (``cp -r ARCHIVE/. runs/NAME/``) the runner counts those points as finished.
ARCHIVED_FILES = ("run_summary.json", "metrics.jsonl", "config.yaml", "model.json", "eval_metrics.json",
                  "schedule.json")
MAX_ATTEMPTS = 2  # the first run and one retry from the last checkpoint
RESULT_COLUMNS = ["point", "global_batch", "status", "AP", "AP50", "iterations", "wall_s", "images_per_s",
                  "tflops_per_rank", "mfu", "peak_mem_gib", "parameters"]


def train_args(study: Study, point: Point) -> list[str]:
    """launch/train.py's arguments for one point (the same on this machine and on a cluster)."""
    args = ["launch/train.py"] + (["--config", str(study.config)] if study.config else [])
    return args + point.override_args() + [
        f"train.output_dir={study.root}", f"train.run_name={point.name}", f"tracking.group={study.name}",
        "train.progress=false"]


def validate_points(study: Study, gpus_per_node: int | None = None) -> None:
    """Every point's experiment for its launch shape: ``point.ranks`` ranks, on this machine
    (``gpus_per_node=None``) or on nodes of ``gpus_per_node``. One ConfigError names every bad point."""
    errors = []
    for point in study.points:
        cfg = load_config(study.config, point.override_args() + [f"train.run_name={point.name}"])
        try:
            validate(cfg, point.ranks, gpus_per_node or point.ranks)
        except ConfigError as err:
            errors.append(f"point {point.name}: {err}")
    if errors:
        raise ConfigError(f"{study.source}: {len(errors)} of {len(study.points)} points cannot run; nothing was "
                          "started:\n" + "\n".join(errors))


def run_point(study: Study, point: Point, resume: bool) -> tuple[int, float]:
    """One point through the deepspeed launcher on this machine; output appended to <point>.log. A ``resume``d
    point continues from its newest complete checkpoint, or starts fresh where an attempt left none."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(point.ranks),
           "--master_port", str(free_port())] + train_args(study, point) + ["train.resume=auto" if resume else "train.resume=false"]
    threads = max(1, (os.cpu_count() or 1) // point.ranks)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    study.root.mkdir(parents=True, exist_ok=True)
    tic = time.time()
    with (study.root / f"{point.name}.log").open("a") as log:
        log.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - tic


def run_study(study: Study, retry_failed: bool = False) -> list[str]:
    """Run every unfinished point; returns the names of the points that failed."""
    status = read_status(study)
    failed = []
    bar = tqdm(study.points, desc=study.name, unit="point")
    for point in bar:
        st = status.setdefault(point.name, {"status": "pending", "attempts": 0})
        result = point_result(study.run_dir(point))
        if result is not None:
            st["status"] = result
            continue
        if st["status"] == "running":  # an earlier runner stopped during this point: its attempt crashed
            tqdm.write(f"{point.name}: was running when the study runner stopped: counted as a crash, retried")
            st["status"], st["attempts"] = "crashed", min(st["attempts"], MAX_ATTEMPTS - 1)
        if st["status"] == "failed" and not retry_failed:
            failed.append(point.name)
            continue
        st["attempts"] = 0 if st["status"] == "failed" else st["attempts"]
        while st["attempts"] < MAX_ATTEMPTS:
            bar.set_postfix_str(f"{point.name} (attempt {st['attempts'] + 1})")
            # a retry continues from the last complete checkpoint of any earlier attempt
            resume = st["attempts"] > 0 or bool(complete_tags(study.run_dir(point) / "checkpoints"))
            st["attempts"] += 1
            st["status"] = "running"
            write_status(study, status)
            rc, seconds = run_point(study, point, resume)
            st["wall_s"] = st.get("wall_s", 0) + seconds
            st["returncode"] = rc
            result = point_result(study.run_dir(point))
            if result is not None:
                st["status"] = result
                break
            st["status"] = "crashed"
            tqdm.write(f"{point.name}: exit {rc} after {seconds:.0f} s "
                       f"(log: {study.root / (point.name + '.log')})")
            if rc == EXIT_CONFIG:  # the config or the data is wrong: a retry would fail the same way
                break
        if st["status"] == "crashed":
            st["status"] = "failed"
            failed.append(point.name)
        write_status(study, status)
    write_status(study, status)
    return failed


def predict_points(study: Study, gpus_per_node: int, link_args: dict) -> dict[str, "RunPrediction"]:
    """Each point's predicted hours on the cluster (``pipeline.tools.step_time.predict_run``): FLOPs per image
    counted once per distinct model and image size."""
    from pipeline.tools.planner import _num_classes, largest_image
    from pipeline.tools.step_time import count_training_flops, predict_run

    flops: dict[str, float] = {}
    out = {}
    for point in tqdm(study.points, desc="predicting", unit="point", disable=None):
        cfg = load_config(study.config, point.override_args())
        size, num_classes = largest_image(cfg), _num_classes(cfg)
        key = f"{cfg.model.model_dump_json()} {size}"
        if key not in flops:
            flops[key] = count_training_flops(cfg, num_classes, size)
        out[point.name] = predict_run(cfg, point.ranks, gpus_per_node, link_args, num_classes, flops[key])
    return out


def plan_table(study: Study, predictions: dict[str, "RunPrediction"], link_args: dict) -> str:
    lines = [f"predicted on {link_args['gpu']} GPUs, intra-node {link_args['intra_node']}, inter-node "
             f"{link_args['inter_node']} (launch/plan.py --nodes prints every input; a prediction, not a measurement)",
             f"{'point':<40}{'GPUs':>6}{'ZeRO':>5}{'img/s':>10}{'comm':>7}{'hours':>10}{'GPU-h':>10}"]
    for point in study.points:
        p = predictions[point.name]
        lines.append(f"{point.name:<40}{p.gpus:>6}{p.step.stage:>5}{p.step.images_per_s:>10,.0f}"
                     f"{100 * p.step.comm_fraction:>6.1f}% {p.hours:>9.3g} {p.gpu_hours:>9.3g}"
                     + ("" if p.counted else "  * modelled collectives"))
    total = sum(p.gpu_hours for p in predictions.values())
    lines.append(f"{'all points':<40}{'':>6}{'':>5}{'':>10}{'':>7} {sum(p.hours for p in predictions.values()):>9.3g}"
                 f" {total:>9.3g}")
    return "\n".join(lines)


def write_plan(study: Study, hostfile: Path, gpus_per_node: int,
               predictions: Optional[dict[str, "RunPrediction"]] = None) -> Path:
    """launch_plan.sh: one ``deepspeed --hostfile`` command per point, finished points commented out; with
    ``predictions``, each command follows a comment with the point's predicted hours and GPU-hours."""
    hostfile = resolve_repo_path(hostfile).resolve()  # the plan cds into the repository first
    lines = ["#!/usr/bin/env bash", f"# Study {study.name} ({study.source}): one command per point.",
             "# Run them in order (or hand them to your scheduler); then: "
             f"python launch/study.py {study.source} --report", "set -x", f"cd {REPO_ROOT}"]
    for point in study.points:
        if point.ranks > gpus_per_node and point.ranks % gpus_per_node:
            raise ConfigError(f"point {point.name}: {point.ranks} ranks do not fill whole nodes of "
                              f"{gpus_per_node} GPUs; use a multiple of {gpus_per_node}")
        nodes, per_node = max(1, point.ranks // gpus_per_node), min(point.ranks, gpus_per_node)
        cmd = (f"deepspeed --hostfile {hostfile} --num_nodes {nodes} --num_gpus {per_node} "
               + " ".join(shlex.quote(a) for a in train_args(study, point)))
        done = point_result(study.run_dir(point)) is not None
        if predictions:
            p = predictions[point.name]
            lines.append(f"# {point.name}: predicted {p.hours:.3g} h, {p.gpu_hours:,.3g} GPU-hours "
                         f"({p.step.images_per_s:,.0f} img/s, {100 * p.step.comm_fraction:.0f}% in collectives)")
        lines.append(("# done: " if done else "") + cmd + " train.resume=auto")
    path = study.root / "launch_plan.sh"
    study.root.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def archive(study: Study, dest: Path) -> list[str]:
    """Copy each finished point's results (``ARCHIVED_FILES``) and their status to ``dest``, so that
    a study survives the machine it ran on; returns the points archived."""
    import shutil

    status, kept = read_status(study), {}
    for point in study.points:
        run_dir = study.run_dir(point)
        if point_result(run_dir) is None:
            continue
        (dest / point.name).mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, dest / point.name / name)
        kept[point.name] = status.get(point.name, {"status": point_result(run_dir), "attempts": 1})
    dest.mkdir(parents=True, exist_ok=True)
    write_json(dest / STATUS_FILE, kept)
    return list(kept)


def report(study: Study) -> dict[str, Path]:
    """results.csv, results.md and plots under the study directory; returns what was written."""
    from pipeline.tools.plots import plot_agvm, plot_series

    runs = collect_rows(study)
    axes = list(study.points[0].labels) if study.points else []
    rows, seed_axis = aggregate_seeds(runs, axes)
    out = {"csv": write_csv(rows, study.root / "results.csv")}
    columns = [RESULT_COLUMNS[0]] + axes + RESULT_COLUMNS[1:]
    note = ""
    if seed_axis is not None:  # the seeds merged: each run stays in runs.csv
        out["runs_csv"] = write_csv(runs, study.root / "runs.csv")
        axes = [a for a in axes if a != seed_axis]
        columns = [RESULT_COLUMNS[0]] + axes + ["n", "seeds", "diverged"] + \
            [c for m in RESULT_COLUMNS[1:] for c in (m, f"{m}_std")]
        note = ("Each row merges the seeds of one point: mean over the seeds that finished without diverging "
                "(`n`), `_std` the sample standard deviation; every run is in `runs.csv`.\n\n")
    extra = sorted({k for r in rows for k in r if k.startswith(("mu_final/", "phi_median/")) and
                    not k.endswith("_std")})
    table = markdown_table(rows, columns + extra)
    batch_axis = "batch" if "batch" in axes else None
    if study.compare is not None and seed_axis is not None:
        compare, metric = study.compare, study.compare.metric
        paired = paired_differences(runs, axes, seed_axis, compare)
        out["paired_csv"] = write_csv(paired, study.root / "paired.csv")
        table += _paired_section(paired, [a for a in axes if a != compare.axis], compare)
        others = [a for a in axes if a not in (batch_axis, compare.axis)]
        written = plot_series(paired, "global_batch", f"{metric}_diff",
                              lambda r: " / ".join([r["pair"]] + [r[a] for a in others]),
                              study.root / "paired_vs_batch.png",
                              f"paired {metric} difference (mean +- std over seeds)", baseline=0.0)
        if written:
            out["paired_vs_batch"] = written
    (study.root / "results.md").write_text(f"# Study {study.name}\n\nFrom `{study.source}`.\n\n{note}{table}")
    out["md"] = study.root / "results.md"
    by_rest = (lambda r: series_key(r, axes, batch_axis))
    plots = {"ap_vs_batch": ("global_batch", "AP50", by_rest, "AP50 vs global batch"),
             "time_vs_batch": ("global_batch", "wall_s", by_rest, "wall time (s) vs global batch"),
             "memory_vs_parameters": ("parameters", "peak_mem_gib",
                                      lambda r: f"ZeRO-{r['zero']}" if "zero" in r else "peak",
                                      "peak memory per rank (GiB) vs parameters")}
    for name, (x, y, series, title) in plots.items():
        written = plot_series(rows, x, y, series, study.root / f"{name}.png", title,
                              marked=_all_diverged if y == "AP50" else None)
        if written:
            out[name] = written
    phi_rows = [{"global_batch": r["global_batch"], "phi": r[k], "phi_std": r.get(f"{k}_std"),
                 "line": f"{by_rest(r)}: {k.split('/', 1)[1]}"}
                for r in rows for k in sorted(r) if k.startswith("phi_median/") and not k.endswith("_std")]
    if batch_axis and (written := plot_series(phi_rows, "global_batch", "phi", lambda r: r["line"],
                                              study.root / "phi_vs_batch.png",
                                              "AGVM: median Phi per module vs global batch")):
        out["phi_vs_batch"] = written
    phi_points = study.plots.get("phi_points") or [r["point"] for r in runs if any(k.startswith("phi_median/") for k in r)]
    phi_dirs = [study.root / p for p in phi_points if (study.root / p / "metrics.jsonl").is_file()][:6]
    if phi_dirs:
        out["agvm_phi_mu"] = plot_agvm(phi_dirs, study.root / "agvm_phi_mu.png")
    return out


def _paired_section(rows: list[dict], axes: list[str], compare: Comparison) -> str:
    m = compare.metric
    return (f"\n## Paired differences of {m} (same seed)\n\n`{m}_diff`: the mean over the seeds where both runs "
            f"finished (`n`) of the first label's {m} minus the second's in the same seed (same initialisation and "
            "data order), `_std` its sample standard deviation, `higher`: in how many seeds the first was above; "
            "`per_seed` lists them.\n\n"
            + markdown_table(rows, axes + ["pair", "n", f"{m}_diff", f"{m}_diff_std", "higher", "per_seed"]))


def _all_diverged(row: dict) -> bool:
    """A point with no result but divergence: a run, or every seed of a merged point."""
    return row.get("status") == "diverged" or (row.get("n") == 0 and bool(row.get("diverged")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="study YAML (see studies/)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: the study's output_dir or runs/")
    parser.add_argument("--list", action="store_true", help="print the points and exit")
    parser.add_argument("--plan", action="store_true", help="write launch_plan.sh for a cluster instead of running")
    parser.add_argument("--hostfile", type=Path, default=Path("launch/hostfile.example"))
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100", help="with --plan: the GPU, for predicted hours (launch/plan.py)")
    parser.add_argument("--inter-node", default="400Gb", help="with --plan: network rate per GPU")
    parser.add_argument("--intra-node", default="nvlink4", help="with --plan: link inside a node")
    parser.add_argument("--mfu", type=float, default=None, help="with --plan: MFU (default: by backbone family)")
    parser.add_argument("--report", action="store_true", help="only collect results and draw plots")
    parser.add_argument("--retry-failed", action="store_true", help="run points marked failed again")
    parser.add_argument("--archive", type=Path, metavar="DIR",
                        help="copy the finished points' results (no checkpoints) to DIR and exit; copy them back "
                        "into the study directory (cp -r DIR/. runs/NAME/) to resume or report elsewhere")
    args = parser.parse_args(argv)
    try:
        study = load_study(args.study, args.output_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.archive:
        done = archive(study, args.archive)
        print(f"archived {len(done)} of {len(study.points)} finished points to {args.archive}")
        return 0
    if args.list:
        for p in study.points:
            print(f"{p.name:<48} ranks={p.ranks} {' '.join(p.override_args())}")
        print(f"{len(study.points)} points -> {study.root}")
        return 0
    try:
        if args.plan:
            validate_points(study, args.gpus_per_node)
        elif not args.report and study.mode == "train":
            validate_points(study)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plan:
        link_args = {"gpu": args.gpu.lower(), "inter_node": args.inter_node, "intra_node": args.intra_node,
                     "mfu": args.mfu}
        try:
            predictions = predict_points(study, args.gpus_per_node, link_args)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(plan_table(study, predictions, link_args))
        print(f"wrote {write_plan(study, args.hostfile, args.gpus_per_node, predictions)}")
        return 0
    failed = []
    if not args.report:
        if study.mode == "model_size":
            from pipeline.studies.model_size import run_model_size_study

            run_model_size_study(study)
        else:
            failed = run_study(study, args.retry_failed)
    if study.mode == "model_size":
        from pipeline.studies.model_size import report_model_size

        written = report_model_size(study)
    else:
        written = report(study)
    for name, path in written.items():
        print(f"{name}: {path}")
    if failed:
        print(f"FAILED points ({len(failed)}): {', '.join(failed)}; logs in {study.root}/<point>.log",
              file=sys.stderr)
    return 1 if failed else 0


def cli() -> None:
    """The command (``launch/study.py``): ``main`` with its exit status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
