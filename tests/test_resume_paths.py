"""The run directory's records survive a kill or a full disk, and a retry does not mix two runs' logs.

A full disk is made real with ``RLIMIT_FSIZE`` in a child process (writes beyond the limit fail
with EFBIG, as they would with ENOSPC); a kill mid-append is a torn last line of ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from pipeline.errors import DataError
from pipeline.train.tracking import read_metrics, start_metrics_afresh, truncate_metrics

RECORDS = [{"iteration": i, "train/loss": 1.0 / i} for i in range(1, 41)]


def _write_log(run_dir: Path, records: list[dict], torn: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)
    return path


def _with_file_size_limit(limit: int, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose files cannot grow beyond ``limit`` bytes (a full disk)."""
    prelude = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_full_disk_during_the_resume_rewrite_keeps_the_history(tmp_path):
    path = _write_log(tmp_path, RECORDS)
    before = path.read_text()
    done = _with_file_size_limit(200, f"""
        from pipeline.train.tracking import truncate_metrics
        truncate_metrics(__import__("pathlib").Path({str(tmp_path)!r}), after=30)
    """)
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-2000:]
    assert path.read_text() == before, "the metrics history was lost to a failed rewrite"
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"], "a temporary file was left behind"


def test_a_full_disk_while_writing_the_run_summary_keeps_the_old_one(tmp_path):
    summary = tmp_path / "run_summary.json"
    summary.write_text(json.dumps({"iterations": 10, "diverged": False, "metrics": {}}))
    before = summary.read_text()
    done = _with_file_size_limit(len(before) + 10, f"""
        from pipeline.utils.files import write_json
        write_json(__import__("pathlib").Path({str(summary)!r}), {{"iterations": 20, "padding": "x" * 5000}})
    """)
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-2000:]
    assert summary.read_text() == before


def test_the_trainer_writes_its_json_files_atomically():
    """Every JSON file the trainer and the study runner rewrite goes through ``write_json`` (a study
    runner reads run_summary.json on every start: a torn one would stop it)."""
    for module in ("pipeline/train/trainer.py", "pipeline/tools/evaluate.py", "pipeline/studies/runner.py"):
        source = (REPO / module).read_text()
        assert ".write_text(json.dumps" not in source, f"{module} writes JSON in place"


def test_a_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    path = _write_log(tmp_path, RECORDS, torn='{"iteration": 41, "train/lo')
    with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
        assert read_metrics(tmp_path) == RECORDS
    assert any(str(path) in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)
    truncate_metrics(tmp_path, after=30)
    assert read_metrics(tmp_path) == RECORDS[:30]
    assert path.read_text().endswith("\n")


def test_a_damaged_line_inside_the_log_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(tmp_path, RECORDS[:2])
    path.write_text(path.read_text() + "not json\n" + json.dumps(RECORDS[2]) + "\n")
    with pytest.raises(DataError, match=f"{path}:3: not a JSON record"):
        read_metrics(tmp_path)


def test_a_retry_before_the_first_checkpoint_starts_the_log_afresh(tmp_path):
    """``train.resume=auto`` and no checkpoint yet (an attempt that crashed before its first save):
    the earlier attempt's records are moved aside, not appended to."""
    _write_log(tmp_path, RECORDS[:12])
    (tmp_path / "run_summary.json").write_text("{}")
    moved = start_metrics_afresh(tmp_path)
    assert read_metrics(tmp_path) == []
    assert moved and [json.loads(ln) for ln in moved.read_text().splitlines()] == RECORDS[:12]
    assert not (tmp_path / "run_summary.json").exists()
    assert start_metrics_afresh(tmp_path) is None  # nothing to move


# ---- real runs: rollback, divergence between logs, a resume at the last iteration, the EMA ----

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
for _var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_var, None)


def _train(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch/train.py"), *tiny_overrides(root, out, "faster_rcnn"), *extra]
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


REFERENCE = ("schedule.max_iters=8", "train.ckpt_every_iters=2", "train.keep_checkpoints=10")


@pytest.fixture(scope="module")
def reference_run(shapes_root, tmp_path_factory) -> Path:
    """8 iterations, a complete checkpoint every 2; the trajectory the other runs are compared with."""
    out = tmp_path_factory.mktemp("reference")
    done = _train(shapes_root, out, *REFERENCE)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "run"


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest / "run")
    return dest / "run"


def test_a_rollback_retires_the_newer_checkpoints(reference_run, shapes_root, tmp_path):
    """Resumed from iter 4 while 6 and 8 exist: those move aside (named in the log), the run redoes 5-8
    with the reference's losses, and a later automatic resume continues this trajectory, not the old one."""
    run_dir = _copy_run(reference_run, tmp_path)
    done = _train(shapes_root, tmp_path, *REFERENCE, "train.resume=true", "train.resume_from=iter_00000004")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "abandons the newer checkpoint(s) ['iter_00000006', 'iter_00000008']: moved to" in done.stderr
    retired, = (run_dir / "checkpoints").glob("retired-*")
    assert sorted(p.name for p in retired.iterdir()) == ["iter_00000006", "iter_00000008"]
    assert [done.stderr.count(f"checkpoint iter_{i:08d} saved") for i in (6, 8)] == [1, 1]  # written afresh
    want, got = _losses(reference_run), _losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for it in range(5, 9):
        assert abs(got[it] - want[it]) <= 1e-5 * abs(want[it]), (it, got[it], want[it])


def test_a_resume_at_the_last_iteration_rewrites_nothing_and_keeps_the_summary(reference_run, shapes_root, tmp_path):
    """A crash in the final evaluation, resumed: the final checkpoint (which the load memory-maps) is
    not rewritten, and run_summary.json keeps the throughput and peak memory of the run."""
    run_dir = _copy_run(reference_run, tmp_path)
    final = run_dir / "checkpoints" / "iter_00000008"
    stamps = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    (run_dir / "run_summary.json").unlink()
    done = _train(shapes_root, tmp_path, *REFERENCE, "train.resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming at iteration 8" in done.stderr and "complete already: not rewritten" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == stamps
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["iterations"] == 8 and summary["images_per_s"] and summary["peak_mem_gib"] > 0, summary


def test_weights_that_diverge_between_logs_are_never_checkpointed(shapes_root, tmp_path):
    """Divergence after iteration 1, logged only at the end (log_every=100), a checkpoint every
    iteration: no checkpoint of non-finite weights is marked complete, and the run stops as diverged."""
    done = _train(shapes_root, tmp_path, "schedule.max_iters=6", "schedule.warmup_iters=0", "optim.base_lr=1e8",
                  "train.log_every=100", "train.ckpt_every_iters=1", "train.keep_checkpoints=10")
    assert done.returncode == 3, done.stderr[-3000:]  # diverged
    assert "weights are not finite" in done.stderr
    from pipeline.checkpoint.manager import complete_tags

    ckpt_dir = tmp_path / "run" / "checkpoints"
    for tag in complete_tags(ckpt_dir):
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        bad = [n for n, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
        assert not bad, f"{tag} is marked complete with non-finite weights: {bad[:3]}"


def _ema_resume_worker(rank: int, world: int, overrides: list, out: str) -> None:
    from pipeline.config import load_config
    from pipeline.distributed.job import init_distributed
    from pipeline.train.build import build_training
    from pipeline.train.trainer import checkpoint_to_resume, resume

    cfg = load_config(None, overrides)
    info = init_distributed()
    point = checkpoint_to_resume(cfg, info.world)
    training = build_training(cfg, info)
    resume(cfg, info, training, point)
    shadow = training.ema.full_state_dict()
    live = {n: p.detach() for n, p in training.engine.module.named_parameters() if p.requires_grad}
    torch.save({"max_diff": max((shadow[n] - live[n]).abs().max().item() for n in live),
                "updates": training.ema.updates}, Path(out) / "ema.pt")


def test_an_ema_resumed_from_a_checkpoint_without_one_starts_from_the_loaded_weights(reference_run, shapes_root,
                                                                                       tmp_path):
    from conftest import run_distributed

    _copy_run(reference_run, tmp_path)
    overrides = [*tiny_overrides(shapes_root, tmp_path, "faster_rcnn"), *REFERENCE, "train.resume=true",
                 "train.ema_decay=0.9"]
    run_distributed(_ema_resume_worker, 1, overrides, str(tmp_path))
    got = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert got["max_diff"] == 0 and got["updates"] == 0, got


# ---- exit status 2 only for what a retry cannot fix ----

def test_an_attempt_killed_in_its_first_save_is_retried_afresh(tmp_path, caplog):
    """No complete checkpoint, only a cut-short one: an automatic resume starts afresh (a retry can
    succeed) instead of refusing with a CheckpointError (exit status 2, never retried)."""
    from pipeline.checkpoint.manager import choose, retire_newer

    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "iter_00000500").mkdir(parents=True)
    (ckpt_dir / "latest").write_text("iter_00000500")
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint.manager"):
        assert choose(ckpt_dir) is None
    assert "none of them marked complete" in caplog.text and "train.resume_from=iter_00000500" in caplog.text
    assert retire_newer(ckpt_dir, None) == ["iter_00000500"]
    assert not (ckpt_dir / "latest").exists() and len(list(ckpt_dir.glob("retired-*/iter_00000500"))) == 1


class _FailingEngine:
    def __init__(self, error: Exception):
        self.error = error

    def load_checkpoint(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize("error", [MemoryError("out of memory"), OSError(5, "Input/output error")])
def test_a_load_that_fails_for_another_reason_than_a_damaged_file_keeps_its_error(tmp_path, error):
    """Out of memory or an I/O error while loading an intact checkpoint: the error itself (exit 1, a
    retry may get past it), not "damaged, delete it"."""
    from pipeline.checkpoint.manager import load

    folder = tmp_path / "checkpoints" / "iter_00000004"
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(3)}, folder / "mp_rank_00_model_states.pt")  # intact
    with pytest.raises(type(error)):
        load(_FailingEngine(error), tmp_path / "checkpoints", "iter_00000004")


def test_a_damaged_file_is_still_named(tmp_path):
    from pipeline.checkpoint.manager import load
    from pipeline.errors import CheckpointError

    folder = tmp_path / "checkpoints" / "iter_00000004"
    folder.mkdir(parents=True)
    good = folder / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=f"{good} is damaged"):
        load(_FailingEngine(RuntimeError("PytorchStreamReader failed")), tmp_path / "checkpoints", "iter_00000004")


def test_an_io_error_reading_an_image_is_not_a_data_error(shapes_root, monkeypatch):
    """EIO/ESTALE from a network filesystem: its own OSError (retried), not "remove it from the annotations"."""
    import errno

    from pipeline.data.dataset import CocoDetection

    ds = CocoDetection(shapes_root / "train", shapes_root / "annotations/instances_train.json", 64, 96)

    def eio(self):
        raise OSError(errno.EIO, "Input/output error", str(self))

    monkeypatch.setattr(Path, "read_bytes", eio)
    with pytest.raises(OSError) as err:
        ds[0]
    assert err.value.errno == errno.EIO and not isinstance(err.value, DataError)


def test_an_ema_of_another_model_is_a_checkpoint_error(tmp_path):
    from types import SimpleNamespace

    from pipeline.errors import CheckpointError
    from pipeline.optim.ema import WeightEMA

    engine = SimpleNamespace(zero_optimization_stage=lambda: 0, module=torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="no EMA for 2 parameter"):
        WeightEMA(engine, 0.9).load_full_state_dict({"other.weight": torch.zeros(2, 2)}, "ema.pt")


def _saved(schedule: str, **extra) -> dict:
    return {"iteration": 4, "schedule": schedule, **extra}


def test_a_checkpoint_without_agvm_state_or_with_another_schedule_is_refused(tmp_path):
    from types import SimpleNamespace

    from pipeline.config import load_config
    from pipeline.errors import CheckpointError
    from pipeline.train.trainer import check_saved_state

    schedule = SimpleNamespace(describe=lambda: "global batch 8 -> lr 0.02; 693 iterations (63/epoch)")
    training = SimpleNamespace(agvm=object(), schedule=schedule)
    cfg = load_config(None, ["optim.name=agvm_sgd", "train.grad_accum=2"])
    with pytest.raises(CheckpointError, match="holds no AGVM state .*'agvm'.*agvm_sgd"):
        check_saved_state(_saved(schedule.describe()), tmp_path, cfg, training)
    check_saved_state(_saved(schedule.describe(), agvm={}), tmp_path, cfg, training)  # the same: fine
    other = "global batch 8 -> lr 0.02; 792 iterations (72/epoch)"  # another dataset size
    with pytest.raises(CheckpointError, match="(?s)saved with the schedule.*792 iterations.*this run has.*693 iter"):
        check_saved_state(_saved(other, agvm={}), tmp_path, cfg, training)
    check_saved_state(_saved(other, agvm={}), tmp_path, cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"allow_schedule_change": True})}), training)


# ---- one job per run directory ----

def test_a_second_job_on_a_live_run_directory_is_refused_and_a_dead_ones_lock_taken_over(shapes_root, tmp_path):
    """A requeue while the old job still runs: refused with the owner named, nothing written into the
    live run. After the old job is killed (its lock left behind), the next launch takes the lock over."""
    import signal
    import time

    from pipeline.train.run_lock import lock_path

    run_dir = tmp_path / "run"
    long = ("schedule.max_iters=400", "train.ckpt_every_iters=0", "train.final_checkpoint=false", "train.evaluate=false")
    first = subprocess.Popen([sys.executable, str(REPO / "launch/train.py"),
                              *tiny_overrides(shapes_root, tmp_path, "faster_rcnn"), *long],
                             env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline:  # training, lock held
        assert first.poll() is None, "the first job ended before the second could start"
        time.sleep(0.1)
    owner = json.loads(lock_path(run_dir).read_text())
    assert owner["pid"] == first.pid
    second = _train(shapes_root, tmp_path, *long)  # not a resume: it would move the live run aside
    assert first.poll() is None, "the first job must still be running"
    assert second.returncode == 1 and f"is in use by pid {first.pid} on {owner['host']}" in second.stderr
    assert not list(tmp_path.glob("run.old-*")), "the live run was moved aside"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock_path(run_dir).is_file()  # left behind by the killed job
    third = _train(shapes_root, tmp_path, "schedule.max_iters=2", "train.evaluate=false")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"was left by pid {first.pid}" in third.stderr and "which is gone: taking it over" in third.stderr
    assert not lock_path(run_dir).exists()  # released at the end


def test_a_lock_held_on_another_host_is_refused_with_its_owner(tmp_path):
    from pipeline.train.run_lock import RunLocked, acquire, lock_path

    run_dir = tmp_path / "run"
    lock_path(run_dir).write_text(json.dumps({"host": "node-17", "pid": 1, "job_id": "4242", "started": "then"}))
    with pytest.raises(RunLocked, match="in use by pid 1 on node-17, job 4242, since then"):
        acquire(run_dir)


def test_a_resume_that_redoes_logged_steps_continues_in_a_new_wandb_run(tmp_path, monkeypatch):
    """W&B keeps a run's steps increasing and drops re-logged ones: a resume from an iteration before the
    last logged one opens a new W&B run whose config names the earlier one; a resume that redoes nothing
    keeps the same run."""
    from pipeline.config import load_config
    from pipeline.train.tracking import Tracker, new_wandb_run_after_rollback

    monkeypatch.setenv("WANDB_SILENT", "true")
    _write_log(tmp_path, RECORDS[:10])
    (tmp_path / "wandb_id.txt").write_text("firstrun0001")
    assert truncate_metrics(tmp_path, after=10) == 0  # nothing redone: no new run
    assert truncate_metrics(tmp_path, after=6) == 4
    new = new_wandb_run_after_rollback(tmp_path, 6)
    assert new and new != "firstrun0001" and (tmp_path / "wandb_id.txt").read_text() == new
    cfg = load_config(None, ["tracking.wandb_mode=offline"])
    tracker = Tracker(cfg, tmp_path, rank=0, resume=True)
    try:
        assert tracker.wandb.id == new
        assert tracker.wandb.config["previous_wandb_runs"] == [{"run_id": "firstrun0001", "until_iteration": 6}]
    finally:
        tracker.finish()


def _clock_step_worker(rank: int, world: int, overrides: list, out: str) -> None:
    """A run during which the wall clock keeps stepping back (10 s per reading: NTP corrections, at worst)."""
    import time

    from pipeline.config import load_config
    from pipeline.train.trainer import run

    real, calls = time.time, [0]

    def stepping():
        calls[0] += 1
        return real() - 10.0 * calls[0]

    time.time = stepping
    try:
        run(load_config(None, overrides))
    finally:
        time.time = real


def test_throughput_survives_a_wall_clock_step(shapes_root, tmp_path):
    from conftest import run_distributed

    overrides = [*tiny_overrides(shapes_root, tmp_path, "faster_rcnn"), "schedule.max_iters=6", "train.log_every=2",
                 "train.evaluate=false"]
    run_distributed(_clock_step_worker, 1, overrides, str(tmp_path))
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["images_per_s"] > 0 and summary["train_seconds"] > 0, summary
    assert all(r["train/images_per_s"] > 0 for r in read_metrics(tmp_path / "run") if "train/images_per_s" in r)


def test_resume_true_needs_a_checkpoint_and_auto_starts_fresh_without_one(reference_run, shapes_root, tmp_path):
    """``train.resume=true`` on a run directory with no complete checkpoint is an error naming it (exit status
    2, before anything is built); ``auto`` starts fresh there, and continues where a checkpoint exists."""
    short = ("schedule.max_iters=2", "train.evaluate=false")
    refused = _train(shapes_root, tmp_path / "typo", *short, "train.resume=true")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "holds no complete checkpoint" in refused.stderr and "train.resume=auto" in refused.stderr
    assert str(tmp_path / "typo/run/checkpoints") in refused.stderr
    fresh = _train(shapes_root, tmp_path / "fresh", *short, "train.resume=auto")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "starting fresh" in fresh.stderr and sorted(_losses(tmp_path / "fresh/run")) == [1, 2]
    run_dir = _copy_run(reference_run, tmp_path)
    resumed = _train(shapes_root, tmp_path, *REFERENCE, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at iteration 8 from {run_dir / 'checkpoints/iter_00000008'}" in resumed.stderr


@pytest.mark.slow
def test_a_resume_from_a_periodic_checkpoint_is_exact(shapes_root, tmp_path):
    """2 ranks, a checkpoint every 2 iterations; the run resumed from iteration 2 must log the losses of the
    uninterrupted run. Found by the multi-host fault tests: rank 1's RoI losses differed from the first
    resumed step on, with equal images, RNG, weights and momentum: torchvision's RoI pooler had inferred
    its level scales from the first batch each process saw (fixed in models/detector.py: _roi_pool;
    tests/test_models.py::test_roi_pooling_does_not_depend_on_the_first_batch_seen)."""
    from pipeline.distributed.launcher import free_port

    def job(out: Path, *extra: str) -> dict[int, float]:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "launch/train.py"), *tiny_overrides(shapes_root, out, "faster_rcnn"), "schedule.max_iters=6",
               "train.micro_batch=1", "train.ckpt_every_iters=2", "train.keep_checkpoints=10", "train.evaluate=false",
               "model.norm=frozen", *extra]
        done = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return _losses(out / "run")

    want = job(tmp_path / "ref")
    shutil.copytree(tmp_path / "ref", tmp_path / "again")
    got = job(tmp_path / "again", "train.resume_from=iter_00000002")
    assert got == want
