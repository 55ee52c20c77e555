"""Checkpoints at scale: completeness, pruning, damaged files, resuming on another number of ranks.

The end-to-end tests run the real entry point under the real launcher and kill or damage what a
cluster would: a save cut short by kill -9 after DeepSpeed wrote ``latest`` but before every rank's
shard was on disk, a truncated file, a resume on fewer ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from pipeline.checkpoint import manager as ckpt
from pipeline.config import load_config
from pipeline.distributed.launcher import free_port
from pipeline.errors import ConfigError
from pipeline.train.tracking import read_metrics

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)


def _fake_checkpoint(ckpt_dir: Path, iteration: int, complete: bool = True) -> str:
    tag = ckpt.tag_of(iteration)
    (ckpt_dir / tag).mkdir(parents=True)
    torch.save({"w": torch.arange(1000.0)}, ckpt_dir / tag / "mp_rank_00_model_states.pt")
    if complete:
        (ckpt_dir / tag / ckpt.MARKER).write_text(json.dumps({"iteration": iteration}))
    return tag


def test_prune_keeps_the_newest_complete_the_latest_and_every_partial(tmp_path):
    tags = [_fake_checkpoint(tmp_path, it, complete=it != 5) for it in (1, 2, 3, 4, 5)]
    (tmp_path / "latest").write_text(tags[1])  # e.g. a resume_from that went back to iteration 2
    deleted = ckpt.prune(tmp_path, keep=2)
    assert deleted == [tags[0]]
    assert ckpt._tags(tmp_path) == tags[1:]  # 2: latest, 3 and 4: newest complete, 5: partial


def test_resume_never_picks_a_partial_checkpoint(tmp_path):
    assert ckpt.choose(tmp_path) is None  # nothing saved yet: a fresh start
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, complete=False)
    (tmp_path / "latest").write_text("iter_00000004")
    assert ckpt.choose(tmp_path) == "iter_00000002"
    assert ckpt.choose(tmp_path, "iter_00000004") == "iter_00000004"  # asked for by name: loaded, with a warning
    with pytest.raises(ckpt.CheckpointError, match=r"resume_from=iter_00000009: no such checkpoint.*iter_00000002"):
        ckpt.choose(tmp_path, "iter_00000009")


def test_a_marker_cut_short_does_not_mark_a_checkpoint_complete(tmp_path, monkeypatch):
    """A crash while the marker is written must leave no marker at all, never an empty one that
    makes the checkpoint look complete and then breaks the resume that reads it."""
    _fake_checkpoint(tmp_path, 2)
    (tmp_path / "iter_00000004").mkdir()

    real_write_text = Path.write_text

    def crash_mid_write(path, text, *args, **kwargs):
        real_write_text(path, text[:5], *args, **kwargs)
        raise KeyboardInterrupt  # the process dies after a few bytes

    monkeypatch.setattr(Path, "write_text", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.mark_complete(tmp_path, "iter_00000004", {"iteration": 4, "global_batch": 8})
    monkeypatch.undo()
    assert ckpt.complete_tags(tmp_path) == ["iter_00000002"]
    assert ckpt.choose(tmp_path) == "iter_00000002"
    ckpt.mark_complete(tmp_path, "iter_00000004", {"iteration": 4, "global_batch": 8})
    assert ckpt.saved_shape(tmp_path, "iter_00000004") == {"iteration": 4, "global_batch": 8}
    assert [p.name for p in (tmp_path / "iter_00000004").iterdir()] == [ckpt.MARKER]  # no temporary left


def test_a_damaged_file_is_named_with_the_checkpoint_to_go_back_to(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4)
    bad = tmp_path / "iter_00000004/mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[:-100])  # cut short, as by a full disk
    err = ckpt._damaged(tmp_path, "iter_00000004", RuntimeError("PytorchStreamReader failed"))
    assert f"checkpoint file {bad} is damaged" in str(err) and "train.resume_from=iter_00000002" in str(err)
    # every file intact: not the checkpoint's fault, so no "damaged" error (load re-raises the original one;
    # tests/test_resume_paths.py); another world size is refused before any load (check_resume_shape)
    assert ckpt._damaged(tmp_path, "iter_00000002", RuntimeError("DP world size of 2 but the current is 1")) is None


def test_a_resume_that_changes_the_global_batch_is_refused_with_the_fix():
    saved = {"world_size": 2, "micro_batch": 2, "grad_accum": 1, "global_batch": 4, "zero_stage": 0}
    cfg = load_config(None, ["train.micro_batch=2"])
    with pytest.raises(ConfigError, match=r"global batch 4 \(2 ranks.*gives 2.*set train.grad_accum=2"):
        ckpt.check_resume_shape(saved, cfg, 1, 0, "iter_00000002")
    ckpt.check_resume_shape(saved, load_config(None, ["train.micro_batch=2", "train.grad_accum=2"]), 1, 0, "t")
    with pytest.raises(ConfigError, match=r"saved under ZeRO stage 1, this run uses stage 2"):
        ckpt.check_resume_shape(dict(saved, zero_stage=1),
                                load_config(None, ["train.micro_batch=2", "train.grad_accum=2"]), 1, 2, "t")


# ---------------------------------------------------------------------------- end to end

def _train(root: Path, out: Path, ranks: int, *extra: str, **popen) -> list[str]:
    entry = [str(REPO / "launch/train.py"), *tiny_overrides(root, out, "retinanet"), "model.norm=frozen",
             "data.aspect_grouping=false", *extra]
    if ranks == 1:
        return [sys.executable, *entry]
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
            str(free_port()), *entry]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_kill_during_a_save_resumes_from_the_last_complete_checkpoint(shapes_root, tmp_path):
    """2 ranks, ZeRO-1: rank 1's optimizer shard for iteration 4 is a FIFO nobody reads, so rank 1
    blocks inside the save while rank 0 has already written ``latest``; then kill -9."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    common = ("train.ds_config=ds_configs/zero1_fp32.json", "schedule.max_iters=6", "train.ckpt_every_iters=2",
              "train.keep_checkpoints=2")
    victim = subprocess.Popen(_train(shapes_root, tmp_path, 2, *common), env=ENV, cwd=REPO, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (ckpts / "iter_00000002" / ckpt.MARKER).is_file():
            assert victim.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
        fifo = ckpts / "iter_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        fifo.parent.mkdir()
        os.mkfifo(fifo)
        while not ((ckpts / "latest").read_text().strip() == "iter_00000004"):
            assert victim.poll() is None and time.time() < deadline, "the run ended without reaching the save"
            time.sleep(0.02)
        time.sleep(1.0)  # rank 0 is done and waiting; rank 1 is stuck mid-save
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert not (ckpts / "iter_00000004" / ckpt.MARKER).exists(), "the cut-short checkpoint must not look complete"
    fifo.unlink()  # the partial files stay, as after a real crash
    resumed = subprocess.run(_train(shapes_root, tmp_path, 2, *common, "train.resume=true"), env=ENV, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "never completed" in resumed.stderr and "resuming at iteration 2" in resumed.stderr
    assert sorted(_losses(run_dir)) == list(range(1, 7))
    assert ckpt.complete_tags(ckpts) == ["iter_00000004", "iter_00000006"]  # keep_checkpoints=2 pruned 2


def _two_ranks_then_one(root: Path, tmp_path: Path, *common: str) -> tuple[dict, dict, str]:
    """Train on 2 ranks (micro-batch 2) with a checkpoint at iteration 2, then resume that one on 1 rank
    with grad_accum 2; returns both runs' losses and the resumed run's log."""
    run_dir = tmp_path / "run"
    ref = subprocess.run(_train(root, tmp_path, 2, *common), env=ENV, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    fatal = ref.stderr[ref.stderr.find("Fatal Python error"):][:4000] if "Fatal Python error" in ref.stderr else ""
    # stdout: the launcher names the rank; fatal: the stacks faulthandler dumped (conftest), if a signal killed it
    assert ref.returncode == 0, (ref.stdout[-1500:], fatal, ref.stderr[-3000:])
    expected = _losses(run_dir)
    resumed = subprocess.run(_train(root, tmp_path, 1, *common, "train.grad_accum=2",
                                    "train.resume_from=iter_00000002"),
                             env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at iteration 2" in resumed.stderr
    return expected, _losses(run_dir), resumed.stderr


def _assert_continues(got: dict, expected: dict) -> None:
    assert sorted(got) == [1, 2, 3, 4]
    for it in (3, 4):
        assert got[it] == pytest.approx(expected[it], rel=1e-4), (it, got, expected)


def test_resume_on_fewer_ranks_continues_the_saved_run(shapes_root, tmp_path):
    """Saved by 2 ranks (ZeRO-0, micro-batch 2), resumed by 1 rank with grad_accum 2: the same global
    batches (aspect grouping off, frozen BN: the same pairs of images per micro-batch), so the same
    losses as the 2-rank run from the named checkpoint on; a global batch that would change is refused;
    a damaged file is named."""
    run_dir = tmp_path / "run"
    common = ("schedule.max_iters=4", "train.ckpt_every_iters=2", "train.evaluate=false")
    expected, got, _ = _two_ranks_then_one(shapes_root, tmp_path, *common)
    _assert_continues(got, expected)

    refused = subprocess.run(_train(shapes_root, tmp_path, 1, *common, "train.resume=true"), env=ENV, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "set train.grad_accum=2" in refused.stderr, refused.stderr[-3000:]

    model_file = run_dir / "checkpoints/iter_00000004/mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    damaged = subprocess.run(_train(shapes_root, tmp_path, 1, *common, "train.grad_accum=2", "train.resume=true"),
                             env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert damaged.returncode == 2, damaged.stderr[-3000:]
    assert f"checkpoint file {model_file} is damaged" in damaged.stderr
    assert "train.resume_from=iter_00000002" in damaged.stderr and "Traceback" not in damaged.stderr


def test_zero3_agvm_resume_on_fewer_ranks_reshards_and_continues_the_saved_run(shapes_root, tmp_path):
    """The same under ZeRO-3 with AGVM-SGD: the 2-rank shards are converted to DeepSpeed's universal
    format and loaded by 1 rank; losses (and AGVM's state, which steers them) continue the saved run's.
    tests/test_reshard.py checks the state itself, for every stage and both optimizer families."""
    common = ("schedule.max_iters=4", "train.ckpt_every_iters=2", "train.evaluate=false",
              "train.ds_config=ds_configs/zero3_fp32.json", "optim.name=agvm_sgd", "agvm.tau=1", "agvm.start_iter=1")
    expected, got, log = _two_ranks_then_one(shapes_root, tmp_path, *common)
    assert "resharding through DeepSpeed's universal format" in log and "(resharded)" in log
    _assert_continues(got, expected)
    assert (tmp_path / "run/checkpoints/iter_00000002/universal/converted.json").is_file()
