"""Scaling studies: a YAML grid of training runs, its status on disk, and its results.

A study file names a base experiment config, fixed overrides and a grid; every point of the
grid is one ordinary training run (``launch/train.py``, same schema) in
``<output_dir>/<study>/<point>/``. ``launch/study.py`` runs or plans the points; this module
expands the grid, keeps the status file and turns finished run directories into a CSV, a
Markdown table and plots.

Grid axes take a list of values. Shorthand axes map a value to config overrides:

    batch: [2x4, 2x8x2]        ranks x micro-batch [x gradient accumulation]
    optimizer: [sgd, agvm_sgd] optim.name
    norm: [per_gpu, cgbn, cgbn:2, frozen, group_norm]   model.norm (cgbn:K = BN groups of K ranks)
    backbone: [resnet18, vit_giant_patch14_dinov2]      model.backbone
    zero: [0, 3]               train.ds_config = ds_configs/zero<N>_<precision>.json (precision: fixed key)
    lr_scaling: [linear, sqrt, none]
    seed: [0, 1, 2]            train.seed; the report merges the seeds of a point (mean, std, n)

Any dotted config key is an axis too (``schedule.warmup_iters: [0, 50]``), and an axis may be
a mapping of labels to override sets, for values that move several keys together:

    method:
      sgd: {optim.name: sgd, schedule.warmup_iters: 0, model.norm: per_gpu}
      agvm: {optim.name: agvm_sgd}

With a seed axis, ``compare`` pairs the runs of two labels of one axis that share a seed (the
same initialisation and data order) and reports the difference of a metric per seed, its mean,
standard deviation and sign count: a paired difference is what tells an effect from seed noise.

    compare:
      axis: method
      pairs: [[agvm, sgd]]     # agvm minus sgd, at every value of the other axes
      metric: AP50             # default
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.config import REPO_ROOT, load_config, resolve_repo_path
from pipeline.errors import ConfigError
from pipeline.utils.files import write_json

log = logging.getLogger(__name__)

SHORTHAND = ("batch", "optimizer", "norm", "backbone", "zero", "lr_scaling", "seed")
SEED_AXES = ("seed", "train.seed")
# What differs between the seeds of a point, merged as mean, std and n; the rest is the same in every seed.
SEED_METRICS = ("AP", "AP50", "iterations", "wall_s", "train_s", "images_per_s", "tflops_per_rank", "mfu",
                "peak_mem_gib")
_STUDY_KEYS = {"name", "config", "fixed", "grid", "precision", "mode", "output_dir", "plots", "measure_iters",
               "compare"}
STATUS_FILE = "study_status.json"


@dataclass
class Point:
    """One run of the study: its name, axis labels, launch size and config overrides."""

    name: str
    labels: dict[str, str]
    ranks: int
    overrides: dict[str, Any] = field(default_factory=dict)

    def override_args(self) -> list[str]:
        return [f"{k}={_yaml_value(v)}" for k, v in self.overrides.items()]


@dataclass
class Comparison:
    """Paired differences over seeds: ``metric`` of ``a`` minus ``b`` for each (a, b) label pair of ``axis``."""

    axis: str
    pairs: list[tuple[str, str]]
    metric: str = "AP50"


@dataclass
class Study:
    name: str
    config: Optional[Path]
    points: list[Point]
    output_dir: Path
    mode: str = "train"  # or "model_size"
    plots: dict = field(default_factory=dict)
    source: str = ""
    compare: Optional[Comparison] = None

    @property
    def root(self) -> Path:
        return self.output_dir / self.name

    def run_dir(self, point: Point) -> Path:
        return self.root / point.name


def _yaml_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _label(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]+", "-", str(value))


def parse_batch(text: str, where: str) -> tuple[int, int, int]:
    """'RxM' or 'RxMxA' -> (ranks, micro-batch, accumulation)."""
    parts = str(text).lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"{where}: batch {text!r} is not RANKSxMICRO or RANKSxMICROxACCUM (e.g. 2x8 or 2x8x2)")
    ranks, micro, accum = (int(p) for p in parts + ["1"] * (3 - len(parts)))
    return ranks, micro, accum


def _shorthand(axis: str, value: Any, precision: str, where: str) -> tuple[dict[str, Any], int | None]:
    """Config overrides (and ranks, for the batch axis) of one shorthand axis value."""
    if axis == "batch":
        ranks, micro, accum = parse_batch(value, where)
        return {"train.micro_batch": micro, "train.grad_accum": accum}, ranks
    if axis == "optimizer":
        return {"optim.name": value}, None
    if axis == "norm":
        kind, _, group = str(value).partition(":")
        out = {"model.norm": kind}
        if group:
            out["model.bn_group"] = int(group) if group.isdigit() else group
        return out, None
    if axis == "backbone":
        return {"model.backbone": value}, None
    if axis == "seed":
        return {"train.seed": int(value)}, None
    if axis == "zero":
        path = Path("ds_configs") / f"zero{value}_{precision}.json"
        if not (REPO_ROOT / path).is_file():
            raise ConfigError(f"{where}: zero={value} with precision {precision}: {path} does not exist")
        return {"train.ds_config": str(path)}, None
    return {"optim.lr_scaling": value}, None  # lr_scaling


def _axis_values(axis: str, spec: Any, precision: str, where: str) -> list[tuple[str, dict, int | None]]:
    """[(label, overrides, ranks or None)] for one grid axis."""
    if isinstance(spec, dict):  # labelled override sets
        out = []
        for label, overrides in spec.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"{where}.{label}: expected a mapping of config keys to values")
            overrides = dict(overrides)
            ranks = overrides.pop("ranks", None)
            out.append((_label(label), overrides, ranks))
        return out
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where}: an axis takes a non-empty list of values or a mapping of labels to overrides")
    if axis in ("zero", "seed"):
        return [(f"{axis}{v}", *_shorthand(axis, v, precision, where)) for v in spec]
    if axis in SHORTHAND:
        return [(_label(v), *_shorthand(axis, v, precision, where)) for v in spec]
    if "." not in axis:
        raise ConfigError(f"{where}: unknown axis {axis!r}; use one of {', '.join(SHORTHAND)}, "
                          "a dotted config key (e.g. schedule.warmup_iters) or a mapping of labels to overrides")
    key = axis.rsplit(".", 1)[1]  # numbers alone make poor names: warmup_iters50, not 50
    return [(_label(f"{key}{v}" if isinstance(v, (int, float)) else v), {axis: v}, None) for v in spec]


def load_study(path: Path, output_dir: Optional[Path] = None) -> Study:
    """Read a study file and expand its grid; every point's config is validated now, not mid-study."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"study file {path} is not valid YAML: {err}") from None
    unknown = set(spec) - _STUDY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; a study has {sorted(_STUDY_KEYS)}")
    if not spec.get("name") or not spec.get("grid"):
        raise ConfigError(f"{path}: a study needs a name and a grid (see pipeline/studies/spec.py)")
    config = resolve_repo_path(Path(spec["config"])) if spec.get("config") else None
    precision, fixed = spec.get("precision", "fp32"), dict(spec.get("fixed") or {})
    fixed_ranks = fixed.pop("ranks", 1)
    axes = [[(axis, *v) for v in _axis_values(axis, values, precision, f"{path}: grid.{axis}")]
            for axis, values in spec["grid"].items()]
    points = []
    for combo in itertools.product(*axes):
        overrides, ranks, labels = dict(fixed), fixed_ranks, {}
        for axis, label, extra, axis_ranks in combo:
            overrides.update(extra)
            labels[axis] = label
            ranks = axis_ranks or ranks
        points.append(Point("__".join(labels.values()), labels, int(ranks), overrides))
    axis_labels = {axis: [v[1] for v in values] for axis, values in zip(spec["grid"], axes)}
    study = Study(spec["name"], config, points, Path(output_dir or spec.get("output_dir", "runs")),
                  spec.get("mode", "train"), spec.get("plots") or {}, str(path),
                  _comparison(spec.get("compare"), axis_labels, f"{path}: compare"))
    if study.mode not in ("train", "model_size"):
        raise ConfigError(f"{path}: mode={study.mode!r}; use train or model_size")
    for p in points:  # a typo fails here, before hours of earlier points have run
        load_config(config, p.override_args() + [f"train.run_name={p.name}"])
    return study


def _comparison(spec: Any, labels: dict[str, list[str]], where: str) -> Optional[Comparison]:
    """The ``compare`` block, checked against the grid: pairs of labels of one non-seed axis."""
    if spec is None:
        return None
    usage = "compare takes {axis: AXIS, pairs: [[A, B], ...], metric: AP50}"
    if not isinstance(spec, dict) or not {"axis", "pairs"} <= set(spec) or set(spec) - {"axis", "pairs", "metric"}:
        raise ConfigError(f"{where}: {usage}")
    axis, metric = spec["axis"], spec.get("metric", "AP50")
    if not any(a in SEED_AXES for a in labels):
        raise ConfigError(f"{where}: paired differences pair runs of the same seed; add a seed axis to the grid")
    if axis not in labels or axis in SEED_AXES:
        raise ConfigError(f"{where}: axis {axis!r} is not a non-seed grid axis; the grid has {list(labels)}")
    if metric not in SEED_METRICS:
        raise ConfigError(f"{where}: metric {metric!r}; use one of {list(SEED_METRICS)}")
    pairs = spec["pairs"]
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise ConfigError(f"{where}: {usage}")
    for a, b in pairs:
        bad = [v for v in (a, b) if str(v) not in labels[axis]]
        if bad or a == b:
            raise ConfigError(f"{where}: pair [{a}, {b}]: {bad or 'the same label twice'}; "
                              f"the labels of {axis} are {labels[axis]}")
    return Comparison(axis, [(str(a), str(b)) for a, b in pairs], metric)


# ---- status on disk: what has run, what failed ----

def read_status(study: Study) -> dict[str, dict]:
    path = study.root / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_status(study: Study, status: dict[str, dict]) -> None:
    study.root.mkdir(parents=True, exist_ok=True)
    write_json(study.root / STATUS_FILE, status)  # atomic: a crash never leaves half a status file


def run_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary; None when it has none, or one torn by a kill (written before summaries were
    replaced atomically): the point then counts as unfinished and is resumed, never a crash of the runner."""
    path = run_dir / "run_summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is torn (a write cut short): the point counts as unfinished", path)
        return None


def point_result(run_dir: Path) -> Optional[str]:
    """"done" (trained to the end), "diverged" (a result of the study too) or None (not finished)."""
    s = run_summary(run_dir)
    if s is None:
        return None
    if s["diverged"]:
        return "diverged"
    return "done" if s["iterations"] >= s["total_iterations"] else None


# ---- results ----

def _agvm_summary(run_dir: Path) -> dict[str, float]:
    """Final mu and median Phi per module, from the run's AGVM records."""
    from statistics import median

    from pipeline.tools.plots import agvm_series

    series = agvm_series(run_dir)
    out = {f"mu_final/{m}": round(v[-1], 4) for m, (_, v) in series["mu"].items() if v}
    out.update({f"phi_median/{m}": round(median(v), 5) for m, (_, v) in series["phi"].items() if v})
    return out


def collect_rows(study: Study) -> list[dict]:
    """One row per point: labels, launch size, status and the run's results."""
    status, rows = read_status(study), []
    for p in study.points:
        run_dir = study.run_dir(p)
        s = run_summary(run_dir) or {}
        st = status.get(p.name, {})
        metrics = s.get("metrics") or {}
        row = {"point": p.name, **p.labels, "ranks": p.ranks,
               "micro_batch": p.overrides.get("train.micro_batch"), "grad_accum": p.overrides.get("train.grad_accum", 1),
               "global_batch": s.get("global_batch"),
               "status": st.get("status", "diverged" if s.get("diverged") else ("done" if s else "pending")),
               "attempts": st.get("attempts", 0), "AP": metrics.get("bbox/AP"), "AP50": metrics.get("bbox/AP50"),
               "iterations": s.get("iterations"), "wall_s": st.get("wall_s"), "train_s": s.get("train_seconds"),
               "images_per_s": s.get("images_per_s"), "tflops_per_rank": s.get("tflops_per_rank"),
               "mfu": s.get("mfu"), "peak_mem_gib": s.get("peak_mem_gib"), "diverged": s.get("diverged"),
               "parameters": _parameters(run_dir)}
        row.update(_agvm_summary(run_dir) if (run_dir / "metrics.jsonl").is_file() else {})
        rows.append(row)
    return rows


def aggregate_seeds(rows: list[dict], axes: list[str]) -> tuple[list[dict], Optional[str]]:
    """Merge the rows that differ only in their seed (the ``seed`` or ``train.seed`` axis) into one
    row per point: each of ``SEED_METRICS`` and the AGVM columns becomes the mean over the seeds
    that finished without diverging, with ``<metric>_std`` (sample standard deviation, n >= 2)
    beside it; ``n`` counts those seeds, ``diverged`` the others. Returns (rows, the seed axis or
    None: no seed axis, rows as they are)."""
    from statistics import fmean, stdev

    seed_axis = next((a for a in axes if a in SEED_AXES), None)
    if seed_axis is None:
        return rows, None
    rest = [a for a in axes if a != seed_axis]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[a] for a in rest), []).append(row)
    merged = []
    for key, runs in groups.items():
        done = [r for r in runs if r.get("status") == "done"]
        first = runs[0]
        row = {"point": "__".join(key) or "all", **dict(zip(rest, key)),
               "seeds": ",".join(r[seed_axis] for r in runs), "n": len(done),
               "diverged": sum(r.get("status") == "diverged" for r in runs),
               "status": "done" if len(done) == len(runs) else f"{len(done)}/{len(runs)} done"}
        row.update({k: first.get(k) for k in ("ranks", "micro_batch", "grad_accum", "global_batch", "parameters")})
        agvm = sorted({k for r in runs for k in r if k.startswith(("mu_final/", "phi_median/"))})
        for metric in (*SEED_METRICS, *agvm):
            values = [r[metric] for r in done if r.get(metric) is not None]
            row[metric] = fmean(values) if values else None
            row[f"{metric}_std"] = stdev(values) if len(values) >= 2 else None
        merged.append(row)
    return merged, seed_axis


def paired_differences(runs: list[dict], axes: list[str], seed_axis: str, compare: Comparison) -> list[dict]:
    """One row per pair and combination of the other axes: ``<metric>_diff``, the mean over the
    seeds where both runs finished of (a's metric - b's) in the same seed, ``_std`` beside it,
    ``n``, ``higher`` (in how many seeds a was above b) and every seed's difference."""
    from statistics import fmean, stdev

    m = compare.metric
    rest = [a for a in axes if a not in (seed_axis, compare.axis)]
    runs_by = {(tuple(r[a] for a in rest), r[compare.axis], r[seed_axis]): r for r in runs}
    seeds = list(dict.fromkeys(r[seed_axis] for r in runs))
    rows = []
    for key in dict.fromkeys(k[0] for k in runs_by):
        for a, b in compare.pairs:
            both = [(runs_by.get((key, a, s)), runs_by.get((key, b, s))) for s in seeds]
            diffs = [ra[m] - rb[m] for ra, rb in both if ra and rb and ra.get("status") == rb.get("status") == "done"
                     and ra.get(m) is not None and rb.get(m) is not None]
            first = next((ra for ra, _ in both if ra), {})
            rows.append({**dict(zip(rest, key)), "pair": f"{a} - {b}", "global_batch": first.get("global_batch"),
                         "n": len(diffs), f"{m}_diff": fmean(diffs) if diffs else None,
                         f"{m}_diff_std": stdev(diffs) if len(diffs) >= 2 else None,
                         "higher": f"{sum(d > 0 for d in diffs)}/{len(diffs)}",
                         "per_seed": " ".join(f"{d:+.3f}" for d in diffs)})
    return rows


def _parameters(run_dir: Path) -> Optional[int]:
    path = run_dir / "model.json"
    return json.loads(path.read_text())["parameters"] if path.is_file() else None


def write_csv(rows: list[dict], path: Path) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def series_key(row: dict, axes: list[str], exclude: str) -> str:
    """The label of a row's curve: its labels on every axis but ``exclude``."""
    return " / ".join(row[a] for a in axes if a != exclude) or "all"
