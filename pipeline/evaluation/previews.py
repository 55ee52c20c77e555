"""What the detector predicts, drawn: a grid of a few fixed validation images after each evaluation.

Drawn on rank 0 from the evaluation's own detections (COCO results, in each image's pixels), so
it costs no forward pass; saved as ``<run>/previews/iter_XXXXXXXX.png`` and logged to W&B as an
image, so a run shows its detector improving, not only its AP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torchvision.io import ImageReadMode, decode_image, write_png
from torchvision.utils import draw_bounding_boxes, make_grid


def draw_previews(results: list[dict], dataset, count: int, score_thresh: float = 0.3,
                  max_dets: int = 20) -> Optional[torch.Tensor]:
    """A uint8 [3, H, W] grid of the dataset's first ``count`` images with their detections above
    ``score_thresh`` (at most ``max_dets`` each, best first) drawn; None when ``count`` is 0."""
    if count <= 0 or len(dataset) == 0:
        return None
    names = dict(zip(dataset.cat_ids, dataset.cat_names))
    chosen = {image_id: [] for image_id in list(dataset.ids)[:count]}
    for r in results:
        if r["image_id"] in chosen and r["score"] >= score_thresh:
            chosen[r["image_id"]].append(r)
    tiles = []
    for index, (image_id, dets) in enumerate(chosen.items()):
        image = decode_image(str(dataset.image_path(index)), mode=ImageReadMode.RGB)
        dets = sorted(dets, key=lambda r: -r["score"])[:max_dets]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in dets)]).reshape(-1, 4)
        labels = [f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}" for r in dets]
        tiles.append(draw_bounding_boxes(image, boxes, labels=labels, width=2) if dets else image)
    h, w = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    padded = [torch.nn.functional.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])) for t in tiles]
    return make_grid(padded, nrow=min(4, len(padded)), padding=4)


def save_previews(grid: torch.Tensor, run_dir: Path, iteration: int) -> Path:
    out = run_dir / "previews" / f"iter_{iteration:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(out))
    return out
