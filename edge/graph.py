"""The network as the edge runs it: float image in, probabilities out.

The checkpoint's ``segment`` returns logits; every consumer on the edge wants what
``cmdfed.inference.segment.predict_maps`` computes from them (NP foreground probability, HV maps,
NC class probabilities). Putting the softmax into the exported graph means every backend
(ONNX Runtime, TensorRT, torch-tensorrt) returns exactly the post-processing inputs, and
the golden data compares the quantities the watershed thresholds, not logits whose scale
means little.

Input ``image``: float32 (B, 3, H, W) in [-1, 1] (``to_model_input`` of uint8 RGB), H and W
multiples of 32. Outputs ``np`` (B, H, W), ``hv`` (B, 2, H, W) and, with an NC head,
``nc`` (B, C, H, W).

Folded blocks. A self-contained model (no FM) conditions every ConvNeXt block on one
constant: the fine-tuning timestep. Its adaptive LayerNorm's scale and shift and its gate are
therefore constants too, so :class:`FoldedConvNeXtBlock` multiplies them into the LayerNorm's
affine and the second pointwise layer's weights, and runs the pointwise layers as 1x1
convolutions on the channels-first map: in ONNX a block is then depthwise conv, one
LayerNormalization between two transposes, conv, GELU, conv, add, instead of the per-block
modulation Mul/Add and two MatMuls on a channels-last copy (ONNX Runtime's CPU convolutions
run blocked; in an interleaved one-thread A/B on a 256 px tile of the tiny preset the folded
graph took 15-20 % less time, while two-thread benchmark passes stayed within this 2-core
machine's noise: benchmarks/README.md, edge_tile_throughput). Same function: outputs agree
with the unfolded model within ~1e-6 (tested), and the export checks its graph against the
unfolded model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmdfed.errors import CmdfedError
from cmdfed.model.unet import ConvNeXtBlock, ConvNeXtUNet, SegmentationGraph

INPUT_NAME = "image"


class FoldedConvNeXtBlock(nn.Module):
    """A :class:`ConvNeXtBlock` for one constant condition ``cond``, channels-first (see above)."""

    def __init__(self, block: ConvNeXtBlock, cond: Tensor) -> None:
        super().__init__()
        scale, shift, gate = (v.reshape(-1) for v in block.modulation(cond, None))
        dim = scale.numel()
        self.dwconv = block.dwconv
        self.eps = block.norm.eps
        self.norm_weight = nn.Parameter(block.norm.weight * (1 + scale))
        self.norm_bias = nn.Parameter(block.norm.bias * (1 + scale) + shift)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, kernel_size=1)
        self.pwconv1.weight = nn.Parameter(block.pwconv1.weight[:, :, None, None].clone())
        self.pwconv1.bias = nn.Parameter(block.pwconv1.bias.clone())
        branch_scale = block.layer_scale.gamma * (1 + gate)
        self.pwconv2 = nn.Conv2d(4 * dim, dim, kernel_size=1)
        self.pwconv2.weight = nn.Parameter((block.pwconv2.weight * branch_scale[:, None])[:, :, None, None])
        self.pwconv2.bias = nn.Parameter(block.pwconv2.bias * branch_scale)

    def forward(self, x: Tensor, cond: Tensor | None = None, grid: Tensor | None = None) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = F.layer_norm(h, (h.shape[-1],), self.norm_weight, self.norm_bias, self.eps).permute(0, 3, 1, 2)
        return x + self.pwconv2(F.gelu(self.pwconv1(h)))


def folded_blocks(model: ConvNeXtUNet) -> ConvNeXtUNet:
    """A copy of the self-contained ``model`` in eval mode whose ConvNeXt blocks are folded for its
    fine-tuning timestep."""
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        cond, _ = folded.conditioning(torch.full((1,), float(model.config.finetune_timestep)), None)
        for parent in list(folded.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, ConvNeXtBlock):
                    setattr(parent, name, FoldedConvNeXtBlock(child, cond))
    return folded


class EdgeGraph(nn.Module):
    """``model`` as the edge runs it; ``fold`` False keeps its blocks as trained (the reference)."""

    def __init__(self, model: ConvNeXtUNet, fold: bool = True) -> None:
        super().__init__()
        if model.config.fm_kind != "none":
            raise CmdfedError(
                f"this checkpoint is conditioned on a foundation model ({model.config.fm_kind}); the edge "
                "exports only self-contained models (fm_kind none): fine-tune without --fm to deploy"
            )
        self.segmentation = SegmentationGraph(folded_blocks(model) if fold else model)
        self.has_nc = bool(model.config.n_classes)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("np", "hv", "nc") if self.has_nc else ("np", "hv")

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        outputs = self.segmentation(image)
        np_logits, hv = outputs[0], outputs[1]
        if np_logits.shape[1] == 2:
            np_prob = np_logits.softmax(1)[:, 1]
        else:
            np_prob = torch.sigmoid(np_logits)[:, 0]
        if self.has_nc:
            return np_prob, hv, outputs[2].softmax(1)
        return np_prob, hv
