"""Experiment entry: validate -> build (data, model, engine: ``pipeline.train.build``) -> train loop -> COCO eval.

``run(cfg)`` reads as the list of steps; ``train_loop`` is the plain loop, stepping through
the one train step (``pipeline.train.step``), with evaluation, checkpointing and tracking as a flat
list of steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.checkpoint import manager as ckpt
from pipeline.config import ExperimentConfig, dump_config
from pipeline.data.dataset import decode_on_device
from pipeline.distributed.comm_count import CommCounter
from pipeline.distributed.ds_config import engine_config, zero_stage
from pipeline.distributed.ds_internals import count_parameters, weights_finite
from pipeline.distributed.job import DistInfo, init_distributed
from pipeline.distributed.norm import sync_running_stats
from pipeline.distributed.watchdog import JobWatch
from pipeline.errors import CheckpointError
from pipeline.evaluation.coco import evaluate
from pipeline.evaluation.previews import draw_previews, save_previews
from pipeline.optim import ema as ema_io
from pipeline.train import run_lock
from pipeline.train.build import Training, build_training
from pipeline.train.flops import FlopMeter, device_peak_tflops
from pipeline.train.preemption import Preempted, PreemptionWatch
from pipeline.train.profiling import WindowProfiler, oom_report, record_memory_history
from pipeline.train.tracking import Tracker, new_wandb_run_after_rollback, start_metrics_afresh, truncate_metrics
from pipeline.train.validate import validate
from pipeline.train.what_runs import EMULATED_BF16, describe_run, format_block
from pipeline.utils.files import write_json
from pipeline.utils.logger import log_dist
from pipeline.utils.memory import peak_memory, reset_peak_memory

log = logging.getLogger(__name__)


def archive_previous_run(run_dir: Path, rank: int) -> None:
    """A fresh (not resumed) run in a used run directory moves the old one aside, so its
    checkpoints are neither mixed with the new run's nor resumed by mistake, and nothing is lost."""
    if rank == 0 and run_dir.exists() and any(run_dir.iterdir()):
        old = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(old)
        log.warning("%s held an earlier run: moved to %s (pass train.resume=true to continue a run instead)",
                    run_dir, old)
    dist.barrier()


def device_batches(loader, device: torch.device):
    """The loader's (images, targets) micro-batches, copied to ``device`` (pinned memory: asynchronous);
    with ``data.decode=device`` the JPEGs arrive encoded and are decoded there."""
    for images, targets in loader:  # the copies are not kept here: autograd frees them after backward
        images = decode_on_device(images, targets, device)
        yield (images, [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                        for t in targets])


def timed(batches, clock: list[float]):
    """``batches``, adding to ``clock[0]`` the host seconds spent waiting for each (loading, decoding,
    copying): the loop's data time, against which the rest of an iteration is compute."""
    while True:
        tic = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            return
        clock[0] += time.perf_counter() - tic
        yield item


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


def _reduce_window(window: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Mean of the window's loss terms over steps and ranks: one collective, one host sync."""
    names = sorted(window)
    stacked = torch.stack([window[n] for n in names]) / count
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    values = dict(zip(names, stacked.tolist()))
    values["loss"] = sum(values.values())
    return values


class Diverged(FloatingPointError):
    """The loss became NaN or infinite at ``iteration``."""

    agreed = True  # found by a collective: every rank raises it together

    def __init__(self, iteration: int, message: str):
        super().__init__(message)
        self.iteration = iteration


class TrainState:
    """What the loop needs besides the built run: its config, the tracker, throughput and memory so far."""

    def __init__(self, cfg: ExperimentConfig, info: DistInfo, training: Training, tracker: Tracker,
                 carried: Optional[dict] = None):
        self.cfg, self.info, self.training, self.tracker = cfg, info, training, tracker
        self.engine, self.schedule, self.data = training.engine, training.schedule, training.data
        self.ckpt_dir = cfg.train.run_dir / "checkpoints"
        spe = self.schedule.steps_per_epoch
        self.eval_every = max(1, round(cfg.train.eval_every_epochs * spe)) if cfg.train.eval_every_epochs else 0
        self.progress = cfg.train.progress and info.rank == 0
        self.windows: list[tuple[int, float]] = []  # (images, seconds) per log window: throughput
        self.peak_bytes = 0  # max over ranks and log windows
        # Throughput and peak of the attempts before a resume (from the checkpoint): a run resumed at its
        # last iteration still reports them in run_summary.json.
        self.carried = carried or {"images": 0, "seconds": 0.0, "peak_bytes": 0}
        self.watch = PreemptionWatch()  # installed around the loop by run()
        half = training.ds_config.get("torch_autocast", {}).get("enabled", False)
        self.flops = FlopMeter(info.world, cfg.train.peak_tflops or device_peak_tflops(info.device, half))

    def timed_windows(self) -> tuple[int, float]:
        """Images and seconds of this attempt's log windows but the first (it holds start-up costs),
        plus the earlier attempts'."""
        timed = self.windows[1:] or self.windows
        return (self.carried["images"] + sum(w[0] for w in timed),
                self.carried["seconds"] + sum(w[1] for w in timed))

    def progress_record(self) -> dict:
        """What a checkpoint carries for ``timed_windows`` and the peak."""
        images, seconds = self.timed_windows()
        return {"images": images, "seconds": seconds, "peak_bytes": max(self.peak_bytes, self.carried["peak_bytes"])}


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _finite_on_every_rank(engine, device: torch.device) -> bool:
    flag = weights_finite(engine).to(device=device, dtype=torch.float32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def save_checkpoint(state: TrainState, it: int) -> None:
    """Checkpoint ``it``, unless a weight is not finite on some rank: then the run has diverged since
    its last log and no checkpoint of NaN weights is marked complete (or prunes a good one)."""
    if not _finite_on_every_rank(state.engine, state.info.device):
        raise Diverged(it, f"weights are not finite at iteration {it}: training diverged, checkpoint not saved. "
                           f"The last complete checkpoint is in {state.ckpt_dir}; lower optim.base_lr or lengthen "
                           "schedule.warmup_iters and resume.")
    sync_running_stats(state.engine.module)  # rank 0 saves the model: it must hold every group's view
    client = {"schedule": state.schedule.describe(), "progress": state.progress_record()}
    if state.training.agvm is not None:  # identical on every rank: mu is a function of all ranks' gradients
        client["agvm"] = state.training.agvm.state_dict()
    shape = ckpt.launch_shape(state.cfg, state.info.world, state.engine.zero_optimization_stage())
    if ckpt.is_complete(state.ckpt_dir, ckpt.tag_of(it)):  # e.g. resumed at the last iteration: saved already
        log_dist(log, "checkpoint %s is complete already: not rewritten", ckpt.tag_of(it))
        return
    if state.training.ema is not None:  # before ckpt.save's completeness marker
        ema_io.save(state.training.ema, state.ckpt_dir / ckpt.tag_of(it))
    if ckpt.save(state.engine, state.ckpt_dir, it, client, shape, state.cfg.train.keep_checkpoints):
        log_dist(log, "checkpoint %s saved", ckpt.tag_of(it))


def run_evaluation(state: TrainState, it: int, final: bool = False) -> dict:
    """COCO evaluation at iteration ``it``; the final one also keeps its detections (``eval_detections.json``)."""
    sync_running_stats(state.engine.module)  # every rank evaluates with the same BN statistics
    report, detections = [], []
    ema = state.training.ema
    with ema.applied() if ema is not None else contextlib.nullcontext():  # the EMA weights, where kept
        metrics = evaluate(state.engine, state.data.val_loader, state.data.val_set, state.info.device,
                           state.cfg.model.detector == "mask_rcnn", state.cfg.model.detections_per_img,
                           progress=state.progress,
                           detections_file=state.cfg.train.run_dir / "eval_detections.json" if final else None,
                           report=report, detections=detections, backend=state.cfg.train.coco_eval)
    if metrics:
        state.tracker.log({f"val/{k}": v for k, v in metrics.items()}, step=it)
        grid = draw_previews(detections, state.data.val_set, state.cfg.train.preview_images)
        if grid is not None:
            state.tracker.image("val/predictions", save_previews(grid, state.cfg.train.run_dir, it), step=it)
        log_dist(log, "iter %d: bbox AP %.4f AP50 %.4f; COCOeval:\n%s", it, metrics["bbox/AP"], metrics["bbox/AP50"],
                 "\n".join(report))
    return metrics


def _log_step(state: TrainState, it: int, window: dict, count: int, seconds: float, data_seconds: float,
              bar) -> None:
    values = _reduce_window(window, count)
    if not math.isfinite(values["loss"]):
        raise Diverged(it,
            f"loss is {values['loss']} at iteration {it}: training diverged. The last checkpoint is in "
            f"{state.ckpt_dir}; lower optim.base_lr or lengthen schedule.warmup_iters and resume.")
    record = {f"train/{k}": v for k, v in values.items()}
    record["train/lr"] = state.schedule.lr(it - 1)
    images = count * state.schedule.global_batch
    record["train/images_per_s"] = images / seconds
    # Per iteration: host seconds waiting for data vs the rest, and the training time left at this pace
    # (evaluations and checkpoints not included). Rank 0's clock; the window's end is synchronised.
    record["train/data_s"] = data_seconds / count
    record["train/compute_s"] = (seconds - data_seconds) / count
    record["train/eta_s"] = (state.schedule.total_iters - it) * seconds / count
    record["train/epoch"] = it / state.schedule.steps_per_epoch
    rates = state.flops.rates(record["train/images_per_s"])
    record.update({f"train/{k}": v for k, v in rates.items()})
    state.windows.append((images, seconds))
    # Peak per rank (CUDA: allocated tensors; CPU: resident set), the largest rank's.
    state.peak_bytes = max(state.peak_bytes, _max_over_ranks(peak_memory(state.info.device), state.info.device))
    record["train/peak_mem_gib"] = state.peak_bytes / 2**30
    state.tracker.log(record, step=it)
    if bar is not None:
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{record['train/lr']:.4f}",
                        ips=f"{record['train/images_per_s']:.1f}", data=f"{record['train/data_s']:.2f}s")
    elif state.info.rank == 0:
        log.info("iter %d loss %.4f lr %.5f %.1f img/s%s; per iteration %.3f s data + %.3f s compute; ETA %s", it,
                 values["loss"], record["train/lr"], record["train/images_per_s"], _flop_rates(rates),
                 record["train/data_s"], record["train/compute_s"], _clock(record["train/eta_s"]))


def _flop_rates(rates: dict) -> str:
    if not rates:
        return ""
    mfu = f", MFU {100 * rates['mfu']:.1f}%" if "mfu" in rates else ""
    return f" ({rates['tflops_per_rank']:.3g} TFLOP/s per rank{mfu})"


def write_run_summary(state: TrainState, iteration: int, metrics: dict, diverged: bool, seconds: float) -> None:
    """``run_summary.json``: what a study row needs, in one file (rank 0)."""
    if state.info.rank != 0:
        return
    images, secs = state.timed_windows()
    peak = max(state.peak_bytes, state.carried["peak_bytes"])
    summary = {
        "iterations": iteration, "total_iterations": state.schedule.total_iters, "diverged": diverged,
        "global_batch": state.schedule.global_batch, "world_size": state.info.world,
        "train_seconds": seconds, "images_per_s": images / secs if secs else None,
        "peak_mem_gib": peak / 2**30 if peak else None, "device": str(state.info.device.type),
        "flops_per_image": state.flops.flops_per_image, "peak_tflops": state.flops.peak_tflops,
        **(state.flops.rates(images / secs) if secs else {}), "metrics": metrics,
    }
    write_json(state.cfg.train.run_dir / "run_summary.json", summary)


def check_ranks_agree(engine, run_dir: Path) -> bool:
    """Every rank must hold the same parameters and BN statistics after training (ZeRO 0-2 keep
    full copies; running statistics were averaged by the last checkpoint's sync).

    Compares a float64 fingerprint (sum and sum of squares per tensor) across ranks,
    writes it to ``rank_params.json`` and logs an error when ranks drifted apart.
    """
    if engine.zero_optimization_stage() == 3:  # partitioned: each parameter exists once
        return True
    tensors = list(engine.module.parameters()) + [b for b in engine.module.buffers() if b.is_floating_point()]
    # One float64 copy at a time (not of the whole model), kept on the device: NCCL needs that.
    mine = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                        for t in tensors])
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    agree = all(torch.equal(everyone[0], other) for other in everyone[1:])
    if dist.get_rank() == 0:
        write_json(run_dir / "rank_params.json",
                   {"identical": agree, "fingerprint_sum": [float(e[:, 0].sum()) for e in everyone]})
        if not agree:
            log.error("parameters differ across ranks after training: see %s", run_dir / "rank_params.json")
    return agree


def stop_if_preempted(state: TrainState, it: int) -> None:
    """When any rank was signalled (``pipeline.train.preemption``): a complete checkpoint of ``it`` on
    every rank's behalf, then ``Preempted`` on every rank."""
    signum = state.watch.agreed(state.info.device)
    if signum:
        save_checkpoint(state, it)
        raise Preempted(it, signum)


def train_loop(state: TrainState) -> dict:
    """Optimizer steps from the train step's iteration to the end of the schedule; returns the final metrics."""
    cfg, schedule = state.cfg, state.schedule
    it = state.training.step.iteration
    reset_peak_memory(state.info.device)  # the training peak, not the build's
    bar = tqdm(total=schedule.total_iters, initial=it, desc="train", disable=not state.progress,
               mininterval=2.0)
    profiler = WindowProfiler(cfg.train.profile, cfg.train.run_dir / "profile", state.info.rank, state.info.device)
    counter = CommCounter(state.info.local_world) if cfg.train.count_comm else None
    try:
        with counter or contextlib.nullcontext():
            it, metrics = _epochs(state, it, bar, profiler, counter)
    finally:
        profiler.close()  # a window cut short (preemption, an error) still leaves its trace
    bar.close()
    if cfg.train.final_checkpoint:
        save_checkpoint(state, it)
    if not cfg.train.evaluate:
        return metrics
    return run_evaluation(state, it, final=True) or metrics


def _iteration(state: TrainState, batches, profiler: WindowProfiler) -> dict:
    """One optimizer step: the launch's first counts its FLOPs; a CUDA OOM is reported with a snapshot."""
    step = state.training.step
    profiler.before(step.iteration + 1)
    try:
        if state.flops.flops_per_image is None:  # this rank's images in a step: micro-batch x accumulation
            losses = state.flops.count(lambda: step(batches), state.cfg.train.micro_batch * step.accum)
        else:
            losses = step(batches)
    except torch.OutOfMemoryError as err:
        raise oom_report(err, state.cfg.train.run_dir / "oom", state.info.rank, state.info.device) from err
    profiler.after(step.iteration)
    return losses


def _record_comm(state: TrainState, counter: CommCounter, it: int, **what: bool) -> None:
    """``train.count_comm``: this iteration's collectives (with what else it did) as one line of
    comm_counts.jsonl on rank 0; the counter starts afresh for the next."""
    if state.info.rank == 0:
        with open(state.cfg.train.run_dir / "comm_counts.jsonl", "a") as f:
            f.write(json.dumps({"iteration": it, **what, "rows": counter.table()}) + "\n")
    counter.reset()


def _epochs(state: TrainState, it: int, bar, profiler: WindowProfiler,
            counter: Optional[CommCounter] = None) -> tuple[int, dict]:
    """The loop of train_loop: iterations from ``it`` to the end, with logs, evaluations and checkpoints."""
    cfg, schedule, step = state.cfg, state.schedule, state.training.step
    sampler, spe = state.data.train_loader.batch_sampler, schedule.steps_per_epoch
    metrics = {}
    window, count, tic, data_clock = {}, 0, time.monotonic(), [0.0]
    while it < schedule.total_iters:
        sampler.set_position(*divmod(it, spe))  # a resumed run continues inside its epoch
        batches = timed(device_batches(state.data.train_loader, state.info.device), data_clock)
        for _ in range(min(spe - it % spe, schedule.total_iters - it)):
            for k, v in _iteration(state, batches, profiler).items():  # on the device: no sync
                window[k] = window.get(k, 0) + v
            it, count = step.iteration, count + 1
            bar.update(1)
            if step.estimated:
                state.tracker.log(state.training.agvm.record(schedule.lr(it - 1)), step=it)
            logged = it % cfg.train.log_every == 0 or it == schedule.total_iters
            if logged:
                _log_step(state, it, window, count, time.monotonic() - tic, data_clock[0], bar if state.progress else None)
                window, count, tic, data_clock[0] = {}, 0, time.monotonic(), 0.0
                stop_if_preempted(state, it)  # at a log step: the loss window has synchronised already
            pause = time.monotonic()
            evaluated = bool(state.eval_every and it % state.eval_every == 0 and it < schedule.total_iters)
            if evaluated:
                metrics = run_evaluation(state, it)
            # the last iteration's checkpoint is the final one, saved once: rewriting a complete
            # checkpoint in place would leave a damaged one marked complete if the rewrite were cut short
            last = it == schedule.total_iters and cfg.train.final_checkpoint
            saved = bool(cfg.train.ckpt_every_iters and it % cfg.train.ckpt_every_iters == 0 and not last)
            if saved:
                save_checkpoint(state, it)
            if counter is not None:
                _record_comm(state, counter, it, logged=logged, evaluated=evaluated, checkpointed=saved,
                             estimated=step.estimated)
            tic += time.monotonic() - pause  # evaluations and checkpoints are not training time
    return it, metrics


def checkpoint_to_resume(cfg: ExperimentConfig, world: int) -> Optional[ckpt.ResumePoint]:
    """The checkpoint a resumed run loads (``train.resume_from`` or the newest complete one), checked
    against this launch before anything is built; None for a fresh start (``train.resume=auto`` with none
    there; ``true`` with none is an error: the run it names is not there). Checkpoints newer than it
    (or, starting afresh, every one: each was cut short) are moved aside, and a fresh start's log
    begins anew, so nothing of an abandoned attempt is resumed or logged twice."""
    if not cfg.train.resume:
        return None
    ckpt_dir = cfg.train.run_dir / "checkpoints"
    tag = ckpt.choose(ckpt_dir, cfg.train.resume_from)
    if tag is None and cfg.train.resume is True:  # asked to continue a run that is not there: a typo, most often
        raise CheckpointError(f"train.resume=true, but {ckpt_dir} holds no complete checkpoint to continue: check "
                              "train.output_dir and train.run_name, or pass train.resume=auto to start fresh when "
                              "there is none (what a requeued job wants)")
    point = None if tag is None else ckpt.resume_point(ckpt_dir, tag, cfg, world, zero_stage(engine_config(cfg, world)))
    if dist.get_rank() == 0:
        ckpt.retire_newer(ckpt_dir, tag)
        if tag is None:
            start_metrics_afresh(cfg.train.run_dir)
    dist.barrier()
    if tag is None:
        log_dist(log, "no complete checkpoint in %s: starting fresh", ckpt_dir)
    return point


def check_saved_state(client_state: dict, folder: Path, cfg: ExperimentConfig, training: Training) -> None:
    """Refuse (exit status 2: a retry cannot help) a checkpoint this run cannot continue: AGVM asked
    for and none saved, or another schedule (a changed dataset size, epoch count or policy moves the
    lr schedule and the epoch position under the run) unless ``train.allow_schedule_change``."""
    if training.agvm is not None and "agvm" not in client_state:
        raise CheckpointError(f"{folder} holds no AGVM state (key 'agvm'): it was saved with optim.name other than "
                              f"agvm_*, this run uses {cfg.optim.name}. Resume with the saved optimizer, or start "
                              "afresh (train.resume=false)")
    saved, now = client_state.get("schedule"), training.schedule.describe()
    if saved is None or saved == now:
        return
    message = f"{folder} was saved with the schedule\n  {saved}\nthis run has\n  {now}"
    if not cfg.train.allow_schedule_change:
        raise CheckpointError(f"{message}\n(a changed dataset size, epoch count or lr policy moves the lr and the "
                              "epoch position): restore the saved settings, or pass train.allow_schedule_change=true "
                              "to continue on the new schedule")
    log.warning("%s\ncontinuing on the new schedule (train.allow_schedule_change=true)", message)


def resume(cfg: ExperimentConfig, info: DistInfo, training: Training, point: ckpt.ResumePoint) -> Optional[dict]:
    """Load the checkpoint (engine, RNG, AGVM, EMA) and continue at its iteration; returns the throughput
    and peak memory it carries (``TrainState.progress_record``; None from checkpoints before they did)."""
    run_dir = cfg.train.run_dir
    client_state = ckpt.load(training.engine, run_dir / "checkpoints", point.tag, point.universal)
    check_saved_state(client_state, run_dir / "checkpoints" / point.tag, cfg, training)
    training.step.iteration = client_state["iteration"]
    if training.agvm is not None:
        training.agvm.load_state_dict(client_state["agvm"])
    if training.ema is not None and not ema_io.load(training.ema, run_dir / "checkpoints" / point.tag):
        training.ema.restart()  # built with the initial weights, before the load
        log_dist(log, "%s has no weight EMA (saved without train.ema_decay): the EMA starts from the loaded weights",
                 run_dir / "checkpoints" / point.tag)
    log_dist(log, "resuming at iteration %d from %s%s", training.step.iteration, run_dir / "checkpoints" / point.tag,
             " (resharded)" if point.universal else "")
    if info.rank == 0 and truncate_metrics(run_dir, training.step.iteration):  # before the tracker opens the log
        new_wandb_run_after_rollback(run_dir, training.step.iteration)
    return client_state.get("progress")


def write_job_record(cfg: ExperimentConfig, info: DistInfo, training: Training) -> None:
    """``job.json``: every rank's own view of its place (host, node, local rank, launcher), the BN
    groups and AGVM's halves, so a multi-host job's layout is on record, not inferred (every rank
    calls; rank 0 writes). The log says which ranks run on which host."""
    mine = {"rank": info.rank, "world": info.world, "local_rank": info.local_rank, "local_world": info.local_world,
            "node": info.node, "host": socket.gethostname(), "launcher": info.launcher, "device": str(info.device)}
    ranks = [None] * info.world
    dist.all_gather_object(ranks, mine)
    if info.rank != 0:
        return
    halves = training.agvm.tap.halves_of if training.agvm is not None else None
    cfg.train.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg.train.run_dir / "job.json", {
        "ranks": ranks, "bn_groups": training.bn_layout,
        "agvm_halves": None if halves is None else {"by": halves.by, "first": sorted(halves.first)}})
    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault(r["host"], []).append(r["rank"])
    log.info("job: %d rank(s) on %d host(s): %s", info.world, len(by_host),
             "; ".join(f"{h} {v}" for h, v in by_host.items()))


def write_run_files(cfg: ExperimentConfig, training: Training) -> None:
    """The resolved config, ds_config and schedule, and what ``pipeline.tools.export`` needs (rank 0)."""
    run_dir = cfg.train.run_dir
    dump_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "ds_config.json", training.ds_config)
    write_json(run_dir / "schedule.json", training.schedule.as_dict())
    train_set = training.data.train_set
    write_json(run_dir / "model.json",
               {"num_classes": training.data.num_classes, "parameters": count_parameters(training.engine.module),
                "categories": [{"id": c, "name": n} for c, n in zip(train_set.cat_ids, train_set.cat_names)]})


def run(cfg: ExperimentConfig) -> dict:
    """Train and evaluate one experiment; returns final metrics on rank 0 ({} on other ranks)."""
    info = init_distributed(cfg.train.collective_timeout_s)
    validate(cfg, info.world, info.local_world)
    with run_lock.held(cfg.train.run_dir, info.rank):  # one job per run directory
        with JobWatch(info.rank, info.world, cfg.train.run_dir, cfg.train.stall_report_s,
                      cfg.train.collective_timeout_s, cuda=info.device.type == "cuda") as watch:
            return _run_locked(cfg, info, watch)


def _run_locked(cfg: ExperimentConfig, info: DistInfo, watch: JobWatch) -> dict:
    if not cfg.train.resume:
        archive_previous_run(cfg.train.run_dir, info.rank)
    point = checkpoint_to_resume(cfg, info.world)
    record_memory_history(info.device, cfg.train.oom_snapshot)  # before the model: its blocks are in the history
    training = build_training(cfg, info, load_universal=point is not None and point.universal)
    training.step.mark = watch.mark
    carried = resume(cfg, info, training, point) if point is not None else None
    write_job_record(cfg, info, training)
    if info.rank == 0:
        write_run_files(cfg, training)
    tracker = Tracker(cfg, cfg.train.run_dir, info.rank, resume=cfg.train.resume)
    state = TrainState(cfg, info, training, tracker, carried)
    log_dist(log, "%d train / %d val images, %d classes, %d ranks; %s", len(training.data.train_set),
             len(training.data.val_set), training.data.num_classes, info.world, training.schedule.describe())
    what = describe_run(cfg, info, training)
    if info.rank == 0:
        log.info(format_block(what))
        if "EMULATED" in what["precision"]:
            log.warning(EMULATED_BF16)
    tracker.add_config({"resolved_schedule": training.schedule.as_dict(), "what_runs": what})
    tic = time.monotonic()  # not the wall clock: an NTP step must not make throughput negative
    try:
        with state.watch:
            metrics = train_loop(state)
    except Diverged as err:  # a diverged run is a result (a study row), not a lost run
        write_run_summary(state, err.iteration, {}, True, time.monotonic() - tic)
        tracker.finish()
        raise
    except Preempted:
        tracker.finish()
        raise
    check_ranks_agree(training.engine, cfg.train.run_dir)
    write_run_summary(state, training.schedule.total_iters, metrics, False, time.monotonic() - tic)
    if info.rank == 0:
        write_json(cfg.train.run_dir / "eval_metrics.json", metrics)
        tracker.summary(metrics)
    tracker.finish()
    return metrics
