"""pipeline/distributed/comm_count.py: what goes over torch.distributed, counted exactly, in real 2-rank
gloo runs. Truths computed another way: the payloads of hand-made collectives, and for one training
step of the real engine under ZeRO-0 DeepSpeed's gradient all-reduce of every trainable parameter's
fp32 gradient (4 bytes x the trainable parameters) and cross-GPU BN's three all-reduces per BN layer
(MegDet's Algorithm 1: forward, the group's sums with its pixel count, then its squared deviations:
C + 1 and C floats; backward, the sums of dy and dy * x_hat: 2C)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_BACKBONE, run_distributed
from pipeline.distributed.comm_count import CommCounter


def _collectives(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo")
    pair = dist.new_group([0, 1])
    rows = {}
    for local_world in (1, 2):  # one rank per node: the pair spans nodes; two per node: it is one node's
        with CommCounter(local_world) as counter:
            dist.all_reduce(torch.ones(1000))
            dist.all_reduce(torch.ones(10, dtype=torch.float64), group=pair)
            shard = torch.ones(5)
            dist.all_gather_into_tensor(torch.empty(10), shard)
            dist.reduce_scatter_tensor(torch.empty(3), torch.ones(6))
            # torch 2.14's name for it (AGVM calls it where it exists): counted under the older name
            getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(torch.empty(3), torch.ones(6))
            dist.broadcast(torch.ones(7, dtype=torch.int64), 0)
        rows[local_world] = counter.table()
    if rank == 0:
        json.dump(rows, open(out, "w"))
    dist.destroy_process_group()


def test_payloads_groups_and_scopes_of_hand_made_collectives(tmp_path):
    run_distributed(_collectives, 2, str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    got = {(r["op"], r["dtype"], r["scope"]): (r["calls"], r["bytes"]) for r in rows["1"]}
    assert got == {("all_reduce", "float32", "inter-node"): (1, 4000), ("all_reduce", "float64", "inter-node"): (1, 80),
                   ("all_gather_into_tensor", "float32", "inter-node"): (1, 20),
                   ("reduce_scatter_tensor", "float32", "inter-node"): (2, 48),
                   ("broadcast", "int64", "inter-node"): (1, 56)}
    assert {r["scope"] for r in rows["2"]} == {"intra-node"} and all(r["group"] == 2 for r in rows["2"])


def test_every_tensor_collective_of_torch_distributed_is_counted():
    """A collective the counter does not wrap goes over the wire uncounted, and a plan checked against the
    count would miss it (AGVM's reduce-scatter under torch 2.14's new name did): every function
    torch.distributed exports under a collective's name must be wrapped."""
    from pipeline.distributed.comm_count import _PAYLOAD

    words = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "gather", "scatter", "all_to_all", "reduce",
             "send", "recv", "isend", "irecv")
    exported = {n for n in dir(dist) if callable(getattr(dist, n)) and not n.startswith("_")
                and any(n == w or n.startswith(w + "_") for w in words)}
    objects = {n for n in exported if n.endswith("_object") or n.endswith("_object_list") or n == "reduce_op"}
    assert exported - objects - set(_PAYLOAD) == set()


MODEL = ["model.detector=faster_rcnn", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
         "model.anchor_scale=4", "model.rpn_post_nms_train=100", "model.rpn_post_nms_test=100",
         "model.roi_batch_per_image=32", "model.box_head_dim=32", "data.min_size=64", "data.max_size=96",
         "train.micro_batch=2",
         "schedule.policy=constant", "schedule.max_iters=2", "train.ds_config=ds_configs/zero0_fp32.json"]


def _one_step(rank: int, world: int, norm: str, out: str) -> None:
    from test_engine import _batch

    from pipeline.config import load_config
    from pipeline.distributed.job import init_distributed
    from pipeline.distributed.norm import CrossGPUBatchNorm
    from pipeline.train.build import build_training

    info = init_distributed()
    cfg = load_config(None, MODEL + [f"model.norm={norm}", "model.bn_group=world"])
    training = build_training(cfg, info, data=False, num_classes=3)
    training.step(iter([_batch(rank, 0, 0)]))  # the first step: DeepSpeed's set-up collectives
    with CommCounter(1) as counter:
        training.step(iter([_batch(rank, 1, 0)]))
    module = training.engine.module
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    bn_channels = [m.num_features for m in module.modules() if isinstance(m, CrossGPUBatchNorm)]
    if rank == 0:
        json.dump({"table": counter.table(), "trainable": trainable, "bn_channels": bn_channels}, open(out, "w"))


@pytest.mark.parametrize("norm", ["frozen", "cgbn"])
def test_a_zero0_step_sends_each_gradient_once_and_three_bn_reductions_per_layer(tmp_path, norm):
    run_distributed(_one_step, 2, norm, str(tmp_path / "step.json"))
    got = json.loads((tmp_path / "step.json").read_text())
    table = {(r["op"], r["dtype"]): r for r in got["table"]}
    bn = got["bn_channels"]
    assert bool(bn) == (norm == "cgbn")
    bn_bytes = sum(4 * ((c + 1) + c + 2 * c) for c in bn)  # forward sums + count, squares; backward
    reduced = table.pop(("all_reduce", "float32"))
    assert reduced["bytes"] == 4 * got["trainable"] + bn_bytes, (reduced, got["trainable"], bn_bytes)
    assert not table, table  # nothing else goes over the wire in a ZeRO-0 fp32 step


# --------------------------------------------------------------------------- the model against the count

CASES = {  # world (ranks per node) -> cases: (ds preset, norm, bn_group, optimizer)
    (2, 2): [(z, n, g, o) for z in ("zero0_fp32", "zero1_fp32", "zero2_fp32")
             for n, g, o in (("frozen", "world", "sgd"), ("frozen", "world", "agvm_sgd"), ("cgbn", "world", "sgd"))]
    + [("zero3_fp32", "frozen", "world", "sgd"), ("zero3_fp32", "cgbn", "world", "sgd")]
    # gradient accumulation (2 micro-batches): AGVM's micro-batch halves (one BN group of every rank)
    + [(z, "cgbn", "world", o, 2) for z in ("zero0_fp32", "zero1_fp32", "zero2_fp32", "zero3_fp32")
       for o in ("sgd", "agvm_sgd")]
    # activation checkpointing: the recomputed forward under ZeRO-3 gathers nothing new (the copy is kept)
    + [("zero3_fp32", "frozen", "world", "sgd", 1, "model.activation_checkpointing=true")],
    (4, 2): [(z, n, g, o) for z in ("zero0_fp32", "zero1_fp32", "zero2_fp32")
             for n, g, o in (("frozen", "world", "sgd"), ("cgbn", "node", "sgd"), ("cgbn", "node", "agvm_sgd"))]
    + [("zero3_fp32", "cgbn", "node", "agvm_sgd"), ("zero2_fp32", "cgbn", "node", "agvm_sgd", 2),
       ("zero3_fp32", "cgbn", "world", "agvm_sgd", 2)],
}


def _case_overrides(case) -> list[str]:
    preset, norm, bn_group, optim, accum, *extra = (*case, 1)[:5] + tuple(case[5:])
    return MODEL[:-1] + [f"train.ds_config=ds_configs/{preset}.json", f"model.norm={norm}", f"model.bn_group={bn_group}",
                         f"optim.name={optim}", "agvm.tau=1", "agvm.start_iter=0", f"train.grad_accum={accum}", *extra]


def _case_name(case) -> str:
    return "/".join(str(c) for c in case)


def _count_cases(rank: int, world: int, port: int, local_world: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local_world),
                      LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from test_engine import _batch

    from pipeline.config import load_config
    from pipeline.distributed.job import exit_skipping_teardown, init_distributed, leave_job
    from pipeline.train.build import build_training

    info = init_distributed()
    measured = {}
    for case in CASES[(world, local_world)]:
        training = build_training(load_config(None, _case_overrides(case)), info, data=False, num_classes=3)
        accum = (*case, 1)[4]
        training.step(iter([_batch(rank, 0, m) for m in range(accum)]))
        if case[0].startswith("zero3"):  # past the steps in which ZeRO-3 records (and checks) its parameter trace
            training.step(iter([_batch(rank, 2, m) for m in range(accum)]))
        with CommCounter(local_world) as counter:
            training.step(iter([_batch(rank, 1, m) for m in range(accum)]))
        measured[_case_name(case)] = [[r["op"], r["group"], r["scope"], r["dtype"], r["calls"], r["bytes"]]
                                    for r in counter.table()]
        del training
    if rank == 0:
        json.dump(measured, open(out, "w"))
    leave_job()
    exit_skipping_teardown(0, finished=True)


@pytest.mark.parametrize("world,local_world", list(CASES))
def test_the_planned_bytes_are_the_measured_bytes(tmp_path, world, local_world):
    """pipeline/tools/comm_plan.py, from the config alone, against CommCounter on rank 0 of a real job: ZeRO
    0-3 (ZeRO-3 in steady state, after its trace is recorded), FrozenBN and cross-GPU BN (world groups;
    per-node groups on 2 nodes of 2), SGD and AGVM-SGD (an estimate step: rank halves, and micro-batch halves
    under accumulation), 1 and 2 micro-batches per step. Every operation, group, scope, dtype, call count and
    byte equal; a mismatch names them."""
    import torch.multiprocessing as mp

    from pipeline.config import load_config
    from pipeline.distributed.launcher import free_port
    from pipeline.tools.comm_plan import step_transfers, totals

    out = tmp_path / "measured.json"
    mp.start_processes(_count_cases, args=(world, free_port(), local_world, str(out)), nprocs=world,
                       start_method="spawn")
    measured = json.loads(out.read_text())
    for case in CASES[(world, local_world)]:
        planned = totals(step_transfers(load_config(None, _case_overrides(case)), world, local_world, 3))
        got = {tuple(r[:4]): (r[4], r[5]) for r in measured[_case_name(case)]}
        assert got == planned, f"{case}: measured {got}, planned {planned}"


def test_the_planner_prints_the_communication_of_a_cluster_run(capsys):
    """R50-FPN on 64 ranks, 8 per node, ZeRO-1: the gradient all-reduce is 4 bytes x the trainable
    parameters, across nodes; BN groups of 4 ranks stay inside a node; ZeRO-3 gathers one copy (R50 is below
    stage3_max_live_parameters); with accumulation the gradients are reduced once and BN per micro-batch."""
    from conftest import REPO
    from pipeline.tools.planner import main

    args = ["--config", str(REPO / "configs/coco_r50_fpn.yaml"), "--world-size", "64", "--ranks-per-node", "8",
            "--comm", "train.ds_config=ds_configs/zero1_fp32.json", "model.bn_group=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    step, evaluation, checkpoint = out.split("\n\n")
    rows = {line.split()[-1]: line.split() for line in step.splitlines()[2:-1]}
    assert rows["gradients"][:4] == ["all_reduce", "64", "inter-node", "float32"]
    # COCO val2017 (the annotation file is not here): ceil(5000 / 64) = 79 images x 100 detections per rank
    assert evaluation.startswith("at each evaluation (5000 images: COCO val2017's")
    gather = next(line.split() for line in evaluation.splitlines() if line.startswith("gather "))
    assert gather[:5] == ["gather", "64", "inter-node", "float64", "1"]
    assert float(gather[5]) == pytest.approx(7900 * 7 * 8 / 2**20, abs=1e-3) and "7900 rows" in evaluation
    assert checkpoint.startswith("at each checkpoint:") and "barrier" in checkpoint
    assert rows["statistics"][1:3] == ["4", "intra-node"]
    assert main(args[:-2] + ["train.ds_config=ds_configs/zero3_fp32.json"]) == 0
    zero3 = capsys.readouterr().out
    assert "fetched for forward, 1 copy per step" in zero3 and "persistent parameters, gathered after the step" in zero3
    assert "modelled" not in zero3
    assert main(args + ["train.grad_accum=2"]) == 0  # accumulation: ZeRO-1 still reduces once per step
    step = capsys.readouterr().out.split("\n\n")[0]
    accumulated = {line.split()[-1]: line.split() for line in step.splitlines()[2:-1]}
    assert accumulated["gradients"][4] == rows["gradients"][4] == "1"
    assert int(accumulated["statistics"][4]) == 2 * int(rows["statistics"][4])  # BN reduces per micro-batch


_RUN_CASES = {
    # AGVM-SGD at ZeRO-0: every iteration, an estimate every 2nd
    "zero0-agvm": (["train.ds_config=ds_configs/zero0_fp32.json", "model.norm=frozen", "optim.name=agvm_sgd",
                    "agvm.tau=2", "agvm.start_iter=0"], 1),
    # ZeRO-3 with cross-GPU BN (running statistics averaged before evaluating and saving), 32 persistent
    # tensors (gathered after every step and checkpoint) and 28 fetched for forward: from the third
    # iteration, after DeepSpeed's trace-recording steps and first evaluation
    "zero3-cgbn": (["train.ds_config={tmp}/zero3_persist1000.json", "model.norm=cgbn"], 3),
}
_ZERO3_PERSIST_1000 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000}}


@pytest.mark.parametrize("case", sorted(_RUN_CASES))
def test_a_real_run_sends_per_iteration_what_the_plan_says(case, shapes_root, tmp_path):
    """`deepspeed --num_gpus 2 launch/train.py ... train.count_comm=true`: every iteration of a real run
    sends exactly the plan's step, plus AGVM's rows on estimate iterations, the log step's reductions on log
    iterations (every 2nd and the last), an evaluation's (iterations 2 and 4: 8 validation images) and a
    checkpoint's (iteration 3)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO, tiny_overrides
    from pipeline.config import load_config
    from pipeline.distributed.launcher import free_port
    from pipeline.tools.comm_plan import checkpoint_transfers, eval_transfers, log_transfers, step_transfers, totals

    options, first = _RUN_CASES[case]
    (tmp_path / "zero3_persist1000.json").write_text(json.dumps(_ZERO3_PERSIST_1000))
    options = [o.format(tmp=tmp_path) for o in options]
    overrides = [*tiny_overrides(shapes_root, tmp_path, "faster_rcnn"), *options, "train.log_every=2",
                 "schedule.max_iters=5", "train.count_comm=true", "train.evaluate=false",
                 "train.eval_every_epochs=0.5", "train.ckpt_every_iters=3"]  # 4 iterations per epoch
    launcher = Path(sys.executable).parent / "deepspeed"
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                           str(REPO / "launch/train.py"), *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run/comm_counts.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert [(r["logged"], r["evaluated"], r["checkpointed"]) for r in records] == [
        (False, False, False), (True, True, False), (False, False, True), (True, True, False), (True, False, False)]
    cfg = load_config(None, overrides)
    for before, r in zip([None, *records], records):
        if r["iteration"] < first:
            continue
        step = step_transfers(cfg, 2, 2, 3, after_evaluation=before is not None and before["evaluated"]
                              and not before["checkpointed"])
        planned = [t for t in step if t.part != "agvm" or r["estimated"]]
        planned += log_transfers(cfg, 2, 2) if r["logged"] else []
        planned += eval_transfers(cfg, 2, 2, 3, 8) if r["evaluated"] else []
        planned += checkpoint_transfers(cfg, 2, 2, 3) if r["checkpointed"] else []
        got = {(row["op"], row["group"], row["scope"], row["dtype"]): (row["calls"], row["bytes"]) for row in r["rows"]}
        assert got == totals(planned), f"iteration {r['iteration']} ({r}): planned {totals(planned)}"
    if case == "zero0-agvm":
        assert any(r["estimated"] for r in records) and not all(r["estimated"] for r in records)
