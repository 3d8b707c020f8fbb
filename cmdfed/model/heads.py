"""HoVer-Net-style task heads over the U-Net decoder's multi-scale maps.

The decoder maps at 1, 1/4, 1/8 and 1/16 resolution are each 1x1-projected to
``head_width`` channels at their own resolution (cheap) and layer-normalised there,
bilinearly upsampled to full resolution and summed, then layer-normalised again; each
task then has its own two 3x3 convs
and a 1x1 output: NP (nucleus vs background logits), HV (horizontal and vertical
distance to the nucleus centre, linear, targets in [-1, 1]) and optionally NC (nucleus
class logits, background included).

Why a norm per scale: a frozen backbone's maps differ in magnitude by scale, and after
masked-diffusion pretraining the coarse ones are the large ones (tiny preset, an H&E tile,
projections at initialisation: std 0.008 at full resolution against 0.26 and 0.38 at 1/8
and 1/16). Summed as they are, the fine maps, which carry the nuclear boundaries, were a
few percent of the fused signal; normalised per scale, every scale enters equally and the
heads learn how to weigh them.

``head_scales`` N fuses only the N finest decoder maps (1: the full-resolution one alone), to
measure which scales the heads need (benchmarks/model_quality, lever ``scales1``).

``head_conv`` "separable" splits each task conv into a depthwise 3x3 and a pointwise 1x1, as the
ConvNeXt blocks do: the same receptive field at full resolution for about a seventh of the
multiply-adds (32 channels: 9 * 32 + 32 * 32 per pixel against 9 * 32 * 32) and a third of the
heads' parameters (14 k against 45 k for the tiny preset).

``head_stride`` 2 runs the fused map and the task convs at half resolution (the full-resolution
map average-pooled) and upsamples their outputs bilinearly: the 3x3 convs at full resolution
are most of the model's cost at inference (about 40 % of ONNX Runtime's time for a 256 px tile
with the tiny preset) and of a fine-tuning step; a quarter of the pixels costs a quarter.

Sizes: with a frozen backbone these heads are what a site trains (optionally with the
modulation layers); the base preset keeps them well under 5 % of the model so that
federated fine-tuning exchanges little. Only Conv2d, GELU and nn.LayerNorm, so Opacus
and TensorRT handle them; bilinear (not bicubic) upsampling exports as ONNX Resize/linear.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class SeparableTaskBranch(nn.Sequential):
    """TaskBranch with each 3x3 conv split into a depthwise 3x3 and a pointwise 1x1 (ConvNeXt's split)."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width),
            nn.Conv2d(width, width, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width),
            nn.Conv2d(width, width, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(width, out_channels, kernel_size=1),
        )


class ScaleProjection(nn.Sequential):
    """One decoder map to the heads' width: 1x1 conv, then LayerNorm over channels."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__(nn.Conv2d(dim, width, kernel_size=1), LayerNorm2d(width))


class SegmentationHeads(nn.Module):
    def __init__(
        self,
        feature_dims: Sequence[int],
        width: int,
        np_channels: int,
        n_classes: int,
        stride: int = 1,
        conv: str = "dense",
    ) -> None:
        super().__init__()
        self.stride = stride
        self.projections = nn.ModuleList(ScaleProjection(dim, width) for dim in feature_dims)
        self.norm = LayerNorm2d(width)
        branch = {"dense": TaskBranch, "separable": SeparableTaskBranch}[conv]
        self.np = branch(width, np_channels)
        self.hv = branch(width, 2)
        self.nc = branch(width, n_classes) if n_classes > 0 else None

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor | None]:
        """features: decoder maps, finest (full resolution) first; those beyond the projections are not read."""
        full = features[0].shape[-2:]
        finest = features[0] if self.stride == 1 else F.avg_pool2d(features[0], self.stride)
        size = finest.shape[-2:]
        fused = self.projections[0](finest)
        for projection, feature in zip(self.projections[1:], features[1:]):
            fused = fused + F.interpolate(projection(feature), size=size, mode="bilinear", align_corners=False)
        fused = self.norm(fused)
        outputs = {"np": self.np(fused), "hv": self.hv(fused), "nc": None if self.nc is None else self.nc(fused)}
        if self.stride == 1:
            return outputs
        return {
            task: None if out is None else F.interpolate(out, size=full, mode="bilinear", align_corners=False)
            for task, out in outputs.items()
        }
