"""Model FLOPs per training image, and what they make of a run's throughput: TFLOP/s per rank and MFU.

Large-model users judge a run by its model FLOPs utilisation (MFU): the FLOPs the model needs per
second at the measured throughput over the device's dense peak. The FLOPs are counted, not
modelled: ``torch.utils.flop_counter.FlopCounterMode`` around the first iteration of each launch,
which is the real model, at the configured input size, on real training images, forward and
backward as they execute (a first convolution computes no input gradient, a frozen layer no
weight gradient; under activation checkpointing the recomputed forward counts too, which makes the
figure hardware FLOPs utilisation rather than model FLOPs). Per image = that iteration's count /
its images on this rank; images vary in size, so the figure is the first batch's, not an average.
Only matrix multiplications and convolutions count (FlopCounterMode's rule): normalisation,
activations, NMS and the optimizer are not in it.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

# Dense peaks (no structured sparsity) per GPU in TFLOP/s from the vendors' datasheets: "bf16" is the
# tensor-core bf16/fp16 rate, "fp32" plain FP32 (not TF32). Matched against torch.cuda.get_device_name,
# longest name first (an "H100 PCIe" is not an H100 SXM). ``train.peak_tflops`` overrides.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp32": 91.6},
}


def device_peak_tflops(device: torch.device, half: bool) -> Optional[float]:
    """The dense peak of ``device`` at bf16 (``half``) or fp32, or None where it is not in the table (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]["bf16" if half else "fp32"]
    return None


def count_flops(run: Callable[[], object]) -> tuple[object, int]:
    """``run()``'s result and the FLOPs it executed (forward and backward, matmuls and convolutions).

    Compiled code runs eagerly for the count (``torch.compiler.set_stance("force_eager")``): a
    dispatch mode on the stack would otherwise be traced into the first compiled graph."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        out = run()
    return out, counter.get_total_flops()


class FlopMeter:
    """Counts the FLOPs per image once (``count``, around one iteration), then turns each window's
    throughput into TFLOP/s per rank and MFU (where the device's peak is known)."""

    def __init__(self, world: int, peak_tflops: Optional[float]):
        self.world, self.peak_tflops = world, peak_tflops
        self.flops_per_image: Optional[float] = None

    def count(self, run: Callable[[], object], images: int) -> object:
        """Run one iteration (``images`` images on this rank) under the counter; returns its result."""
        out, flops = count_flops(run)
        self.flops_per_image = flops / images
        log.info("model FLOPs: %.2f GFLOP per training image (forward + backward, counted on the first "
                 "iteration)%s", self.flops_per_image / 1e9,
                 f"; peak {self.peak_tflops:g} TFLOP/s per rank" if self.peak_tflops else "; no known peak: no MFU")
        return out

    def rates(self, images_per_s: float) -> dict[str, float]:
        """TFLOP/s per rank and MFU at a global throughput of ``images_per_s``; {} before the count."""
        if not self.flops_per_image:
            return {}
        tflops = self.flops_per_image * images_per_s / self.world / 1e12
        out = {"tflops_per_rank": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out
