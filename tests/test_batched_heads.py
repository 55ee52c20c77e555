"""The sync-free Faster R-CNN heads (``model.heads=batched``) against torchvision's own heads.

- matching: ``match_boxes`` gives torchvision's ``Matcher`` result exactly, ties and low-quality
  matches included;
- sampling: ``sample_balanced`` takes as many foreground and background candidates as
  torchvision's sampler, only of their kind, each candidate as often as a uniform draw would
  (a frequency check over many draws: a biased choice, e.g. the first candidates, fails it);
- proposals: the RPN's proposals equal torchvision's ``filter_proposals`` (same boxes, same order),
  with the small-box and score filters in play;
- whole runs: with sample sizes that take every candidate (so that no random draw is involved),
  three training steps give torchvision's losses and weights (a CNN at ZeRO 0 with SGD, a ViT at
  ZeRO 3 with AGVM-SGD; same tolerances as the other levers: losses 1e-4 relative, weights 1e-5);
- the hot path's host syncs: only the NMS (one per image) and the RoI pooler's level split remain.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from conftest import REPO, run_distributed
from models.batched_heads import match_boxes, sample_balanced
from test_levers import CNN, VIT, _assert_same_training, _plain_and_lever


@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_matching_is_torchvisions_matcher(allow_low_quality):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        quality = torch.rand(5, 300, generator=g)
        quality[:, :40] = (quality[:, :40] * 4).round() / 4  # ties, at the thresholds too
        quality[2, 7] = quality[2, 9] = quality[2].max()  # one gt with two best boxes
        expected = Matcher(0.7, 0.3, allow_low_quality_matches=allow_low_quality)(quality)
        assert torch.equal(match_boxes(quality, 0.7, 0.3, allow_low_quality), expected)


def _labels(g: torch.Generator, images: int, n: int) -> torch.Tensor:
    labels = torch.randint(-1, 2, (images, n), generator=g)
    labels[0, :] = 0  # an image without foreground
    labels[1, : n // 2] = -1
    labels[1, n // 2:] = 1  # one with few background candidates
    return labels


def test_sampling_takes_torchvisions_counts_of_each_kind():
    g = torch.Generator().manual_seed(1)
    labels = _labels(g, 6, 200)
    for per_image, fraction in ((64, 0.25), (256, 0.5), (500, 0.25)):
        torch.manual_seed(per_image)
        pos, neg = BalancedPositiveNegativeSampler(per_image, fraction)(list(labels))
        idx, used = sample_balanced(labels, per_image, fraction)
        for i in range(len(labels)):
            taken = idx[i][used[i]]
            assert taken.unique().numel() == taken.numel()  # no candidate twice
            kinds = labels[i][taken]
            assert int((kinds == 1).sum()) == int(pos[i].sum())
            assert int((kinds == 0).sum()) == int(neg[i].sum())
            assert int((kinds == -1).sum()) == 0


def test_sampling_draws_each_candidate_uniformly():
    labels = torch.tensor([[1] * 8 + [0] * 30 + [-1] * 10])
    hits = torch.zeros(labels.shape[1])
    draws = 3000
    torch.manual_seed(0)
    for _ in range(draws):
        idx, used = sample_balanced(labels, 16, 0.25)  # 4 of the 8 positives, 12 of the 30 negatives
        hits[idx[0][used[0]]] += 1
    freq = hits / draws
    assert freq[:8].sub(4 / 8).abs().max() < 0.05, freq[:8]
    assert freq[8:38].sub(12 / 30).abs().max() < 0.05, freq[8:38]
    assert freq[38:].sum() == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rpn_proposals_are_torchvisions(device):
    from models.detector import build_detector
    from pipeline.config import ModelConfig

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = ModelConfig(detector="faster_rcnn", backbone="test_byobnet", fpn_channels=16, anchor_scale=4,
                      rpn_pre_nms_train=60, rpn_post_nms_train=50, pretrained=None)
    rpn = build_detector(cfg, 3, 64, 64, batched_heads=True).rpn.train()
    g = torch.Generator().manual_seed(0)
    per_level, images = [192, 48, 12, 3], 3
    xy = torch.rand(images, sum(per_level), 2, generator=g) * 70 - 5
    wh = torch.rand(images, sum(per_level), 2, generator=g) * 30
    wh[:, ::7] = 0  # boxes the small-box filter drops
    proposals = torch.cat([xy, xy + wh], dim=2).to(device)
    objectness = torch.randn(images, sum(per_level), generator=g).to(device)
    sizes = [(64, 64), (48, 64), (64, 40)]
    kept = set()
    for thresh in (0.0, 0.6):
        rpn.score_thresh = thresh
        ours = rpn.training_proposals(proposals, objectness, sizes, per_level)
        theirs, _ = rpn.filter_proposals(proposals, objectness, sizes, per_level)
        for got, expected in zip(ours, theirs):
            torch.testing.assert_close(got[:len(expected)], expected, rtol=0, atol=0)
            assert got[len(expected):].abs().sum() == 0
            kept.add(len(expected))
    assert 50 in kept and min(kept) < 50, kept  # full images, and images with unused slots


# Sample sizes that take every candidate: no random draw, so torchvision's losses are ours
EVERY_CANDIDATE = ["model.rpn_batch_per_image=8192", "model.roi_batch_per_image=1024"]


@pytest.mark.parametrize("backbone,stage,optimizer", [(CNN, 0, "sgd"), (VIT, 3, "agvm_sgd")])  # each level once
def test_batched_heads_train_like_torchvisions(tmp_path, backbone, stage, optimizer):
    plain, lever = _plain_and_lever(tmp_path, (backbone, stage, optimizer),
                                    ["model.heads=torchvision", *EVERY_CANDIDATE],
                                    ["model.heads=batched", *EVERY_CANDIDATE])
    _assert_same_training(plain, lever)


def test_batched_heads_are_refused_where_they_do_not_apply():
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="model.heads=batched is built for faster_rcnn"):
        load_config(None, ["model.detector=mask_rcnn", "model.heads=batched"])


def _sync_worker(rank: int, world: int, out: str) -> None:
    from pipeline.config import load_config
    from pipeline.data.synthetic import synthetic_batch
    from pipeline.distributed.job import init_distributed
    from pipeline.train.build import build_training
    from pipeline.utils.host_syncs import HostSyncCounter

    info = init_distributed()
    cfg = load_config(None, [
        "model.detector=faster_rcnn", "model.backbone=test_byobnet", "model.fpn_channels=16", "model.anchor_scale=4",
        "model.rpn_post_nms_train=100", "model.roi_batch_per_image=32", "model.box_head_dim=32", "model.heads=batched",
        "data.min_size=64", "data.max_size=64", "train.micro_batch=3", "schedule.max_iters=10"])
    training = build_training(cfg, info, data=False, num_classes=3)
    batches = itertools.cycle([synthetic_batch(3, 64, 64, info.device, seed=s, num_classes=3) for s in (1, 2)])
    training.step(batches)
    with HostSyncCounter() as syncs:
        training.step(batches)
    torch.save({"sites": dict(syncs.sites), "ops": dict(syncs.site_ops)}, out)


def test_batched_heads_leave_only_the_nms_and_the_pooler_syncing(tmp_path):
    out = tmp_path / "syncs.pt"
    run_distributed(_sync_worker, 1, str(out))
    got = torch.load(out)
    ours = {s: n for s, n in got["sites"].items() if s.startswith((str(REPO / "models"), str(REPO / "pipeline")))}
    theirs = {s: n for s, n in got["sites"].items() if "torchvision" in Path(s).parts}
    assert ours == {}, ours
    by_call = {}
    for site, n in theirs.items():
        by_call[(Path(site.rsplit(":", 1)[0]).name, got["ops"][site])] = n
    # 3 images: one NMS each; 4 pooled levels: one split each
    assert by_call == {("boxes.py", "nms"): 3, ("poolers.py", "where"): 4}, theirs
