"""The step-time model's answers for docs/RESULTS.md (issue #31): predictions, not measurements.

    python benchmarks/step_time_tables.py --cache /tmp/step_time_inputs.json   # ~15 min on a 2-core CPU, then seconds

1. Sanity checks against published figures, with those papers' hardware as inputs:
   MegDet's COCO training time at batch 16 on 8 GPUs (33.2 h) against batch 256 on 128 GPUs (4.1 h), and
   AGVM's overhead (one extra all-reduce: 0.12% of an iteration of Faster R-CNN R50, batch 1024, 128 A100s).
2. Faster R-CNN R50-FPN at batch 1024 and the 1.15B ViT-g detector at batch 1536 on 64-1024 H100s over
   400 Gb/s: the fastest ZeRO stage, cross-GPU BN per node against per-GPU BN, AGVM at tau 10 against tau 1.
Prints markdown; every input is in the text printed with it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional

from pipeline.config import load_config
from pipeline.tools import step_time as st
from pipeline.tools.planner import ActivationProbe, largest_image, run_probe

R50 = ("configs/coco_r50_fpn.yaml", ["optim.name=agvm_sgd", "agvm.tau=10", "model.norm=cgbn", "model.bn_group=node"])
VITG = ("configs/coco_vitdet_b.yaml", ["model.backbone=vit_giant_patch14_dinov2", "optim.name=agvm_adamw",
                                       "agvm.tau=10", "train.ds_config=ds_configs/zero3_bf16.json"])
H100 = dict(gpu="h100", intra=st.intra_link("nvlink4"), inter=st.network_link("400Gb"))


def _cfg(spec, *extra):
    return load_config(spec[0], spec[1] + list(extra))


def _inputs(cluster, batch, flops, mfu, source, cfg):
    return st.Inputs(cluster, batch, flops, "counted", mfu, source, True, st.COCO_TRAIN_IMAGES, st.run_epochs(cfg))


def _best(rows, fits_only=True):
    ok = [r for r in rows if r[0].fits is not False] if fits_only else rows
    return max(ok, key=lambda r: r[0].images_per_s) if ok else None


def megdet_check(flops: float) -> list[str]:
    """MegDet: Titan Xp (fp32, 12.1 TFLOP/s), 8 per node on PCIe 3; the network is not stated in the paper:
    56 Gb/s (FDR InfiniBand, 2017) assumed, others shown. The MFU is solved from the 33.2 h baseline."""
    cfg = _cfg(("configs/coco_r50_fpn.yaml", ["train.ds_config=ds_configs/zero0_fp32.json", "model.norm=cgbn",
                                              "model.bn_group=node", "train.micro_batch=2"]))
    images = 11 * st.COCO_TRAIN_IMAGES  # the normal policy, as both of the paper's runs

    def hours(nodes, inter, mfu):
        cluster = st.Cluster(nodes, 8, "titanxp", st.intra_link("pcie3"), st.network_link(inter))
        step, _ = st.predict_step(cfg, cluster, 80, flops, mfu, False, 0, 2, 1)
        return images / step.images_per_s / 3600, step

    # compute is linear in 1 / MFU: solve the one-node run for 33.2 h
    _, probe_step = hours(1, "56Gb", 1.0)
    target_step = 33.2 * 3600 / (images / 16)
    mfu = probe_step.compute_s / (target_step - probe_step.step_s + probe_step.compute_s)
    lines = ["| network between nodes (assumed) | batch 16, 8 GPUs | batch 256, 128 GPUs | speed-up | comm share at 128 |",
             "|---|---|---|---|---|"]
    for inter in ("10Gb", "25Gb", "56Gb", "100Gb"):
        h16, _ = hours(1, inter, mfu)
        h256, step = hours(16, inter, mfu)
        lines.append(f"| {inter}/s per GPU | {h16:.1f} h | {h256:.1f} h | {h16 / h256:.1f}x | "
                     f"{100 * step.comm_fraction:.0f}% |")
    lines.append("| paper | 33.2 h | 4.1 h | 8.1x | - |")
    return [f"MFU solved from the 33.2 h baseline: {100 * mfu:.1f}% of the Titan Xp's 12.1 TFLOP/s "
            f"({flops / 1e9:,.0f} GFLOP per 800x1333 training image, counted)", ""] + lines


def agvm_check(flops: float) -> list[str]:
    """AGVM's overhead: 128 A100 (16 x 8, NVLink 3, 200 Gb/s HDR per GPU assumed), batch 1024 (8 per GPU),
    SyncBN per node, tau 10; the MFU of the H100 anchor applied to the A100's peak."""
    lines = ["| all-reduce | estimate every | step, SGD | step, AGVM-SGD | overhead | paper |", "|---|---|---|---|---|---|"]
    for algorithm in ("ring", "tree"):
        cluster = st.Cluster(16, 8, "a100", st.intra_link("nvlink3"), st.network_link("200Gb"), algorithm=algorithm)
        for tau in (10, 1):
            cfgs = [_cfg(R50, f"optim.name={o}", f"agvm.tau={tau}", "train.ds_config=ds_configs/zero0_bf16.json",
                         "train.micro_batch=8") for o in ("sgd", "agvm_sgd")]
            (sgd, _), (agvm, _) = (st.predict_step(c, cluster, 80, flops, st.DEFAULT_MFU["convnet"][0], True, 0, 8, 1)
                                   for c in cfgs)
            lines.append(f"| {algorithm} | {tau} | {1e3 * sgd.step_s:.1f} ms | {1e3 * agvm.step_s:.1f} ms | "
                         f"{100 * (agvm.step_s / sgd.step_s - 1):.2f}% | {'0.12%' if tau == 10 else '-'} |")
    return lines


def cluster_tables(spec, batch: int, flops: float, probe, label: str) -> list[str]:
    cfg = _cfg(spec)
    mfu, source = st.default_mfu(cfg)
    out = [f"**{label}**, batch {batch}, {flops / 1e9:,.0f} GFLOP per training image (counted), MFU "
           f"{100 * mfu:.1f}% ({source}); NVLink 4 inside a node, 400 Gb/s per GPU between nodes, ring all-reduce, "
           "efficiency 0.8, no overlap; ! = best candidate does not fit 90% of 80 GB", "",
           "| GPUs | fastest (ZeRO, micro x accum, BN) | img/s | comm share | eff. vs 1 node | best ZeRO-0 / 1 / 2 / 3 "
           "img/s | best per-GPU BN | best cgbn/node | AGVM tau 10 | AGVM tau 1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for gpus in (64, 128, 256, 512, 1024):
        if batch % gpus:
            out.append(f"| {gpus} | {batch / gpus:g} images per GPU: not a whole number | | | | | | | | |")
            continue
        cluster = st.Cluster(gpus // 8, 8, **H100)
        rows = st.plan_cluster(cfg, _inputs(cluster, batch, flops, mfu, source, cfg), 80, [0, 1, 2, 3], None, probe)
        best = _best(rows) or _best(rows, fits_only=False)
        step, one, _ = best
        by_bn = {bn: _best([r for r in rows if r[0].bn == bn]) for bn in {r[0].bn for r in rows}}
        bn_cells = [f"{by_bn[k][0].images_per_s:,.0f} img/s" if by_bn.get(k) else "-" for k in ("per_gpu", "cgbn/node")]
        by_stage = [_best([r for r in rows if r[0].stage == k]) for k in range(4)]
        stage_cell = " / ".join(f"{b[0].images_per_s:,.0f}" if b else "none fits" for b in by_stage)
        # AGVM's share of the best candidate's step at tau 10 and tau 1 (its collectives, not its compute)
        agvm = []
        for tau in (10, 1):
            tuned = cfg.model_copy(update={"agvm": cfg.agvm.model_copy(update={"tau": tau})})
            c = tuned.model_copy(update={"train": tuned.train.model_copy(update={"micro_batch": step.micro_batch})})
            if step.bn == "per_gpu":
                c = c.model_copy(update={"model": c.model.model_copy(update={"norm": "per_gpu"})})
            with_agvm, transfers = st.predict_step(c, cluster, 80, flops, mfu, True, step.stage, step.micro_batch,
                                                   step.grad_accum)
            extra = sum(st.transfer_seconds(t, cluster) for t in transfers if t.part == "agvm")
            agvm.append(f"+{100 * extra / (with_agvm.step_s - extra):.2f}%")
        out.append(f"| {gpus} | ZeRO-{step.stage}, {step.micro_batch} x {step.grad_accum}, {step.bn}"
                   f"{'' if step.fits is not False else ' !'} | {step.images_per_s:,.0f} | "
                   f"{100 * step.comm_fraction:.0f}% | {100 * step.images_per_s / (cluster.nodes * one.images_per_s):.0f}%"
                   f" | {stage_cell} | {' | '.join(bn_cells)} | {' | '.join(agvm)} |")
    return out


class Cache:
    """The slow inputs (FLOP counts, activation probes) kept in a JSON file, so that a change to the model
    of time reruns in seconds; delete the file when the detector code changes."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.data = json.loads(path.read_text()) if path and path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.data:
            value = compute()
            self.data[key] = asdict(value) if is_dataclass(value) else value
            if self.path:
                self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def _probe(cache: Cache, key: str, *args) -> ActivationProbe:
    fields = cache.get(key, lambda: run_probe(*args))
    return ActivationProbe(**{**fields, "image_size": tuple(fields["image_size"]),
                              "probe_size": tuple(fields["probe_size"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vitg-probe-size", default="448x448", help="HxW to count ViT-g's FLOPs and memory at")
    parser.add_argument("--cache", type=Path, default=None, help="keep FLOP counts and probes in this JSON file")
    args = parser.parse_args()
    cache = Cache(args.cache)
    r50 = _cfg(R50)
    r50_size = largest_image(r50)
    r50_flops = cache.get("r50_flops", lambda: st.count_training_flops(r50, 80, r50_size))
    print("## MegDet Table 3's two end points\n")
    print("\n".join(megdet_check(r50_flops)))
    print("\n## AGVM's overhead\n")
    print("\n".join(agvm_check(r50_flops)))
    r50_probe = _probe(cache, "r50_probe", r50, 80, True, r50_size)
    print("\n## Faster R-CNN R50-FPN, batch 1024\n")
    print("\n".join(cluster_tables(R50, 1024, r50_flops, r50_probe, "Faster R-CNN R50-FPN, AGVM-SGD")))
    vitg = _cfg(VITG)
    size, probe_size = largest_image(vitg), tuple(int(v) for v in args.vitg_probe_size.split("x"))
    vitg_flops = cache.get("vitg_flops", lambda: st.count_training_flops(vitg, 80, probe_size)) * (
        size[0] * size[1] / (probe_size[0] * probe_size[1]))
    vitg_probe = _probe(cache, "vitg_probe", vitg, 80, True, size, probe_size)
    print(f"\n## ViT-g/14 Faster R-CNN (1.15B), batch 1536 (FLOPs and activations probed at {args.vitg_probe_size}, "
          "scaled by pixels)\n")
    print("\n".join(cluster_tables(VITG, 1536, vitg_flops, vitg_probe, "ViT-g Faster R-CNN, AGVM-AdamW")))


if __name__ == "__main__":
    main()
