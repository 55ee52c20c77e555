"""One command for a lent GPU: everything this pipeline needs measured there, in one table.

    python benchmarks/gpu_suite.py OUT_DIR                # on the GPU (README: "Running on GPUs")
    python benchmarks/gpu_suite.py OUT_DIR --smoke        # the same code paths on CPU, tiny sizes (CI)
    python benchmarks/gpu_suite.py OUT_DIR --parts b,c    # some parts only

Parts (on a GPU each in its own process, with its own time limit; in --smoke all in one process: a
part that fails or runs out of time is a row with its error, and the others still run):
  a  smoke: the default config and R50-FPN, fp32 and bf16, ZeRO 0/2/3: finite losses, first
     losses equal across stages, no device-placement warnings
  b  levers vs torchvision's Faster R-CNN at 800x1333 bf16, batch 8 and 16: img/s, ratio, peak
  c  FLOPs per image, dispatched operators and host syncs per iteration (ours and torchvision's),
     and the profiler's top 15 operators of the fastest configuration
  d  AGVM-SGD vs SGD (tau 10 and 1); cross-GPU BN (ours and torch's fused) vs per-GPU BN
  e  the memory planner on ViT-g Faster R-CNN (ZeRO-3 bf16, checkpointing, 1024x1024), then
     training at the micro-batch it recommends: estimated vs measured peak
  f  the data loader alone at 800x1333: img/s by worker count
  g  pytest -m gpu
  h  ViTDet's windowed attention vs global attention: ViT-g Faster R-CNN at 1024x1024, step time and peak
Writes OUT_DIR/suite.md (the table; also printed) and OUT_DIR/suite.json. On CPU every figure is
a CPU figure, labelled with the device: never read one as a GPU number.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import REPO, pipeline_step, row_label, time_steps, torchvision_step  # noqa: E402

# Part: (title, seconds allowed on a GPU). In --smoke every part may take SMOKE_LIMIT: there the limits
# only stop a hang, and a slow, shared CI machine must not fail a part that works.
PARTS = {
    "a": ("CUDA smoke: losses across precisions, ZeRO stages and AGVM", 200),
    "b": ("speed levers vs torchvision's Faster R-CNN", 150),
    "c": ("FLOPs, operators and host syncs per iteration; profile", 60),
    "d": ("AGVM and cross-GPU BN costs", 90),
    "e": ("memory planner on ViT-g, then training at its micro-batch", 150),
    "f": ("data loader alone", 45),
    "g": ("pytest -m gpu", 60),
    "h": ("windowed vs global attention (ViT-g, 1024)", 120),
}
SMOKE_LIMIT = 900


class Sizes:
    """What a part runs at: the real sizes on a GPU, tiny ones in ``--smoke``."""

    def __init__(self, smoke: bool, batches: list[int] | None = None):
        self.smoke = smoke
        self.hw = (64, 64) if smoke else (800, 1333)
        self.batches = batches or ([2] if smoke else [8, 16])
        self.r50 = "test_byobnet" if smoke else "resnet50"
        self.precisions = ["fp32"] if smoke else ["fp32", "bf16"]
        # bf16 where it is fast; on a CPU (smoke, --cpu proxies) fp32: counts barely change, and CPU bf16 crawls
        self.fast_precision = "bf16" if torch.cuda.is_available() and not smoke else "fp32"
        self.iters = 2 if smoke else 30
        self.warmup, self.timed = (1, 1) if smoke else (3, 10)
        # torchvision's head sizes on a GPU; on CPU they would dominate the smoke's time
        self.heads = ["model.rpn_pre_nms_train=200", "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32",
                      "model.box_head_dim=64", "model.fpn_channels=16"] if smoke else []


# ---------------------------------------------------------------------------- shared helpers

def _detector(sizes: "Sizes", backbone: str, batch: int, precision: str, zero: int, *extra: str) -> list[str]:
    hw = sizes.hw
    return ["model.detector=faster_rcnn", f"model.backbone={backbone}", "model.norm=cgbn",
            f"data.min_size={min(hw)}", f"data.max_size={max(hw)}", f"train.micro_batch={batch}",
            f"train.ds_config={REPO}/ds_configs/zero{zero}_{precision}.json", *sizes.heads, *extra]


def _force_bn_group(model: torch.nn.Module) -> int:
    """Cross-GPU BN over the world group even on one rank, so its kernels and collectives run (one
    GPU's BN group is otherwise that GPU alone, which is torch's own BN); returns the layer count."""
    import torch.distributed as dist

    from pipeline.distributed.norm import CrossGPUBatchNorm

    layers = [m for m in model.modules() if isinstance(m, CrossGPUBatchNorm)]
    for m in layers:
        m.process_group = dist.group.WORLD
    return len(layers)


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float:
    from pipeline.utils.memory import peak_memory

    return round(peak_memory(device) / 2**30, 2)


def _reset_peak(device: torch.device) -> None:
    from pipeline.utils.memory import reset_peak_memory

    reset_peak_memory(device)


def _md_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/").replace("\n", " ")


# ---------------------------------------------------------------------------- the parts

def part_a(sizes: Sizes, info, out_dir: Path) -> dict:
    """Each config x precision x ZeRO stage trains ``iters`` steps on one fixed batch, cross-GPU BN's
    code path forced (one GPU's group is otherwise torch's own BN)."""
    configs = {"default": ["model.backbone=resnet18"],
               "default + AGVM-SGD": ["model.backbone=resnet18", "optim.name=agvm_sgd", "train.grad_accum=2",
                                      "agvm.start_iter=0"],  # one GPU: the halves are the 2 micro-batches
               "r50_fpn": [f"model.backbone={sizes.r50}"]}
    rows = []
    for name, extra in configs.items():
        for precision in sizes.precisions:
            for zero in (0, 2, 3):
                caught, handler = _warning_catcher()
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    training, step = pipeline_step(
                        [*_detector(sizes, "resnet18", 2, precision, zero), *extra], info, 2, *sizes.hw)
                    layers = _force_bn_group(training.engine.module)
                    losses = [float(sum(step().values())) for _ in range(sizes.iters)]
                logging.getLogger().removeHandler(handler)
                placement = [str(x.message) for x in w if _about_devices(str(x.message))] + \
                    [m for m in caught if _about_devices(m)]
                rows.append({"config": name, "precision": precision, "zero": zero, "cgbn_layers": layers,
                             "first_loss": losses[0], "last_loss": losses[-1],
                             "finite": all(math.isfinite(x) for x in losses),
                             "placement_warnings": len(placement), "example": placement[0][:120] if placement else ""})
                del training, step
                _release()
    tolerance = {"fp32": 1e-3, "bf16": 2e-2}
    for r in rows:
        ref = next(x for x in rows if x["config"] == r["config"] and x["precision"] == r["precision"] and x["zero"] == 0)
        r["first_vs_zero0"] = abs(r["first_loss"] / ref["first_loss"] - 1)
        r["ok"] = r["finite"] and r["first_vs_zero0"] <= tolerance[r["precision"]] and not r["placement_warnings"]
    note = (f"{sizes.iters} iterations each, micro-batch 2, {sizes.hw[0]}x{sizes.hw[1]}; ok = finite losses, the "
            f"first loss within {tolerance} (relative) of ZeRO-0's, no warning about devices")
    return {"rows": rows, "note": note, "table": _md_table(rows, ["config", "precision", "zero", "cgbn_layers",
            "first_loss", "last_loss", "first_vs_zero0", "finite", "placement_warnings", "ok", "example"])}


def _warning_catcher():
    """Collect WARNING log records (DeepSpeed and torch log placement problems there)."""
    caught: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            caught.append(record.getMessage())

    handler = Catch(logging.WARNING)
    logging.getLogger().addHandler(handler)
    return caught, handler


def _about_devices(message: str) -> bool:
    text = message.lower()
    return any(k in text for k in ("device", "cuda:", "cpu tensor", "different devices", "pin_memory"))


_TV_HEADS = "model.heads=torchvision"  # explicit: model.heads=auto means batched on CUDA
LEVERS = [  # cumulative: each row adds one lever to the previous one
    ("plain (NCHW, eager, our cross-GPU BN)", ["train.channels_last=false", "model.cgbn_impl=ours", _TV_HEADS]),
    ("+ channels_last", ["train.channels_last=true", "model.cgbn_impl=ours", _TV_HEADS]),
    ("+ fused cross-GPU BN", ["train.channels_last=true", "model.cgbn_impl=torch", _TV_HEADS]),
    ("+ compile (backbone and neck, canvas padding)", ["train.channels_last=true", "model.cgbn_impl=torch",
                                                        "train.compile=true", _TV_HEADS]),
    ("+ sync-free heads", ["train.channels_last=true", "model.cgbn_impl=torch", "train.compile=true",
                           "model.heads=batched"]),
]


def _levers_here(device: torch.device) -> list[tuple[str, list[str]]]:
    """The cumulative levers this device can run (the fused BN kernels are CUDA's): on a CPU the
    torch-kernel step is dropped from every later row."""
    if device.type == "cuda":
        return LEVERS
    return [(label, [o for o in levers if o != "model.cgbn_impl=torch"]) for label, levers in LEVERS
            if "fused" not in label]


def _flop_rates(step, batch: int, seconds_per_step: float, precision: str, device: torch.device) -> dict:
    """TFLOP/s and MFU of a timed step of ``batch`` images: its FLOPs counted on one more step
    (pipeline.train.flops, as the training log counts them)."""
    from pipeline.train.flops import FlopMeter, device_peak_tflops

    meter = FlopMeter(world=1, peak_tflops=device_peak_tflops(device, precision == "bf16"))
    meter.count(step, images=batch)
    rates = meter.rates(batch / seconds_per_step)
    return {"tflops": rates["tflops_per_rank"], "mfu": rates.get("mfu", "")}


def part_b(sizes: Sizes, info, out_dir: Path) -> dict:
    rows = []
    precision = sizes.fast_precision
    for batch in sizes.batches:
        _reset_peak(info.device)
        _, tv = torchvision_step(sizes.hw, batch, precision, info.device)
        tv_s = time_steps(tv, info.device, sizes.warmup, sizes.timed)
        rows.append({"batch": batch, "variant": "torchvision fasterrcnn_resnet50_fpn", "img_s": batch / tv_s,
                     "ratio": 1.0, "peak_gib": _peak_gib(info.device), **_flop_rates(tv, batch, tv_s, precision,
                                                                                       info.device)})
        del tv
        _release()
        here = dict(_levers_here(info.device))
        for label, _ in LEVERS:
            if label not in here:
                rows.append({"batch": batch, "variant": label, "img_s": "", "note": "CUDA only"})
                continue
            levers = here[label]
            _reset_peak(info.device)
            training, step = pipeline_step(
                _detector(sizes, sizes.r50, batch, precision, 0, "model.anchor_scale=8", *levers),
                info, batch, *sizes.hw)
            layers = _force_bn_group(training.engine.module)
            s = time_steps(step, info.device, sizes.warmup, sizes.timed)
            rows.append({"batch": batch, "variant": label, "img_s": batch / s, "ratio": tv_s / s,
                         "peak_gib": _peak_gib(info.device), **_flop_rates(step, batch, s, precision, info.device),
                         "note": f"{layers} BN layers over a 1-rank group"})
            del training, step
            _release()
    note = (f"{sizes.hw[0]}x{sizes.hw[1]}, {precision}, ZeRO-0, same synthetic images; {sizes.warmup} warm-up + "
            f"{sizes.timed} timed steps; ratio = ours / torchvision img/s; tflops: model FLOPs (counted on one "
            f"more step, forward + backward) x steps/s; mfu: of the device's dense peak (pipeline/train/flops.py)")
    columns = ["batch", "variant", "img_s", "ratio", "tflops", "mfu", "peak_gib", "note"]
    return {"rows": rows, "note": note, "table": _md_table(rows, columns)}


def _count_iteration(step, device: torch.device) -> dict:
    """FLOPs, dispatched aten operators and host syncs of one steady-state iteration."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.utils.host_syncs import HostSyncCounter

    step()  # steady state
    with FlopCounterMode(display=False) as flops:
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    with HostSyncCounter() as syncs:
        step()
    out = {"gflop": flops.get_total_flops() / 1e9, "aten_ops": ops, "syncs_counted": syncs.total,
           "syncs_by_package": dict(syncs.by_package()),
           "sync_sites": syncs.report()}
    if device.type == "cuda":
        out["cuda_syncs"] = _cuda_syncs(step)
    return out


def _partial(out_dir: Path, key: str, rows: list[dict]) -> None:
    """What a long part has measured so far: kept in the table if the part runs out of time."""
    (out_dir / f"part_{key}.json").write_text(json.dumps({"rows": rows, "partial": True}, default=str))


def _cuda_syncs(step) -> int:
    """Synchronisations torch itself reports during one iteration (``set_sync_debug_mode``)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(x.message).lower() for x in w)


def part_c(sizes: Sizes, info, out_dir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    batch, precision = sizes.batches[0], sizes.fast_precision
    rows = []
    _, tv = torchvision_step(sizes.hw, batch, precision, info.device)
    rows.append({"model": "torchvision fasterrcnn_resnet50_fpn", **_count_iteration(tv, info.device)})
    _partial(out_dir, "c", rows)
    del tv
    _release()
    here = _levers_here(info.device)
    for label, levers in (here[0], here[-1]):  # plain, and every lever: the latter is profiled below
        fastest = fastest_label = None  # drop the previous engine before building the next: one on the device
        _release()
        training, fastest = pipeline_step(
            _detector(sizes, sizes.r50, batch, precision, 0, "model.anchor_scale=8", *levers), info, batch, *sizes.hw)
        _force_bn_group(training.engine.module)
        rows.append({"model": f"ours: {label}", **_count_iteration(fastest, info.device)})
        _partial(out_dir, "c", rows)
        fastest_label = label
        del training
    for r in rows:
        r["gflop_per_image"] = r.pop("gflop") / batch
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if info.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            fastest()
    key = "self_cuda_time_total" if info.device.type == "cuda" else "self_cpu_time_total"
    top = prof.key_averages().table(sort_by=key, row_limit=15)
    (out_dir / "profile_top15.txt").write_text(top)
    kind = "CUDA" if info.device.type == "cuda" else "CPU (a proxy: counted, nothing waits on a CPU)"
    note = (f"one steady-state iteration, batch {batch}, {sizes.hw[0]}x{sizes.hw[1]}, {precision}. FLOPs: "
            f"torch.utils.flop_counter (forward + backward); aten_ops: top-level aten operators dispatched "
            f"(torch.profiler); syncs_counted: calls that synchronise on CUDA ({kind}), by package; cuda_syncs: "
            f"torch.cuda.set_sync_debug_mode's reports. Profile of '{fastest_label}', sorted by {key}: "
            f"profile_top15.txt")
    table = _md_table(rows, ["model", "gflop_per_image", "aten_ops", "syncs_counted", "syncs_by_package",
                             "cuda_syncs"])
    sites = [{"site": site, "syncs": n, "call": op} for site, n, op in rows[-1]["sync_sites"]]
    table += f"\n\nWhere '{rows[-1]['model']}' syncs, by source line:\n\n" + _md_table(sites, ["site", "syncs", "call"])
    return {"rows": rows, "note": note, "table": table + "\n\n```\n" + top + "\n```"}


def part_d(sizes: Sizes, info, out_dir: Path) -> dict:
    rows = []
    precision, batch = sizes.fast_precision, 2 if sizes.smoke else 4
    h, w = sizes.hw
    import bench_agvm_overhead as agvm_bench

    agvm_out = out_dir / "agvm_overhead.jsonl"
    args = agvm_bench.parse_args(["--backbone", sizes.r50, "--height", str(h), "--width", str(w), "--batch",
                                  str(batch), "--precision", precision, "--rounds", "1" if sizes.smoke else "3",
                                  "--out", str(agvm_out), *sizes.heads])
    try:
        measured = agvm_bench.measure(args, info)
    except Exception as err:  # the BN rows below still run
        rows.append({"what": "AGVM overhead", "error": f"{type(err).__name__}: {err}"[:200]})
        traceback.print_exc()
        measured = []
    agvm_out.write_text("".join(json.dumps(r) + "\n" for r in measured))
    for r in measured:
        rows.append({"what": f"{r['optimizer']} tau {r['tau'] or '-'}", "s_per_iter": r["s_per_iter"],
                     "overhead_pct": r["overhead_pct"]})
    _release()
    variants = [("per-GPU BN", ["model.norm=per_gpu"]), ("cross-GPU BN, ours", ["model.cgbn_impl=ours"])]
    if info.device.type == "cuda":
        variants.append(("cross-GPU BN, torch fused", ["model.cgbn_impl=torch"]))
    steps = {}
    for label, extra in variants:
        training, step = pipeline_step(_detector(sizes, sizes.r50, batch, precision, 0, *extra), info, batch, h, w)
        _force_bn_group(training.engine.module)
        for _ in range(sizes.warmup):
            step()
        steps[label] = step
    times = {label: [] for label in steps}
    for _ in range(1 if sizes.smoke else 3):  # interleaved rounds: drift hits every variant alike
        for label, step in steps.items():
            times[label].append(time_steps(step, info.device, 0, sizes.timed))
    base = statistics.median(times["per-GPU BN"])
    for label, ts in times.items():
        rows.append({"what": label, "s_per_iter": statistics.median(ts),
                     "overhead_pct": 100 * (statistics.median(ts) / base - 1)})
    note = (f"batch {batch} per step, {h}x{w}, {precision}; AGVM: benchmarks/bench_agvm_overhead.py (2 micro-batches "
            "per step on one GPU); BN: one GPU, the group forced to the world group so the collectives run")
    return {"rows": rows, "note": note, "table": _md_table(rows, ["what", "s_per_iter", "overhead_pct", "error"])}


def part_e(sizes: Sizes, info, out_dir: Path) -> dict:
    backbone, side = ("test_vit", 32) if sizes.smoke else ("vit_giant_patch14_dinov2", 1024)
    gpu_memory = 8 if sizes.smoke else round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    overrides = ["model.detector=faster_rcnn", f"model.backbone={backbone}", "model.activation_checkpointing=true",
                 "model.norm=frozen", f"train.ds_config={REPO}/ds_configs/zero3_{sizes.fast_precision}.json",
                 f"data.min_size={side}", f"data.max_size={side}", "data.workers=2", *sizes.heads]
    plan_json = out_dir / "planner.json"
    from pipeline.tools.planner import main as planner  # python launch/plan.py, in this process

    report = io.StringIO()
    with contextlib.redirect_stdout(report), contextlib.redirect_stderr(report):
        code = planner(["--world-size", "1", "--gpu-memory", str(gpu_memory), "--image-size", f"{side}x{side}",
                        "--measure", "--json", str(plan_json), *overrides])
    if code != 0:
        raise RuntimeError(f"planner failed: {report.getvalue()[-1500:]}")
    (out_dir / "planner.txt").write_text(report.getvalue())
    plan = json.loads(plan_json.read_text())
    rows = [{"what": "planner estimate at micro-batch 2", "peak_gib": plan["total_gib"]},
            {"what": "measured, 3 steps at micro-batch 2", "peak_gib": plan["measured"]["peak_mem_gib"]}]
    recommended = plan["max_micro_batch"]
    if sizes.smoke:  # the planner's measured run is the smoke's training run: same micro-batch, same launcher
        micro, iters, summary = 2, plan["measured"]["iterations"], plan["measured"]
    else:
        micro, iters = recommended, 20
        summary = _train_once(overrides + [f"train.micro_batch={micro}", f"schedule.max_iters={iters}"])
    rows.append({"what": f"trained {iters} steps at the recommended micro-batch {recommended}"
                         + (f" (smoke: the planner's measured run, micro-batch {micro})" if sizes.smoke else ""),
                 "peak_gib": summary["peak_mem_gib"], "img_s": summary["images_per_s"], "images_per_step": micro})
    note = (f"{backbone} Faster R-CNN, ZeRO-3 {sizes.fast_precision}, activation checkpointing, {side}x{side}, "
            f"{gpu_memory} GiB device; planner: python launch/plan.py --measure")
    return {"rows": rows, "note": note, "table": _md_table(rows, ["what", "peak_gib", "img_s", "images_per_step"])}


def _train_once(overrides: list[str]) -> dict:
    """One training run of ``launch/train.py`` (one process, no launcher); its run summary."""
    with tempfile.TemporaryDirectory(prefix="suite-e-") as tmp:
        run = [sys.executable, str(REPO / "launch/train.py"), *overrides, "train.log_every=1",
               "train.evaluate=false", "train.progress=false", "train.final_checkpoint=false",
               "train.ckpt_every_iters=0", "tracking.wandb_mode=disabled", f"train.output_dir={tmp}",
               "train.run_name=e"]
        done = subprocess.run(run, cwd=REPO, capture_output=True, text=True, env=_child_env())
        if done.returncode != 0:
            raise RuntimeError(f"training failed ({' '.join(overrides[-2:])}): {done.stderr[-1500:]}")
        return json.loads((Path(tmp) / "e/run_summary.json").read_text())


def part_f(sizes: Sizes, info, out_dir: Path) -> dict:
    from pipeline.config import load_config
    from pipeline.data.dataset import decode_on_device
    from pipeline.data.loaders import build_datasets, build_loaders
    from pipeline.data.synthetic import make_dataset

    side = (96, 128) if sizes.smoke else (800, 1333)
    root = out_dir / "loader_images"
    make_dataset(root, num_train=16 if sizes.smoke else 96, num_val=2, seed=0, min_side=side[0], max_side=side[1])
    rows = []
    where = "GPU (nvJPEG, batched)" if info.device.type == "cuda" else "training process (CPU)"
    for decode in ("workers", "device"):
        for workers in ([0, 2] if sizes.smoke else [4, 8, 16]):
            cfg = load_config(None, [f"data.root={root}", "data.source=coco", f"data.min_size={side[0]}",
                                     f"data.max_size={side[1]}", f"data.workers={workers}", f"data.decode={decode}"])
            train_set, val_set = build_datasets(cfg.data, with_masks=False)
            loader, _ = build_loaders(cfg.data, train_set, val_set, 2, 1, 1, 0, 0)
            images, tic = 0, None
            for batch_images, targets in loader:
                decoded = decode_on_device(batch_images, targets, info.device)
                if tic is None:  # the workers' start-up is not the loader's rate
                    tic = time.perf_counter()
                    continue
                images += len(decoded)
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            rows.append({"decode": "workers (CPU)" if decode == "workers" else where, "workers": workers,
                         "img_s": images / (time.perf_counter() - tic) if images else ""})
    note = (f"{len(train_set)} JPEGs of {side[0]}-{side[1]} px, the training loader (decode, resize, flip, collate; "
            f"data.decode=workers or device) and the copy to the device, nothing else; "
            f"{os.cpu_count()} CPU cores on this machine")
    return {"rows": rows, "note": note, "table": _md_table(rows, ["decode", "workers", "img_s", "note"])}


def part_g(sizes: Sizes, info, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_child_env())
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    rows = [{"exit": done.returncode, "summary": summary}] + [{"exit": "", "summary": f} for f in failures]
    (out_dir / "pytest_gpu.log").write_text(done.stdout + done.stderr)
    return {"rows": rows, "note": "the tests marked gpu (they skip without CUDA); full log: pytest_gpu.log",
            "table": _md_table(rows, ["exit", "summary"])}


def part_h(sizes: Sizes, info, out_dir: Path) -> dict:
    import bench_vit_windows

    backbone, side, window = ("test_vit", 64, 2) if sizes.smoke else ("vit_giant_patch14_dinov2", 1024, 14)
    args = bench_vit_windows.parse_args([
        "--backbone", backbone, "--sizes", str(side), "--window", str(window), "--precision", sizes.fast_precision,
        "--rounds", "1" if sizes.smoke else "2", "--steps", "1" if sizes.smoke else "3",
        "--out", str(out_dir / "vit_windows.jsonl"), *sizes.heads])
    rows = bench_vit_windows.measure(args, info)
    (out_dir / "vit_windows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{k: r[k] for k in ("size", "variant", "s_per_step", "vs_global", "peak_above_start_gib")} for r in rows]
    note = (f"{backbone} Faster R-CNN, batch 1, {sizes.fast_precision}, ZeRO-0, window {window} with ViTDet's 4 global "
            "blocks; peak above the step's start; benchmarks/bench_vit_windows.py")
    return {"rows": rows, "note": note, "table": _md_table(rows, list(rows[0]))}


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # no install needed
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a child forms its own one-process job
    return env


# ---------------------------------------------------------------------------- orchestration

def run_parts(keys: str, out_dir: Path, smoke: bool, batches: list[int] | None) -> None:
    """The child process: the parts ``keys``, each result as JSON (an exception: the part's error,
    and the next part still runs)."""
    from pipeline.distributed.job import init_distributed

    logging.basicConfig(level=logging.WARNING)
    info = init_distributed()
    sizes = Sizes(smoke, batches)
    for key in keys:
        tic = time.time()
        try:
            result = globals()[f"part_{key}"](sizes, info, out_dir)
        except Exception:
            traceback.print_exc()
            partial = out_dir / f"part_{key}.json"
            result = json.loads(partial.read_text()) if partial.is_file() else {}
            result["exception"] = traceback.format_exc(limit=-6)
        result["seconds"] = round(time.time() - tic, 1)
        (out_dir / f"part_{key}.json").write_text(json.dumps(result, indent=2, default=str))
        _release()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code paths, in CI")
    p.add_argument("--parts", default="".join(PARTS), help="which parts, e.g. abc or a,b,c")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply every part's time limit")
    p.add_argument("--batch", type=int, nargs="+", help="batches of parts b and c (default 8 16; smoke 2)")
    p.add_argument("--cpu", action="store_true", help="the real sizes on a CPU (slow: for CPU proxies, e.g. "
                                                      "--cpu --parts c --batch 2 --time-scale 30)")
    p.add_argument("--run-parts", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.run_parts:
        run_parts(args.run_parts, args.out_dir, args.smoke, args.batch)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.smoke or args.cpu):
        print("no CUDA device: --smoke runs the code paths on CPU at tiny sizes, --cpu the real sizes (slow)",
              file=sys.stderr)
        return 2
    suite = {"label": row_label(device), "smoke": args.smoke, "torch": torch.__version__, "argv": sys.argv[1:],
             "parts": {}}
    keys = [k for k in args.parts if k in PARTS]
    # On a GPU each part has a process of its own (a crash or a fragmented allocator stays with its part);
    # the smoke runs them in one process: its time is mostly start-up, which it then pays once.
    for group in ([keys] if args.smoke else [[k] for k in keys]):
        limit = sum(SMOKE_LIMIT if args.smoke else PARTS[k][1] for k in group) * args.time_scale
        for key, part in _run_child("".join(group), limit, args).items():
            suite["parts"][key] = part
            print(f"[{key}] {part['title']}: {part['status']} ({part['seconds']} s)", flush=True)
    (args.out_dir / "suite.json").write_text(json.dumps(suite, indent=2, default=str))
    report = _report(suite)
    (args.out_dir / "suite.md").write_text(report)
    print(report)
    return 0 if all(part["status"] == "ok" for part in suite["parts"].values()) else 1


def _run_child(keys: str, limit: float, args) -> dict[str, dict]:
    """Run the parts ``keys`` in one child process within ``limit`` seconds; each part's row."""
    for key in keys:
        (args.out_dir / f"part_{key}.json").unlink(missing_ok=True)
    cmd = [sys.executable, __file__, str(args.out_dir), "--run-parts", keys] + (["--smoke"] if args.smoke else []) \
        + (["--batch", *map(str, args.batch)] if args.batch else [])
    tic = time.time()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit, env=_child_env())
        log, exit_status = done.stdout + done.stderr, f"failed (exit {done.returncode})" if done.returncode else ""
    except subprocess.TimeoutExpired as err:
        log, exit_status = _text(err.stdout) + _text(err.stderr), f"stopped after its {limit:.0f} s limit"
    (args.out_dir / f"part_{keys}.log").write_text(log)
    parts, stopper = {}, None
    for key in keys:
        result_file = args.out_dir / f"part_{key}.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if result.get("exception"):
            status, error = "failed (exception)", result.pop("exception")
        elif result and not result.get("partial"):
            status, error = "ok", ""
        elif stopper:  # never started: an earlier part took the process down with it
            status, error = f"not run (part {stopper} stopped its process)", ""
        else:  # the child died or ran out of time in this part
            status, stopper = exit_status or "failed (no result written)", key
            error = "\n".join(log.strip().splitlines()[-8:])
        if status != "ok" and result.get("rows"):  # what it measured before it stopped
            result["table"] = _md_table(result["rows"], list(dict.fromkeys(k for r in result["rows"] for k in r)))
            result["note"] = "partial: the rows measured before the part stopped"
        if error:
            result["error"] = error
        parts[key] = {"title": PARTS[key][0], "status": status,
                      "seconds": result.pop("seconds", round(time.time() - tic, 1)), **result}
    return parts


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _report(suite: dict) -> str:
    label = suite["label"]
    lines = [f"# GPU suite: {label['device']}, {label['date']}, commit {label['commit']}, torch {suite['torch']}"
             + (" (smoke: CPU, tiny sizes; not GPU figures)" if suite["smoke"] else ""), ""]
    for key, part in suite["parts"].items():
        lines += [f"## ({key}) {part['title']}: {part['status']}, {part['seconds']} s", ""]
        if part.get("note"):
            lines += [part["note"], ""]
        if part.get("table"):
            lines += [part["table"], ""]
        if part.get("error"):
            lines += ["```", part["error"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a child's traceback goes to its log, which the table quotes
        traceback.print_exc()
        sys.exit(1)
