"""FLOPs per training image, TFLOP/s and MFU (pipeline/train/flops.py), against counts made by hand
and a published figure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.train.flops import FlopMeter, count_flops, device_peak_tflops


def test_a_tiny_conv_net_counts_as_by_hand():
    """conv1 3->8 (3x3) on the input, conv2 8->4 (1x1), 16x16 images, batch 2. Each convolution's forward
    is 2 x MACs; backward computes conv2's input and weight gradients (2 x its forward) but only conv1's
    weight gradient (the input needs none): total = 2 x conv1 + 3 x conv2."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    x = torch.rand(2, 3, 16, 16)
    conv1 = 2 * (2 * 16 * 16) * 8 * 3 * 3 * 3
    conv2 = 2 * (2 * 16 * 16) * 4 * 8
    _, flops = count_flops(lambda: net(x).sum().backward())
    assert flops == 2 * conv1 + 3 * conv2


def test_resnet50_forward_matches_torchvisions_published_figure():
    """torchvision lists ResNet-50 at 224x224 as 4.089 GFLOPS, counted as multiply-adds (its weights'
    meta ``_ops``); counted here on the meta device, forward only, in FLOPs = 2 x multiply-adds."""
    from torchvision.models import ResNet50_Weights, resnet50

    with torch.device("meta"):
        model = resnet50()
        x = torch.empty(1, 3, 224, 224)
    with torch.no_grad():
        _, flops = count_flops(lambda: model(x))
    assert flops / 2 / 1e9 == pytest.approx(ResNet50_Weights.IMAGENET1K_V2.meta["_ops"], rel=2e-3)


def test_peaks_by_gpu_name_and_precision(monkeypatch):
    assert device_peak_tflops(torch.device("cpu"), half=True) is None  # no peak, no MFU
    names = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA H200": 989.4, "NVIDIA GeForce GTX 1080": None}
    for name, bf16 in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert device_peak_tflops(torch.device("cuda", 0), half=True) == bf16, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert device_peak_tflops(torch.device("cuda", 0), half=False) == 19.5


def test_rates_per_rank_and_mfu():
    """The count is per image on one rank (a 4x8 @ 8x2 matmul: 128 FLOPs, over 2 images: 64); at 1e11
    images/s over 4 ranks that is 1.6 TFLOP/s per rank, 16% of a 10 TFLOP/s peak."""
    meter = FlopMeter(world=4, peak_tflops=10.0)
    assert meter.rates(1e11) == {}  # nothing before the count
    a, b = torch.rand(4, 8), torch.rand(8, 2)
    assert torch.equal(meter.count(lambda: a @ b, images=2), a @ b)
    assert meter.flops_per_image == 64
    assert meter.rates(1e11) == pytest.approx({"tflops_per_rank": 1.6, "mfu": 0.16})
    no_peak = FlopMeter(world=1, peak_tflops=None)
    no_peak.count(lambda: a @ b, images=1)
    assert set(no_peak.rates(1.0)) == {"tflops_per_rank"}
