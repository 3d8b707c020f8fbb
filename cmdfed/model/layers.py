"""Small parameter-light layers shared by the U-Net and the heads.

Every layer that owns parameters is a module whose parameters act in one standard way,
so Opacus can compute per-sample gradients: the LayerNorm is a plain ``nn.LayerNorm`` on
a channels-last tensor (Opacus has a sampler for it; a hand-written channels-first norm
would need a custom one), and LayerScale keeps its one vector in its own module, which
the privacy code registers a sampler for.

``nn.LayerNorm`` calls ``F.layer_norm``, which the ONNX exporter writes as a single
``LayerNormalization`` node; the mean/variance arithmetic of the original ConvNeXt
channels-first norm would export as a dozen nodes that TensorRT must fuse back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor: permute, ``nn.LayerNorm``, permute back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT / ConvNeXt), channels-last input.

    The initial value is written by ``ConvNeXtUNet.initialize_weights``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
