"""Evaluation: inference over a rank's share, COCOeval on rank 0 (``coco``), drawn previews."""
