"""Experiment entry: config -> data -> model -> DeepSpeed engine -> train loop -> COCO eval.

``run(cfg)`` reads as the list of build steps; ``train_loop`` is the plain loop
with evaluation, checkpointing and tracking as a flat list of steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from models.detector import build_detector, count_parameters
from pipeline import engine as eng
from pipeline.config import ExperimentConfig, dump_config
from pipeline.data import build_datasets, build_loaders
from pipeline.agvm import AGVMMonitor, modules_of
from pipeline.evaluation import evaluate
from pipeline.memory import current_memory, peak_memory, release_free_heap, reset_peak_memory
from pipeline.norm import build_bn_group, convert_norms, sync_running_stats
from pipeline.optim import build_optimizer, build_param_groups, check_zero_support
from pipeline.schedule import build_schedule
from pipeline.synthetic import make_dataset
from pipeline.tracking import Tracker

log = logging.getLogger("pipeline")


def log_dist(msg: str, *args) -> None:
    """Log on rank 0 only (every rank runs the same code)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info(msg, *args)


def archive_previous_run(run_dir: Path, rank: int) -> None:
    """A fresh (not resumed) run in a used run directory moves the old one aside, so its
    checkpoints are neither mixed with the new run's nor resumed by mistake, and nothing is lost."""
    if rank == 0 and run_dir.exists() and any(run_dir.iterdir()):
        old = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(old)
        log.warning("%s held an earlier run: moved to %s (pass train.resume=true to continue a run instead)",
                    run_dir, old)
    dist.barrier()


def prepare_data(cfg: ExperimentConfig, rank: int) -> None:
    """Write the embedded synthetic dataset (rank 0) when the config asks for it."""
    d = cfg.data
    if d.source == "synthetic" and rank == 0:
        make_dataset(d.root, num_train=d.synthetic_train, num_val=d.synthetic_val, seed=0)
    dist.barrier()


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True).float() for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _reduce_window(window: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Mean of the window's loss terms over steps and ranks: one collective, one host sync."""
    names = sorted(window)
    stacked = torch.stack([window[n] for n in names]) / count
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    values = dict(zip(names, stacked.tolist()))
    values["loss"] = sum(values.values())
    return values


def _truncate_log(run_dir: Path, after: int) -> None:
    """On resume, drop records logged after the checkpoint: they are about to be redone."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["iteration"] <= after]
        path.write_text("".join(ln + "\n" for ln in keep))


class Diverged(FloatingPointError):
    """The loss became NaN or infinite at ``iteration``."""

    def __init__(self, iteration: int, message: str):
        super().__init__(message)
        self.iteration = iteration


class TrainState:
    """What the loop needs besides the engine: built once by ``run``."""

    def __init__(self, cfg, info, engine, train_loader, val_loader, val_set, schedule, tracker, with_masks, agvm):
        self.cfg, self.info, self.engine, self.schedule, self.tracker = cfg, info, engine, schedule, tracker
        self.agvm: AGVMMonitor | None = agvm
        self.train_loader, self.val_loader, self.val_set, self.with_masks = train_loader, val_loader, val_set, with_masks
        self.ckpt_dir = cfg.train.run_dir / "checkpoints"
        spe = schedule.steps_per_epoch
        self.eval_every = max(1, round(cfg.train.eval_every_epochs * spe)) if cfg.train.eval_every_epochs else 0
        self.progress = cfg.train.progress and info.rank == 0
        self.windows: list[tuple[int, float]] = []  # (images, seconds) per log window: throughput
        self.peak_bytes = 0  # max over ranks and log windows


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def memory_gib(device: torch.device) -> float:
    """This rank's memory now, in GiB (for the start-up log)."""
    return current_memory(device) / 2**30


def save_checkpoint(state: TrainState, it: int) -> None:
    sync_running_stats(state.engine.module)  # rank 0 saves the model: it must hold every group's view
    client = {"schedule": state.schedule.describe()}
    if state.agvm is not None:  # identical on every rank: mu is a function of all ranks' gradients
        client["agvm"] = state.agvm.state_dict()
    eng.save_checkpoint(state.engine, state.ckpt_dir, it, client)


def run_evaluation(state: TrainState, it: int) -> dict:
    sync_running_stats(state.engine.module)  # every rank evaluates with the same BN statistics
    metrics = evaluate(state.engine, state.val_loader, state.val_set, state.info.device, state.with_masks,
                       progress=state.progress)
    if metrics:
        state.tracker.log({f"val/{k}": v for k, v in metrics.items()}, step=it)
        log_dist("iter %d: bbox AP %.4f AP50 %.4f", it, metrics["bbox/AP"], metrics["bbox/AP50"])
    return metrics


def _log_step(state: TrainState, it: int, window: dict, count: int, seconds: float, bar) -> None:
    values = _reduce_window(window, count)
    if not math.isfinite(values["loss"]):
        raise Diverged(it,
            f"loss is {values['loss']} at iteration {it}: training diverged. The last checkpoint is in "
            f"{state.ckpt_dir}; lower optim.base_lr or lengthen schedule.warmup_iters and resume.")
    record = {f"train/{k}": v for k, v in values.items()}
    record["train/lr"] = state.schedule.lr(it - 1)
    images = count * state.schedule.global_batch
    record["train/images_per_s"] = images / seconds
    record["train/epoch"] = it / state.schedule.steps_per_epoch
    state.windows.append((images, seconds))
    # Peak per rank (CUDA: allocated tensors; CPU: resident set), the largest rank's.
    state.peak_bytes = max(state.peak_bytes, _max_over_ranks(peak_memory(state.info.device), state.info.device))
    record["train/peak_mem_gib"] = state.peak_bytes / 2**30
    state.tracker.log(record, step=it)
    if bar is not None:
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{record['train/lr']:.4f}",
                        ips=f"{record['train/images_per_s']:.1f}")
    elif state.info.rank == 0:
        log.info("iter %d loss %.4f lr %.5f %.1f img/s", it, values["loss"], record["train/lr"],
                 record["train/images_per_s"])


def write_run_summary(state: TrainState, iteration: int, metrics: dict, diverged: bool, seconds: float) -> None:
    """``run_summary.json``: what a study row needs, in one file (rank 0)."""
    if state.info.rank != 0:
        return
    timed = state.windows[1:] or state.windows  # the first window holds start-up costs
    images, secs = sum(w[0] for w in timed), sum(w[1] for w in timed)
    summary = {
        "iterations": iteration, "total_iterations": state.schedule.total_iters, "diverged": diverged,
        "global_batch": state.schedule.global_batch, "world_size": state.info.world,
        "train_seconds": seconds, "images_per_s": images / secs if secs else None,
        "peak_mem_gib": state.peak_bytes / 2**30, "device": str(state.info.device.type),
        "metrics": metrics,
    }
    path = state.cfg.train.run_dir / "run_summary.json"
    path.write_text(json.dumps(summary, indent=2))


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
        (run_dir / "rank_params.json").write_text(json.dumps(
            {"identical": agree, "fingerprint_sum": [float(e[:, 0].sum()) for e in everyone]}, indent=2))
        if not agree:
            log.error("parameters differ across ranks after training: see %s", run_dir / "rank_params.json")
    return agree


def train_loop(state: TrainState, start_iter: int) -> dict:
    """Optimizer steps from ``start_iter`` to the end of the schedule; returns the final metrics."""
    cfg, engine, schedule = state.cfg, state.engine, state.schedule
    sampler, accum, device = state.train_loader.batch_sampler, cfg.train.grad_accum, state.info.device
    it, metrics = start_iter, {}
    reset_peak_memory(device)  # the training peak, not the build's
    window, count, tic = {}, 0, time.time()
    bar = tqdm(total=schedule.total_iters, initial=it, desc="train", disable=not state.progress,
               mininterval=2.0)
    while it < schedule.total_iters:
        sampler.set_position(*divmod(it, schedule.steps_per_epoch))
        for micro, (images, targets) in enumerate(state.train_loader):
            if micro % accum == 0:
                eng.set_lr(engine, [schedule.lr(it)] * len(engine.optimizer.param_groups))
            losses = engine(*_to_device(images, targets, device))
            boundary = (micro + 1) % accum == 0
            if state.agvm is not None:  # arms AGVM's gradient tap on estimate iterations
                state.agvm.before_backward(micro % accum)
            engine.backward(sum(losses.values()))
            if state.agvm is not None and boundary:
                state.agvm.before_step()  # Phi and mu from this iteration's gradients
            engine.step()
            if state.agvm is not None and boundary:
                state.agvm.after_step()
            for k, v in losses.items():  # stays on the device: no host sync per step
                window[k] = window.get(k, 0) + v.detach() / accum
            if not boundary:
                continue
            it, count = it + 1, count + 1
            bar.update(1)
            if state.agvm is not None and state.agvm.fresh:
                lr = schedule.lr(it - 1)
                state.tracker.log(state.agvm.record({m: lr for m in state.agvm.mu}), step=it)
            if it % cfg.train.log_every == 0 or it == schedule.total_iters:
                _log_step(state, it, window, count, time.time() - tic, bar if state.progress else None)
                window, count, tic = {}, 0, time.time()
            if state.eval_every and it % state.eval_every == 0 and it < schedule.total_iters:
                metrics = run_evaluation(state, it)
            if cfg.train.ckpt_every_iters and it % cfg.train.ckpt_every_iters == 0:
                save_checkpoint(state, it)
            if it >= schedule.total_iters:
                break
    bar.close()
    if cfg.train.final_checkpoint:
        save_checkpoint(state, it)
    if not cfg.train.evaluate:
        return metrics
    return run_evaluation(state, it) or metrics


def prepare_norms(model: torch.nn.Module, cfg: ExperimentConfig) -> None:
    """MegDet's cross-GPU BN (or the configured alternative) in place of every BatchNorm."""
    group, layout = None, None
    if cfg.model.norm == "cgbn":
        group, layout = build_bn_group(cfg.model, cfg.train.micro_batch)
    bn_params = [p for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters(recurse=False)]
    with eng.gathered(bn_params):  # built under zero.Init: copy the full values
        count = convert_norms(model, cfg.model.norm, group, cfg.model.gn_groups)
    if layout is not None:
        sizes = sorted({len(g) for g in layout})
        log_dist("norm: cgbn on %d BatchNorm layers; %d BN group(s) of %s rank(s) = %s images each: %s",
                 count, len(layout), "/".join(map(str, sizes)),
                 "/".join(str(n * cfg.train.micro_batch) for n in sizes),
                 layout if len(layout) <= 16 else f"{layout[:4]} ...")
    else:
        log_dist("norm: %s (%d BatchNorm layers replaced)", cfg.model.norm, count)


def run(cfg: ExperimentConfig) -> dict:
    """Train and evaluate one experiment; returns final metrics on rank 0 ({} on other ranks)."""
    info = eng.init_distributed()
    if not cfg.train.resume:
        archive_previous_run(cfg.train.run_dir, info.rank)
    torch.manual_seed(cfg.train.seed)  # identical model init on every rank
    prepare_data(cfg, info.rank)
    with_masks = cfg.model.detector == "mask_rcnn"
    train_set, val_set = build_datasets(cfg.data, with_masks)
    ds_config = eng.fill_ds_config(eng.load_ds_config(cfg.train.ds_config), cfg, info.world,
                                   str(cfg.train.ds_config))
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    check_zero_support(cfg.optim.name, zero_stage, str(cfg.train.ds_config))
    with eng.model_init_context(ds_config, cfg.train.zero_init):
        model = build_detector(cfg.model, train_set.num_classes, cfg.data.min_size, cfg.data.max_size).to(info.device)
    prepare_norms(model, cfg)
    release_free_heap()  # zero.Init's construction buffers
    log_dist("model: %s %s, %s parameters; rank 0 holds %.2f GiB", cfg.model.detector, cfg.model.backbone,
             f"{count_parameters(model):,}", memory_gib(info.device))
    torch.manual_seed(cfg.train.seed + info.rank)  # RoI/anchor sampling differs per rank
    train_loader, val_loader = build_loaders(cfg.data, train_set, val_set, cfg.train.micro_batch,
                                             cfg.train.grad_accum, info.world, info.rank, cfg.train.seed)
    sampler = train_loader.batch_sampler
    schedule = build_schedule(cfg.schedule, cfg.optim, sampler.global_batch, sampler.steps_per_epoch)
    groups = build_param_groups(model, cfg.model.detector, cfg.optim)
    agvm = None
    if cfg.optim.name.startswith("agvm"):  # before initialize: its gradient tap must run before ZeRO's hooks
        agvm = AGVMMonitor(cfg.agvm, modules_of(groups), info.world, info.rank, cfg.train.grad_accum,
                           start_iter=schedule.warmup_iters)
        log_dist("AGVM: modules %s, halves by %s, tau %d, modulation from iteration %d%s", list(agvm.mu),
                 "ranks" if agvm.halves.by_ranks else "micro-batches", cfg.agvm.tau, agvm.start,
                 f" to {cfg.agvm.stop_iter}" if cfg.agvm.stop_iter else "")
    optimizer = build_optimizer(groups, cfg.optim, schedule.lr(0), agvm)
    engine = eng.build_engine(model, optimizer, ds_config)
    release_free_heap()  # ZeRO's flattening copies are freed: give them back before training
    log_dist("engine: ZeRO stage %d; rank 0 holds %.2f GiB", zero_stage, memory_gib(info.device))
    if agvm is not None:
        agvm.attach(engine)
    run_dir = cfg.train.run_dir
    start_iter = 0
    if cfg.train.resume:
        client_state = eng.load_checkpoint(engine, run_dir / "checkpoints")
        start_iter = client_state["iteration"] if client_state else 0
        if agvm is not None and client_state:
            agvm.load_state_dict(client_state["agvm"])
        log_dist("resuming at iteration %d" if client_state else "no checkpoint in %s: starting fresh",
                 start_iter if client_state else run_dir / "checkpoints")
        if info.rank == 0:
            _truncate_log(run_dir, start_iter)
    if info.rank == 0:
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        (run_dir / "schedule.json").write_text(json.dumps(schedule.as_dict(), indent=2))
        (run_dir / "model.json").write_text(json.dumps(  # what pipeline.export needs to rebuild the model
            {"num_classes": train_set.num_classes, "parameters": count_parameters(model)}, indent=2))
    log_dist("%d train / %d val images, %d classes, %d ranks; %s", len(train_set), len(val_set),
             train_set.num_classes, info.world, schedule.describe())
    tracker = Tracker(cfg, run_dir, info.rank, resume=cfg.train.resume)
    tracker.add_config({"resolved_schedule": schedule.as_dict()})
    state = TrainState(cfg, info, engine, train_loader, val_loader, val_set, schedule, tracker, with_masks, agvm)
    tic = time.time()
    try:
        metrics = train_loop(state, start_iter)
    except Diverged as err:  # a diverged run is a result (a study row), not a lost run
        write_run_summary(state, err.iteration, {}, True, time.time() - tic)
        tracker.finish()
        raise
    check_ranks_agree(engine, run_dir)
    write_run_summary(state, schedule.total_iters, metrics, False, time.time() - tic)
    if info.rank == 0:
        (run_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        tracker.summary(metrics)
    tracker.finish()
    return metrics
