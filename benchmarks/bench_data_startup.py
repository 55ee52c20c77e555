"""Dataset start-up at COCO scale: construction time, image-file check, per-rank memory and
what a forked DataLoader worker that reads every record costs, reference code against this tree.

    python benchmarks/bench_data_startup.py [--ref ab590b0] [--rounds 2] [--workdir DIR] [--masks]

Writes (once, kept in ``--workdir``) a synthetic annotation file of COCO train2017's size:
118,287 images (COCO's typical sizes, sparse ids, 1% without objects), 860,001 annotations
(1% crowd) over COCO's 80 category ids, each with a ``--poly-points``-point polygon, and one
*empty* file per image (the file check then measures listing/``stat`` on this machine's local
disk, not a shared filesystem's latency). File names carry the image size
(``000000391895_640x480.jpg``) so the worker can fake the image read.

Each variant runs in a fresh process, alternating (ref, new, ref, new, ...): ``pipeline/data/dataset.py``
at ``--ref`` (from ``git show``) and the working tree's. Per process it measures:

- construct_s: the dataset's constructor (file check switched off) plus ``aspect_ratios()``,
  i.e. what every rank does before the loaders exist;
- check_s: the image-file check alone (ref: every rank does it; new: rank 0 only);
- rss / growth / peak: resident set after construction (``gc.collect()`` first), its growth over
  the process after imports, and the peak during construction (``VmHWM``), in MiB;
- a forked child (what a DataLoader worker is) that calls ``dataset[i]`` for every item with
  the JPEG decode and the resize faked (an image of the file's size, no pixels) and flip off:
  its USS growth (``Private_*`` of ``/proc/self/smaps_rollup``, after - before: pages it
  copied from the parent), its PSS at the end, items/s, and a hash of all targets (boxes,
  labels, image ids, scales: equal hashes mean identical targets).

Prints a table and appends one row per process to benchmarks/results.jsonl. ``--masks`` builds
the datasets with masks (mask_rcnn) and skips the worker (mask decoding would dominate it).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks/results.jsonl"
COCO_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_SIZES = [(640, 480), (640, 427), (480, 640), (640, 426), (427, 640), (640, 424), (500, 375),
              (640, 512), (612, 612), (640, 640), (375, 500), (640, 360)]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


# ----------------------------------------------------------------------------- synthetic data

def write_annotations(path: Path, images: int, anns: int, poly_points: int, seed: int = 0) -> None:
    """A COCO-shaped annotation file of the given size; written in chunks (bounded memory)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(1, 600_000), images, replace=False)  # sparse and unordered, like COCO's
    sizes = np.array(COCO_SIZES)[rng.integers(len(COCO_SIZES), size=images)]
    image_list = [{"license": 1, "file_name": f"{i:012d}_{w}x{h}.jpg", "coco_url": "", "height": int(h),
                   "width": int(w), "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": int(i)}
                  for i, (w, h) in zip(ids.tolist(), sizes.tolist())]
    with_objects = rng.permutation(images)[: images - images // 100]  # 1% of images without objects
    owner = with_objects[np.concatenate([np.arange(len(with_objects)),
                                         rng.integers(len(with_objects), size=anns - len(with_objects))])]
    owner = owner[rng.permutation(anns)]  # annotations not grouped by image
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write('{"info": {"description": "synthetic COCO-scale file (bench_data_startup)"}, "licenses": [], ')
        f.write('"categories": ' + json.dumps([{"supercategory": "thing", "id": c, "name": f"class{c}"}
                                               for c in COCO_CAT_IDS]))
        f.write(', "images": ' + json.dumps(image_list) + ', "annotations": [')
        angles = np.linspace(0, 2 * np.pi, poly_points, endpoint=False)
        for start in range(0, anns, 50_000):
            k = owner[start:start + 50_000]
            n = len(k)
            W, H = sizes[k, 0].astype(float), sizes[k, 1].astype(float)
            bw = np.minimum(np.exp(rng.normal(4.0, 1.0, n)), W - 1)
            bh = np.minimum(np.exp(rng.normal(4.0, 1.0, n)), H - 1)
            x, y = rng.uniform(0, W - bw), rng.uniform(0, H - bh)
            px = (x + bw / 2)[:, None] + (bw / 2)[:, None] * np.cos(angles)
            py = (y + bh / 2)[:, None] + (bh / 2)[:, None] * np.sin(angles)
            poly = np.round(np.stack([px, py], 2).reshape(n, -1), 2).tolist()
            boxes = np.round(np.stack([x, y, bw, bh], 1), 2).tolist()
            cats = rng.choice(COCO_CAT_IDS, n).tolist()
            crowd = (rng.random(n) < 0.01).astype(int).tolist()
            chunk = [{"segmentation": [p], "area": round(b[2] * b[3] * 0.785, 2), "iscrowd": c,
                      "image_id": int(ids[i]), "bbox": b, "category_id": cat, "id": start + j + 1}
                     for j, (i, p, b, cat, c) in enumerate(zip(k.tolist(), poly, boxes, cats, crowd))]
            f.write(("," if start else "") + json.dumps(chunk)[1:-1])
        f.write("]}")
    os.replace(tmp, path)


def prepare(workdir: Path, images: int, anns: int, poly_points: int) -> tuple[Path, Path]:
    """The annotation file and a folder of empty image files (both reused when present)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ann = workdir / f"instances_{images}img_{anns}ann_{poly_points}pt.json"
    if not ann.is_file():
        print(f"writing {ann} ...", flush=True)
        write_annotations(ann, images, anns, poly_points)
    image_dir = workdir / f"images_{images}img_{anns}ann_{poly_points}pt"
    done = image_dir / ".complete"
    if not done.is_file():
        print(f"creating {images} empty image files in {image_dir} ...", flush=True)
        image_dir.mkdir(exist_ok=True)
        for im in json.loads(ann.read_text())["images"]:
            (image_dir / im["file_name"]).touch()
        done.touch()
    return ann, image_dir


# ----------------------------------------------------------------------------- one measured process

def _status_mib(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) / 1024


def _rollup_mib() -> dict:
    text = Path("/proc/self/smaps_rollup").read_text()
    kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}
    return {"uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024, "pss": kb["Pss"] / 1024}


def _fake_io(module, cls) -> None:
    """Image read -> a pixel-less tensor of the file's size (from its name); resize -> likewise."""
    import torch

    pixel = torch.zeros(1, 1, 1, dtype=torch.uint8)

    def read(self, path):
        w, h = map(int, re.search(r"_(\d+)x(\d+)\.jpg$", str(path)).groups())
        return pixel.expand(3, h, w)

    cls._read_image = read
    real = module.TF
    module.TF = types.SimpleNamespace(resize=lambda img, size, **kw: pixel.expand(3, *size),
                                      InterpolationMode=real.InterpolationMode)


def _worker(ds) -> dict:
    """In a forked child: every item once, with the memory it copied from the parent."""
    before = _rollup_mib()
    digest = hashlib.sha256()
    tic = time.perf_counter()
    for i in range(len(ds)):
        _, t = ds[i]
        digest.update(t["boxes"].numpy().tobytes())
        digest.update(t["labels"].numpy().tobytes())
        digest.update(f"{t['image_id']},{t['scale']!r};".encode())
    seconds = time.perf_counter() - tic
    after = _rollup_mib()
    return {"worker_uss_growth_mib": round(after["uss"] - before["uss"], 1), "worker_pss_mib": round(after["pss"], 1),
            "worker_items_per_s": round(len(ds) / seconds, 1), "targets_sha": digest.hexdigest()[:16]}


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    if args.child == "ref":
        spec = importlib.util.spec_from_file_location("data_ref", args.ref_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from pipeline.data import dataset as module  # the installed package (pip install -e .)
    cls = module.CocoDetection
    gc.collect()
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    kwargs = dict(flip_prob=0.5, with_masks=args.masks, keep_empty=False)  # training's defaults
    tic = time.perf_counter()
    if args.child == "ref":
        check = cls._check_files
        cls._check_files = lambda self: None
        ds = cls(args.images_dir, args.ann, 800, 1333, **kwargs)
        cls._check_files = check
    else:
        ds = cls(args.images_dir, args.ann, 800, 1333, check_files=False, **kwargs)
    ds.aspect_ratios()
    construct = time.perf_counter() - tic
    peak = _status_mib("VmHWM")
    gc.collect()
    rss = _status_mib("VmRSS")
    tic = time.perf_counter()
    if args.child == "ref":
        ds._check_files()
    else:
        assert ds.missing_files_error() is None
    check = time.perf_counter() - tic
    out = {"items": len(ds), "construct_s": round(construct, 2), "check_s": round(check, 2),
           "rss_mib": round(rss, 1), "rss_growth_mib": round(rss - base, 1), "peak_rss_mib": round(peak, 1)}
    if not args.masks:
        _fake_io(module, cls)
        ds.flip_prob = 0.0
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the "DataLoader worker"
            os.close(read)
            os.write(write, json.dumps(_worker(ds)).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            out.update(json.loads(pipe.read()))
        os.waitpid(pid, 0)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="ab590b0", help="commit whose pipeline/data/dataset.py is the reference")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_data_startup"))
    p.add_argument("--images", type=int, default=118_287)
    p.add_argument("--anns", type=int, default=860_001)
    p.add_argument("--poly-points", type=int, default=24, help="points per polygon (train2017's file: ~448 MB)")
    p.add_argument("--masks", action="store_true", help="datasets with masks; no worker measurement")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", choices=["ref", "new"], help=argparse.SUPPRESS)
    p.add_argument("--ann", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ref-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--images-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    ann, image_dir = prepare(args.workdir, args.images, args.anns, args.poly_points)
    ref_commit = _git("rev-parse", "--short", args.ref)
    ref_file = args.workdir / f"data_{ref_commit}.py"
    ref_file.write_text(_git("show", f"{args.ref}:pipeline/data/dataset.py") + "\n")
    dirty = bool(_git("status", "--porcelain", "pipeline/data/dataset.py"))
    commits = {"ref": ref_commit, "new": _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")}
    blobs = {"ref": _git("rev-parse", "--short", f"{args.ref}:pipeline/data/dataset.py"),  # the file measured, by content
             "new": _git("hash-object", "pipeline/data/dataset.py")[:7]}
    label = {"bench": "data_startup", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "device": cpu_model(), "images": args.images, "annotations": args.anns,
             "poly_points": args.poly_points, "json_mib": round(ann.stat().st_size / 2**20, 1), "masks": args.masks}
    rows = []
    for rnd in range(args.rounds):
        for variant in ("ref", "new"):
            cmd = [sys.executable, __file__, "--child", variant, "--ann", str(ann), "--images-dir", str(image_dir),
                   "--ref-file", str(ref_file)] + (["--masks"] if args.masks else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if done.returncode != 0:
                raise RuntimeError(f"{variant}: exit {done.returncode}\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.split("RESULT ", 1)[1])
            rows.append({**label, "round": rnd, "variant": variant, "commit": commits[variant],
                         "data_py_blob": blobs[variant], **result})
            print(f"round {rnd} {variant}: {result}", flush=True)
    cols = ["construct_s", "check_s", "rss_mib", "rss_growth_mib", "peak_rss_mib"]
    if not args.masks:
        cols += ["worker_uss_growth_mib", "worker_pss_mib", "worker_items_per_s", "targets_sha"]
    print(f"\n{label['device']}; {args.images} images, {args.anns} annotations, {label['json_mib']} MiB JSON"
          f"{', masks' if args.masks else ''}")
    print(" | ".join(["round", "variant", "commit", *cols]))
    for r in rows:
        print(" | ".join(str(r[c]) for c in ["round", "variant", "commit", *cols]))
    with args.out.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
