"""Training precision: bf16 autocast where the hardware computes bf16 natively, fp32 elsewhere."""

import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.train import device as device_module
from cmdfed.train.device import autocast, use_bf16
from cmdfed.train.loop import TrainConfig

CPU = torch.device("cpu")


def test_auto_follows_native_bf16_on_cpu(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert use_bf16(CPU, "auto")
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert not use_bf16(CPU, "auto")  # a CPU without BF16 units: emulated bf16 is slower, stay fp32


def test_forced_bf16_without_native_support_is_refused(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(CmdfedError, match="no native bf16"):
        use_bf16(CPU, "bf16")


def test_fp32_forced_runs_in_fp32():
    layer = torch.nn.Linear(8, 8)
    with autocast(CPU, "fp32"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


@pytest.mark.skipif(not device_module.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_auto_autocasts_matmuls_to_bf16_here():
    layer = torch.nn.Linear(8, 8)
    with autocast(CPU, "auto"):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16


def test_unknown_precision_is_refused():
    with pytest.raises(CmdfedError, match="precision"):
        TrainConfig(precision="fp16")
