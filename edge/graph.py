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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cmdfed.errors import CmdfedError
from cmdfed.model.unet import ConvNeXtUNet, SegmentationGraph

INPUT_NAME = "image"


class EdgeGraph(nn.Module):
    def __init__(self, model: ConvNeXtUNet) -> None:
        super().__init__()
        if model.config.fm_kind != "none":
            raise CmdfedError(
                f"this checkpoint is conditioned on a foundation model ({model.config.fm_kind}); the edge "
                "exports only self-contained models (fm_kind none): fine-tune without --fm to deploy"
            )
        self.segmentation = SegmentationGraph(model)
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
