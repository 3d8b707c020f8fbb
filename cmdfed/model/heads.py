"""HoVer-Net-style task heads over the U-Net decoder's multi-scale maps.

The decoder maps at 1, 1/4, 1/8 and 1/16 resolution are each 1x1-projected to
``head_width`` channels at their own resolution (cheap), bilinearly upsampled to full
resolution and summed, then layer-normalised; each task then has its own two 3x3 convs
and a 1x1 output: NP (nucleus vs background logits), HV (horizontal and vertical
distance to the nucleus centre, linear, targets in [-1, 1]) and optionally NC (nucleus
class logits, background included).

Sizes: with a frozen backbone these heads are what a site trains (optionally with the
modulation layers); the base preset keeps them well under 5 % of the model so that
federated fine-tuning exchanges little. Only Conv2d, GELU and nn.LayerNorm, so Opacus
and TensorRT handle them; bilinear (not bicubic) upsampling exports as ONNX Resize/linear.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cmdfed.model.layers import LayerNorm2d


class TaskBranch(nn.Sequential):
    """Two 3x3 conv + GELU layers, then a 1x1 conv to the task's channels."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, out_channels, kernel_size=1),
        )


class SegmentationHeads(nn.Module):
    def __init__(self, feature_dims: Sequence[int], width: int, np_channels: int, n_classes: int) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv2d(dim, width, kernel_size=1) for dim in feature_dims)
        self.norm = LayerNorm2d(width)
        self.np = TaskBranch(width, np_channels)
        self.hv = TaskBranch(width, 2)
        self.nc = TaskBranch(width, n_classes) if n_classes > 0 else None

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor | None]:
        """features: decoder maps, finest (full resolution) first."""
        size = features[0].shape[-2:]
        fused = self.projections[0](features[0])
        for projection, feature in zip(self.projections[1:], features[1:]):
            fused = fused + F.interpolate(projection(feature), size=size, mode="bilinear", align_corners=False)
        fused = self.norm(fused)
        return {"np": self.np(fused), "hv": self.hv(fused), "nc": None if self.nc is None else self.nc(fused)}
