"""pipeline/train/what_runs.py: the start-up block's precision line says whether bf16 is native on a CPU
(the embedded default trains in bf16 autocast, which is slower than fp32 where the CPU emulates it)."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import torch

import pipeline.train.what_runs as what_runs


def test_bf16_autocast_on_a_cpu_says_whether_the_cpu_has_it(monkeypatch):
    training = SimpleNamespace(ds_config={"torch_autocast": {"enabled": True, "dtype": "bfloat16"}})
    monkeypatch.setattr(what_runs, "cpu_has_native_bf16", lambda: False)
    assert "EMULATED" in what_runs._precision(training, torch.device("cpu"))
    monkeypatch.setattr(what_runs, "cpu_has_native_bf16", lambda: True)
    assert what_runs._precision(training, torch.device("cpu")) == "bfloat16 autocast (native on this CPU)"
    assert what_runs._precision(training, torch.device("cuda")) == "bfloat16 autocast"
    assert what_runs._precision(SimpleNamespace(ds_config={}), torch.device("cpu")) == "fp32"


def test_native_bf16_is_read_from_the_cpus_flags():
    """Against lscpu's flag list (util-linux reads the same CPUID bits another way)."""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no lscpu: the flags cannot be cross-checked here")
    line = next((ln for ln in flags.splitlines() if ln.startswith("Flags:")), "")
    assert what_runs.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(line.split()))
