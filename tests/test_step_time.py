"""pipeline/tools/step_time.py: the step-time model of a cluster run. Truths computed another way: the
collectives' times by walking a ring's (or a tree's) steps one by one, compute time from the inputs by
hand, and the table's candidates and inputs as printed by ``launch/plan.py --nodes``."""

from __future__ import annotations

import math

import pytest

from conftest import TINY_BACKBONE
from pipeline.tools.step_time import (Link, collective_seconds, intra_link, micro_batch_options, network_link,
                                      transfer_seconds)

LINK = Link("test", 100.0, 5.0)  # 100 GB/s, 5 us per step


def _ring_walk(op: str, payload: float, n: int, bw: float, alpha: float) -> float:
    """Step by step: a ring moves one chunk per rank per step (all-reduce = reduce-scatter, then all-gather)."""
    t = 0.0
    if op in ("all_reduce", "reduce_scatter_tensor"):
        chunk = payload / n  # the input is cut into n chunks; each step passes one on
        for _ in range(n - 1):
            t += alpha + chunk / bw
        if op == "all_reduce":
            for _ in range(n - 1):
                t += alpha + chunk / bw
    elif op == "all_gather_into_tensor":  # payload = this rank's shard; n - 1 steps pass a shard each
        for _ in range(n - 1):
            t += alpha + payload / bw
    return t


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_ring_collectives_take_their_steps_time(op, n):
    payload = 3e8
    got = collective_seconds(op, payload, 1, n, LINK, efficiency=1.0)
    assert got == pytest.approx(_ring_walk(op, payload, n, 100e9, 5e-6), rel=1e-12)


def test_a_tree_all_reduce_pays_log_steps_of_latency_and_twice_the_payload():
    # up and down a binary tree: 2 ceil(log2 n) latencies; pipelined, each link carries the payload both ways
    got = collective_seconds("all_reduce", 1e9, 4, 1024, LINK, efficiency=0.5, algorithm="tree")
    assert got == pytest.approx(2 * 1e9 / 50e9 + 4 * 2 * 10 * 5e-6)


def test_a_group_of_one_costs_nothing_and_an_unknown_collective_is_an_error():
    assert collective_seconds("all_reduce", 1e9, 1, 1, LINK, 1.0) == 0.0
    with pytest.raises(ValueError, match="no time model"):
        collective_seconds("all_to_all", 1e9, 1, 8, LINK, 1.0)


def test_links_parse_from_what_a_user_types():
    assert network_link("400Gb").gbytes_per_s == 50.0 and network_link("50GB").gbytes_per_s == 50.0
    assert intra_link("nvlink4").gbytes_per_s == 450.0 and intra_link("300GB").gbytes_per_s == 300.0
    with pytest.raises(ValueError, match="400Gb"):
        network_link("fast")
    with pytest.raises(ValueError, match="nvlink4"):
        intra_link("carrier pigeon")


def test_a_collective_across_nodes_runs_at_the_slower_link_and_the_network_latency():
    from pipeline.tools.comm_plan import Transfer
    from pipeline.tools.step_time import Cluster

    cluster = Cluster(4, 8, "h100", intra_link("nvlink4"), network_link("400Gb"), efficiency=1.0)
    inside = Transfer("all_reduce", 8, "intra-node", "float32", 1, 1e9, "x")
    across = Transfer("all_reduce", 32, "inter-node", "float32", 1, 1e9, "x", every=10)
    assert transfer_seconds(inside, cluster) == pytest.approx(2 * 7 / 8 * 1e9 / 450e9 + 14 * 3e-6)
    assert transfer_seconds(across, cluster) == pytest.approx((2 * 31 / 32 * 1e9 / 50e9 + 62 * 10e-6) / 10)


def test_micro_batch_candidates_divide_the_per_gpu_batch():
    assert micro_batch_options(16) == [16, 8, 4] and micro_batch_options(6) == [6, 3, 2]
    assert micro_batch_options(1) == [1]


TINY = [f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16", "model.anchor_scale=4",
        "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32", "model.box_head_dim=32",
        "data.min_size=64", "data.max_size=96", "train.ds_config=ds_configs/zero0_bf16.json"]


def _table(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ZeRO"))
    return [line.split() for line in lines[start + 1:] if line[:4].strip().isdigit()]


def test_the_plan_prints_its_inputs_and_one_row_per_candidate(capsys):
    """2 nodes x 4 GPUs, batch 32 (4 per GPU): ZeRO 0-3 x micro-batch 4, 2, 1 x {cross-GPU BN per node,
    per-GPU BN}; compute = images x FLOPs / (peak x MFU) by hand; every row's collectives are counted ones
    (the tiny model fits ZeRO-3's live-parameter limit); the inputs are printed."""
    from pipeline.tools.planner import main

    args = ["--nodes", "2", "--gpus-per-node", "4", "--gpu", "a100", "--inter-node", "200Gb", "--intra-node",
            "nvlink3", "--batch", "32", "--mfu", "0.25", "--flops-per-image", "100", "--no-memory", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    for shown in ("not a measurement", "100.0 GFLOP per training image (given with --flops-per-image)",
                  "2 node(s) x 4 a100 = 8 GPUs", "312 TFLOP/s (bf16)", "MFU          25.0% (given with --mfu)",
                  "NVLink 3", "25 GB/s per GPU", "efficiency 0.8", "batch        32 = 8 GPUs x 4"):
        assert shown in out, shown
    rows = _table(out)
    assert len(rows) == 4 * 3 * 2
    assert {(r[0], r[1], r[3]) for r in rows} == {(str(z), str(m), str(4 // m)) for z in range(4) for m in (4, 2, 1)}
    compute_ms = 4 * 100e9 / (312e12 * 0.25) * 1e3  # every candidate computes 4 images per GPU per step
    assert all(float(r[6].rstrip("ms")) == pytest.approx(compute_ms, abs=0.5) for r in rows)
    assert not [r for r in rows if r[-1] == "*"]


def test_one_node_scales_at_one_hundred_percent_and_more_nodes_pay_for_the_network(capsys):
    from pipeline.tools.planner import main

    base = ["--gpus-per-node", "4", "--flops-per-image", "100", "--mfu", "0.2", "--no-memory", "--stages", "0",
            "--micro-batches", "4", "--inter-node", "25Gb", *TINY]
    effs, comm = [], []
    for nodes in (1, 4, 16):
        assert main(["--nodes", str(nodes), "--batch", str(16 * nodes), *base]) == 0
        row = _table(capsys.readouterr().out)[0]
        effs.append(float(row[12].rstrip("%")))
        comm.append(float(row[11].rstrip("%")))
    assert effs[0] == 100 and effs[0] > effs[1] >= effs[2] and comm[0] < comm[1] <= comm[2]


def test_the_plan_counts_flops_and_probes_memory_when_not_given(capsys):
    """Without --flops-per-image the FLOPs are counted on the real model (the same counter as the training
    log); without --no-memory the planner's probe gives GiB per GPU."""
    from pipeline.tools.planner import main

    assert main(["--nodes", "1", "--gpus-per-node", "2", "--stages", "0,3", "--micro-batches", "2", *TINY]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per training image (counted at " in out and "MFU          6.0% (torchvision Faster R-CNN" in out
    rows = _table(out)
    assert len(rows) == 2 * 2 and all(math.isfinite(float(r[5].rstrip("!"))) for r in rows)


def test_the_vit_anchor_uses_vit_g_forward_flops_counted_on_the_meta_device():
    """DEFAULT_MFU's ViT anchor: timm's ViT-g/14 at 1024x1024 (the ENVIRONMENT.md measurement), its forward
    counted here with torch's FlopCounterMode on the meta device; the convnet anchor is 47.4 x 1249 / 989.4."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.tools.step_time import DEFAULT_MFU, VIT_G_FORWARD_TFLOP_1024

    with torch.device("meta"):
        model = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, img_size=1024, num_classes=0)
        with FlopCounterMode(display=False) as counter:
            model.forward_features(torch.empty(1, 3, 1024, 1024))
    assert counter.get_total_flops() / 1e12 == pytest.approx(VIT_G_FORWARD_TFLOP_1024, abs=1e-3)
    assert DEFAULT_MFU["vit"][0] == pytest.approx(0.360, abs=5e-4)
    assert DEFAULT_MFU["convnet"][0] == pytest.approx(0.0598, abs=5e-4)


def test_zero3_above_its_live_parameter_limit_gathers_twice_per_micro_step_and_says_it_is_modelled():
    from pipeline.tools.comm_plan import _zero3_rows

    groups = [("backbone", [1000, 10]), ("neck", [500])]
    ds = {"zero_optimization": {"stage3_max_live_parameters": 100}}
    gathers = next(t for t in _zero3_rows(groups, 2, ds, 4, "inter-node", 3) if t.op == "all_gather_into_tensor")
    assert (gathers.calls, gathers.bytes, gathers.launches) == (6 * 3, 6 * 4 * (250 + 3 + 125), 6 * 2)
    assert not gathers.counted
    fits = next(t for t in _zero3_rows(groups, 2, {}, 4, "inter-node", 3) if t.op == "all_gather_into_tensor")
    assert (fits.calls, fits.counted) == (3, True)
