"""Host syncs: the counter against code whose syncs are known, then the training hot path.

The hot path (the train step, the loss window, the lr schedule, AGVM between estimates) must
not make the host wait for the device: on a GPU every such wait idles it. The counter names the
source line of each sync, so the test can tell ours from torchvision's and DeepSpeed's.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import torch
import torchvision

from conftest import REPO, TINY_BACKBONE, run_distributed
from pipeline.utils.host_syncs import HostSyncCounter


def test_the_counter_counts_exactly_the_syncing_calls():
    boxes = torch.rand(20, 4)
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(20)
    with HostSyncCounter() as syncs:
        # none of these waits for the device
        top = scores.topk(5).indices
        picked = scores[top] + boxes[top, 0]
        masked = torch.where(scores > 0.5, scores, torch.zeros_like(scores))
        clamped = boxes.clamp(min=0).sum(0)
        # each of these does: 6 syncs
        scores.sum().item()
        bool((scores > 2).any())
        scores[scores > 0.5]
        torch.nonzero(scores > 0.5)
        torchvision.ops.nms(boxes, scores, 0.5)
        masked.cpu()
    assert syncs.total == 6, syncs.sites
    assert set(syncs.ops) == {"item", "__bool__", "__getitem__", "nonzero", "nms", "cpu"}
    # each named by its line: ours here, nms by torchvision's wrapper that calls the kernel
    assert sum(n for site, n in syncs.sites.items() if site.startswith(__file__)) == 5, syncs.sites
    assert any("/torchvision/ops/boxes.py:" in site for site in syncs.sites), syncs.sites
    del picked, clamped


def test_compiled_code_is_counted_eagerly_not_compiled_again():
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    @torch.compile(backend=backend)
    def positives_doubled(x):
        return (x * 2)[x > 0]  # a boolean mask: a sync, which the compiler makes a graph break

    x = torch.tensor([1.0, -1.0, 2.0])
    positives_doubled(x)
    compiled = len(compiles)
    with HostSyncCounter() as syncs:
        out = positives_doubled(x)
    assert torch.equal(out, torch.tensor([2.0, 4.0]))
    assert len(compiles) == compiled, "the counter's mode made the compiler run again"
    assert syncs.total == 1 and set(syncs.ops) == {"__getitem__"}, syncs.sites
    positives_doubled(x)  # after the counter: the compiled code again, not recompiled
    assert len(compiles) == compiled


def _hot_path_worker(rank: int, world: int, optimizer: str, out: str) -> None:
    from pipeline.config import load_config
    from pipeline.data.synthetic import synthetic_batch
    from pipeline.distributed.job import init_distributed
    from pipeline.train.build import build_training

    info = init_distributed()
    cfg = load_config(None, [
        "model.detector=faster_rcnn", f"model.backbone={TINY_BACKBONE}", "model.fpn_channels=16",
        "model.anchor_scale=4", "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32",
        "model.box_head_dim=32", "data.min_size=64", "data.max_size=64", "train.micro_batch=2",
        "train.grad_accum=2", f"optim.name={optimizer}", "agvm.tau=3", "agvm.start_iter=0", "agvm.clip_norm=0",
        "optim.clip_grad_norm=0", "schedule.max_iters=20", "schedule.warmup_iters=4"])
    training = build_training(cfg, info, data=False, num_classes=3)
    batches = itertools.cycle([synthetic_batch(2, 64, 64, info.device, seed=s, num_classes=3) for s in (1, 2)])
    ours, theirs, window, checked = Counter(), Counter(), {}, 0
    for _ in range(6):
        agvm = training.agvm
        if agvm is not None and agvm.estimating(training.step.iteration):
            training.step(batches)  # the estimate iteration may read its scalars (every tau iterations)
            continue
        with HostSyncCounter() as syncs:
            for k, v in training.step(batches).items():  # the trainer's loss window, as train_loop keeps it
                window[k] = window.get(k, 0) + v
            training.schedule.lr(training.step.iteration)
        ours.update(syncs.in_files_under(REPO / "pipeline", REPO / "models"))
        theirs.update(syncs.sites)
        checked += 1
    torch.save({"ours": dict(ours), "all": dict(theirs), "checked": checked}, out)


def test_the_hot_path_has_no_host_sync_of_ours(tmp_path):
    for optimizer in ("sgd", "agvm_sgd"):
        out = tmp_path / f"{optimizer}.pt"
        run_distributed(_hot_path_worker, 1, optimizer, str(out))
        got = torch.load(out)
        assert got["checked"] >= 4
        assert got["ours"] == {}, f"{optimizer}: host syncs in our code on the hot path: {got['ours']}"
        # torchvision's heads do sync (proposal filtering, NMS, sampling): the counter sees through to them
        assert any("torchvision" in Path(site).parts for site in got["all"]), got["all"]
