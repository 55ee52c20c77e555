"""Run an exported detector on images: one COCO-format results file and one PNG per image with the
detections drawn (boxes, class names, scores; Mask R-CNN masks as translucent overlays).

    python launch/export.py runs/NAME
    python launch/predict.py runs/NAME/model_fp32.safetensors photos/ more.jpg --out predictions/
    python launch/predict.py runs/NAME/model_fp32.safetensors photos/ --score-thresh 0.3 --max-dets 50 --device cuda

Folders are read for their images (jpg, jpeg, png, gif, webp; not recursively). ``predictions.json``
holds one entry per detection: ``image_id`` (the input's position), ``file_name``,
``category_id`` (the training set's id), ``bbox`` (x, y, w, h in the image's pixels) and
``score``; masks as RLE. An input that is missing or not an image is named on stderr and
skipped, the others are still processed (exit status 2 when any was skipped, else 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from pipeline.evaluation.coco import foreground

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
EXIT_SKIPPED = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="an fp32 export (python launch/export.py RUN_DIR)")
    p.add_argument("inputs", type=Path, nargs="+", help="image files and folders of images")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions/)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="detections below this score are dropped")
    p.add_argument("--max-dets", type=int, default=100, help="at most this many detections per image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def image_files(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """The files to run on, in order (folders: their images, sorted), and what cannot be read."""
    files, problems = [], []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            if not found:
                problems.append(f"{path}: a folder without images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def load_detector(path: Path):
    """The export's model (eval mode) and its categories; ValueError (DataError) naming the file when
    it is not an export, or not one of the detector its config describes."""
    from pipeline.tools.export import model_from_export, read_export

    blob = read_export(path)
    try:
        model = model_from_export(blob)
    except RuntimeError as err:  # load_state_dict(strict=True): weights of another detector
        raise ValueError(f"{path}: its weights do not fit the detector its config describes (an export of "
                         f"another detector?): {str(err).splitlines()[0][:300]}") from None
    categories = blob.get("categories") or [{"id": i, "name": f"class {i}"} for i in range(1, blob["num_classes"] + 1)]
    return model, categories


def _unique_png(out: Path, stem: str, used: set) -> Path:
    name, k = stem, 1
    while name in used:
        name, k = f"{stem}_{k}", k + 1
    used.add(name)
    return out / f"{name}.png"


def _results(image_id: int, file_name: str, det: dict, categories: list[dict]) -> list[dict]:
    from pycocotools import mask as mask_util

    out = []
    for k, (box, score, label) in enumerate(zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())):
        x1, y1, x2, y2 = box
        entry = {"image_id": image_id, "file_name": file_name, "category_id": categories[label - 1]["id"],
                 "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)], "score": round(score, 4)}
        if "masks" in det:
            rle = mask_util.encode(det["masks"][k, 0].numpy().astype("uint8", order="F"))
            entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        out.append(entry)
    return out


def draw(image: torch.Tensor, det: dict, categories: list[dict]) -> torch.Tensor:
    """The uint8 image with masks overlaid and boxes, class names and scores drawn."""
    if "masks" in det and len(det["masks"]):
        image = draw_segmentation_masks(image, det["masks"][:, 0].bool(), alpha=0.45)
    if not len(det["boxes"]):
        return image
    labels = [f"{categories[int(label) - 1]['name']} {score:.2f}"
              for label, score in zip(det["labels"], det["scores"].tolist())]
    return draw_bounding_boxes(image, det["boxes"], labels=labels, width=2)


def predict(model, files: list[Path], categories: list[dict], out: Path, device: torch.device, score_thresh: float,
            max_dets: int) -> tuple[list[dict], list[str]]:
    """Detections of every readable file (COCO results) and PNGs in ``out``; the problems met."""
    results, problems, used = [], [], set()
    model.to(device).eval()
    for image_id, path in enumerate(files):
        try:
            image = decode_image(str(path), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as err:
            problems.append(f"{path}: not an image torchvision can decode ({str(err).splitlines()[0][:150]})")
            continue
        with torch.no_grad():
            raw = model([image.to(device).float()])[0]  # the model normalises 0-255 images itself
        raw = foreground(raw)
        keep = (raw["scores"] >= score_thresh).nonzero().flatten()[:max_dets]
        det = {k: v[keep].cpu() for k, v in raw.items()}
        if "masks" in det:
            det["masks"] = det["masks"] > 0.5
        results += _results(image_id, str(path), det, categories)
        write_png(draw(image, det, categories), str(_unique_png(out, path.stem, used)))
    return results, problems


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, categories = load_detector(args.export)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SKIPPED
    files, problems = image_files(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    results, failed = predict(model, files, categories, args.out, torch.device(args.device), args.score_thresh,
                              args.max_dets)
    problems += failed
    (args.out / "predictions.json").write_text(json.dumps(results))
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    print(f"{len(files) - len(failed)} image(s), {len(results)} detection(s) at score >= {args.score_thresh}: "
          f"{args.out / 'predictions.json'} and one PNG per image in {args.out}")
    return EXIT_SKIPPED if problems else 0


def cli() -> None:
    """The command (``launch/predict.py``): ``main`` with its exit status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
