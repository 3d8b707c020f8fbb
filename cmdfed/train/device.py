"""Where a site trains: device choice, mixed precision and memory layout.

Sites train on their own GPUs when they have one. On CUDA we use bf16 autocast (no loss
scaling needed, unlike fp16; LayerNorm and reductions stay fp32 under autocast) and
channels-last tensors, which is what depthwise 7x7 convs run fastest in on tensor-core
GPUs. On CPU we stay in fp32: bf16 on CPUs without native bf16 units is slower, not faster.
"""

from __future__ import annotations

import contextlib

import torch

from cmdfed.errors import CmdfedError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU; ``cuda``, ``cuda:1`` or ``cpu`` force one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CmdfedError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CmdfedError(f"device {name!r} requested but no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise CmdfedError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def use_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on GPUs that support it; a no-op elsewhere."""
    if enabled and use_bf16(device):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format
