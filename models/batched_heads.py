"""Faster R-CNN's training step without the host syncs of torchvision's heads (``model.heads=batched``).

On a GPU every host sync idles the device until the host has queued new work. torchvision's
Faster R-CNN makes dozens per training iteration, most of them once per image:
boolean-mask writes and ``torch.where`` in the matcher (``_utils.Matcher``), ``nonzero`` and
``randperm`` in the fg/bg sampler, the small-box and score filters before the RPN's NMS, the
per-class loop of ``batched_nms``, the ``nonzero`` of the losses, and the degenerate-box check of
``GeneralizedRCNN.forward``. The classes below keep torchvision's modules, parameters, state dict
and inference path, and compute the training losses with fixed-shape, masked, batched code:

- matching: the ``Matcher``'s rules written with ``torch.where`` (``match_boxes``), exact;
- sampling: ``sample_balanced`` takes the same number of foreground and background candidates as
  ``BalancedPositiveNegativeSampler``, each a uniformly random subset (the top-k of random keys),
  as its ``randperm`` draws; the same distribution, not the same draw;
- proposals: boxes failing the small-box or score filter become zero-area boxes that sort last,
  so one NMS per image (levels kept apart by offsets) keeps exactly torchvision's proposals first,
  and every image gets ``post_nms_top_n`` slots, zero-area ones unused;
- losses: the RPN's and the box head's, as weighted sums over the sampled slots, divided by the
  sampled count as torchvision divides (exact up to summation order).

Left as torchvision's, named by ``pipeline.utils.host_syncs``: the NMS itself (one per image; its output
size is data-dependent and torchvision's CUDA kernel finishes it on the host) and
``MultiScaleRoIAlign``'s split of the RoIs by level (one per pyramid level, per iteration).
Mask R-CNN keeps torchvision's heads: its mask branch selects positives per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import encode_boxes
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import box_iou, clip_boxes_to_image, nms

BELOW_LOW, BETWEEN = -1, -2  # torchvision's Matcher codes


def match_boxes(quality: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """torchvision's ``Matcher`` on a [G, N] IoU matrix (G >= 1), with no sync: each of the N boxes
    gets the index of its best gt, ``BELOW_LOW`` under ``low``, ``BETWEEN`` from ``low`` to ``high``;
    with ``allow_low_quality`` every box that is some gt's best match keeps that match."""
    best, matches = quality.max(dim=0)
    coded = torch.where(best < low, BELOW_LOW, torch.where(best < high, BETWEEN, matches))
    if not allow_low_quality:
        return coded
    best_of_gt = quality.max(dim=1, keepdim=True).values
    return torch.where((quality == best_of_gt).any(dim=0), matches, coded)


def sample_balanced(labels: Tensor, per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` on [B, N] labels (>= 1 foreground, 0
    background, -1 ignored), with no sync.

    Returns [B, k] indices into N and a [B, k] mask of the slots used, k = min(per_image, N): the
    first min(#foreground, int(per_image * positive_fraction)) slots hold foreground, the next
    min(#background, per_image - that) background. Each kind is a uniformly random subset: the
    candidates with the largest uniform random keys."""
    b, n = labels.shape
    k, k_pos = min(per_image, n), min(int(per_image * positive_fraction), n)
    keys = torch.rand(labels.shape, device=labels.device)
    pos_keys, pos_idx = torch.where(labels >= 1, keys, -1.0).topk(k_pos, dim=1)
    neg_keys, neg_idx = torch.where(labels == 0, keys, -1.0).topk(k, dim=1)
    n_pos = (pos_keys >= 0).sum(1, keepdim=True)  # the chosen ones come first: keys sort descending
    n_neg = torch.minimum((neg_keys >= 0).sum(1, keepdim=True), per_image - n_pos)
    slot = torch.arange(k, device=labels.device).expand(b, k)
    from_neg = neg_idx.gather(1, (slot - n_pos).clamp(min=0))
    idx = torch.where(slot < n_pos, F.pad(pos_idx, (0, k - k_pos)), from_neg)
    return idx, slot < n_pos + n_neg


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, j]]`` for [B, N, D] ``x`` and [B, k] ``idx``."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def nms_by_level(boxes: Tensor, scores: Tensor, levels: Tensor, iou_threshold: float) -> Tensor:
    """One NMS over all levels, kept apart by offsetting each level's boxes beyond the others (the
    result of an NMS per level, merged in score order; one kernel and one sync instead of
    ``batched_nms``'s loop over levels)."""
    boxes = boxes.float()  # bf16 proposals (autocast) would lose whole pixels to the offsets
    offsets = levels.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores.float(), iou_threshold)


def _has_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


class BatchedRPN(RegionProposalNetwork):
    """torchvision's RPN; in training, proposals and losses without host syncs but the NMS."""

    def forward(self, images, features, targets=None):
        if not self.training:
            return super().forward(images, features, targets)
        if targets is None:
            raise ValueError("targets should not be None")
        features = list(features.values())
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        num_images = len(anchors)
        # Faster R-CNN does not backprop through the proposals
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
        boxes = self.training_proposals(proposals, objectness.detach().view(num_images, -1), images.image_sizes,
                                        per_level)
        loss_objectness, loss_box = self.batched_loss(objectness.view(num_images, -1), deltas.view(num_images, -1, 4),
                                                      torch.stack(anchors), targets)
        return list(boxes), {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    def training_proposals(self, proposals: Tensor, objectness: Tensor, image_sizes: list[tuple[int, int]],
                           per_level: list[int]) -> Tensor:
        """[B, post_nms_top_n, 4]: torchvision's ``filter_proposals`` result for each image first, in the
        same order, then zero-area boxes (unused)."""
        num_images, device = proposals.shape[0], proposals.device
        top = self._get_top_n_idx(objectness, per_level)
        taken = [min(self.pre_nms_top_n(), n) for n in per_level]
        levels = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(taken)])
        rows = torch.arange(num_images, device=device)[:, None]
        scores, boxes = objectness[rows, top].sigmoid(), proposals[rows, top]
        post = self.post_nms_top_n()
        out = boxes.new_zeros(num_images, post, 4)
        for i, (h, w) in enumerate(image_sizes):
            clipped = clip_boxes_to_image(boxes[i], (h, w))
            wh = clipped[:, 2:] - clipped[:, :2]
            ok = (wh >= self.min_size).all(dim=1) & (scores[i] >= self.score_thresh)
            # a zero-area box overlaps nothing, so it suppresses nothing, and it sorts after every kept one
            clipped = torch.where(ok[:, None], clipped, 0.0)
            keep = nms_by_level(clipped, torch.where(ok, scores[i], -1.0), levels, self.nms_thresh)[:post]
            out[i, :keep.numel()] = clipped[keep]
        return out

    def batched_loss(self, objectness: Tensor, deltas: Tensor, anchors: Tensor,
                     targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """torchvision's ``assign_targets_to_anchors`` + ``compute_loss`` over [B, A] anchors."""
        matcher, labels, matched = self.proposal_matcher, [], []
        for anchors_i, target in zip(anchors, targets):
            gt = target["boxes"]
            if gt.numel() == 0:  # a background image: every anchor is a negative
                labels.append(anchors_i.new_zeros(anchors_i.shape[0]))
                matched.append(torch.zeros_like(anchors_i))
                continue
            m = match_boxes(self.box_similarity(gt, anchors_i), matcher.high_threshold, matcher.low_threshold,
                            matcher.allow_low_quality_matches)
            labels.append(torch.where(m >= 0, 1.0, torch.where(m == BELOW_LOW, 0.0, -1.0)))
            matched.append(gt[m.clamp(min=0)])
        labels = torch.stack(labels)
        idx, used = sample_balanced(labels, self.fg_bg_sampler.batch_size_per_image,
                                    self.fg_bg_sampler.positive_fraction)
        taken = labels.gather(1, idx)
        count = used.sum()
        bce = F.binary_cross_entropy_with_logits(objectness.gather(1, idx), taken.clamp(min=0), reduction="none")
        loss_objectness = torch.where(used, bce, 0.0).sum() / count
        anchors_taken = _gather_rows(anchors, idx).flatten(0, 1)
        targets_taken = encode_boxes(_gather_rows(torch.stack(matched), idx).flatten(0, 1), anchors_taken,
                                     self.box_coder.weights)
        positive = (used & (taken > 0)).flatten()
        targets_taken = torch.where(positive[:, None], targets_taken, 0.0)  # others may be inf/NaN: unused
        l1 = F.smooth_l1_loss(_gather_rows(deltas, idx).flatten(0, 1), targets_taken, beta=1 / 9, reduction="none")
        return loss_objectness, torch.where(positive[:, None], l1, 0.0).sum() / count


class BatchedRoIHeads(RoIHeads):
    """torchvision's box RoI heads; in training, sampling and losses without host syncs. Takes the
    RPN's fixed [post_nms_top_n] proposals per image, zero-area ones unused."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if self.has_mask() or self.has_keypoint():
            raise NotImplementedError("batched heads are built for Faster R-CNN's box head only")
        self.check_targets(targets)
        boxes, labels, regression_targets, used = self.sample_training_rois(torch.stack(proposals), targets)
        box_features = self.box_roi_pool(features, list(boxes), image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(box_features))
        loss_classifier, loss_box_reg = self.batched_loss(class_logits, box_regression, labels.flatten(),
                                                          regression_targets.flatten(0, 1), used.flatten())
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def sample_training_rois(self, proposals: Tensor, targets: list[dict[str, Tensor]]):
        """torchvision's ``select_training_samples`` for [B, P, 4] proposals: the gt boxes join the
        candidates, which are matched and sampled; returns [B, k] boxes, labels, regression targets
        and the mask of the slots used."""
        dtype = proposals.dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        most = max(1, max(len(g) for g in gt_boxes))  # every image's gts padded to the most (zero-area)
        gt_padded = torch.stack([F.pad(g, (0, 0, 0, most - len(g))) for g in gt_boxes])
        candidates = torch.cat([proposals, gt_padded], dim=1)
        matcher, labels, matched = self.proposal_matcher, [], []
        for candidates_i, gt, target in zip(candidates, gt_boxes, targets):
            if gt.numel() == 0:  # a background image
                labels.append(torch.zeros(candidates_i.shape[0], dtype=torch.int64, device=gt.device))
                matched.append(torch.zeros_like(labels[-1]))
                continue
            m = match_boxes(box_iou(gt, candidates_i), matcher.high_threshold, matcher.low_threshold,
                            matcher.allow_low_quality_matches)
            label = target["labels"].to(torch.int64)[m.clamp(min=0)]
            labels.append(torch.where(m == BELOW_LOW, 0, torch.where(m == BETWEEN, -1, label)))
            matched.append(m.clamp(min=0))
        labels = torch.where(_has_area(candidates), torch.stack(labels), -1)  # unused slots are never sampled
        idx, used = sample_balanced(labels, self.fg_bg_sampler.batch_size_per_image,
                                    self.fg_bg_sampler.positive_fraction)
        boxes = _gather_rows(candidates, idx)
        gt_of_box = _gather_rows(gt_padded, torch.stack(matched).gather(1, idx))
        regression_targets = encode_boxes(gt_of_box.flatten(0, 1), boxes.flatten(0, 1), self.box_coder.weights)
        return boxes, labels.gather(1, idx), regression_targets.view_as(boxes), used

    @staticmethod
    def batched_loss(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
                     used: Tensor) -> tuple[Tensor, Tensor]:
        """torchvision's ``fastrcnn_loss`` over the used slots of fixed-size samples."""
        labels = labels.clamp(min=0)
        count = used.sum()
        ce = F.cross_entropy(class_logits, labels, reduction="none")
        positive = used & (labels > 0)
        per_class = box_regression.view(labels.shape[0], -1, 4)
        predicted = per_class.gather(1, labels[:, None, None].expand(-1, 1, 4)).squeeze(1)
        targets = torch.where(positive[:, None], regression_targets, 0.0)  # others may be inf/NaN: unused
        l1 = F.smooth_l1_loss(predicted, targets, beta=1 / 9, reduction="none")
        return torch.where(used, ce, 0.0).sum() / count, torch.where(positive[:, None], l1, 0.0).sum() / count


class BatchedFasterRCNN(FasterRCNN):
    """torchvision's ``FasterRCNN`` (same constructor, modules and state dict) whose training
    iteration waits on the GPU only for the RPN's NMS and the RoI pooler's level split."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # FasterRCNN builds its heads from its keyword arguments; ours add methods, no state
        self.rpn.__class__ = BatchedRPN
        self.roi_heads.__class__ = BatchedRoIHeads

    def forward(self, images, targets=None):
        if not self.training:
            return super().forward(images, targets)
        # torchvision checks every target for degenerate boxes with a sync per image; the loader
        # (pipeline.data.dataset) has dropped them already, and the synthetic batches have none
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        proposals, rpn_losses = self.rpn(images, features, targets)
        _, head_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        return {**head_losses, **rpn_losses}
