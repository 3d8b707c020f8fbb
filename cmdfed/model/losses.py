"""HoVer-Net fine-tuning losses (Graham et al. 2019) for the NP, HV and NC heads.

* NP: cross-entropy (2 logits) or binary cross-entropy (1 logit) + soft Dice.
* HV: MSE over all pixels + MSGE, the mean squared error of Sobel gradients, averaged
  over nuclear pixels only (it sharpens the HV maps where instances touch).
* NC: cross-entropy + soft Dice over all classes (background included).

Dice as in HoVer-Net's code: per class 1 - (2 |P.T| + s) / (|P| + |T| + s) with sums over
batch and pixels together, s = 1e-3, summed over classes (background included).
Term weights default to the authors' PyTorch config (all 1).

Target format (from the data pipeline):
  "np": (B, H, W) integer, 1 = nucleus, 0 = background
  "hv": (B, 2, H, W) float in [-1, 1]; channel 0 = horizontal (x) offset map,
        channel 1 = vertical (y), as HoVer-Net's ``gen_instance_hv_map``
  "nc": (B, H, W) integer class index, 0 = background (only with an NC head)

Gradients: channel 0 is differentiated along x and channel 1 along y with HoVer-Net's
5x5 Sobel-like kernel k(dy, dx) = dx / (dx^2 + dy^2). (The authors' PyTorch code builds
the kernel with ``meshgrid`` in "ij" order, which differentiates channel 0 along y; we
follow the stated intent, as MONAI's HoVerNetLoss does.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmdfed.errors import CmdfedError

DEFAULT_WEIGHTS = {"np_ce": 1.0, "np_dice": 1.0, "hv_mse": 1.0, "hv_msge": 1.0, "nc_ce": 1.0, "nc_dice": 1.0}


def dice_loss(probabilities: Tensor, one_hot: Tensor, smooth: float = 1e-3) -> Tensor:
    """HoVer-Net soft Dice: (B, C, H, W) probabilities and one-hot targets -> scalar, summed over C."""
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    return (1 - (2 * intersection + smooth) / (total + smooth)).sum()


def np_loss(logits: Tensor, target: Tensor, weights: dict[str, float] = DEFAULT_WEIGHTS) -> tuple[Tensor, Tensor]:
    """(cross-entropy, Dice) for NP logits (B, 1 or 2, H, W) and a (B, H, W) 0/1 target."""
    target = target.long()
    if logits.shape[1] == 1:
        ce = F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype))
        foreground = torch.sigmoid(logits)
        probabilities = torch.cat([1 - foreground, foreground], dim=1)
    else:
        ce = F.cross_entropy(logits, target)
        probabilities = logits.softmax(dim=1)
    one_hot = F.one_hot(target, 2).permute(0, 3, 1, 2).to(probabilities.dtype)
    return weights["np_ce"] * ce, weights["np_dice"] * dice_loss(probabilities, one_hot)


def sobel_kernels(size: int = 5) -> tuple[Tensor, Tensor]:
    """(d/dx, d/dy) kernels, (1, 1, size, size), for F.conv2d (cross-correlation)."""
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    norm = dx * dx + dy * dy + 1e-15
    return (dx / norm).view(1, 1, size, size), (dy / norm).view(1, 1, size, size)


def hv_gradients(hv: Tensor) -> Tensor:
    """(B, 2, H, W) HV maps -> (B, 2, H, W): d(horizontal)/dx, d(vertical)/dy."""
    kernel_x, kernel_y = (k.to(hv.device, hv.dtype) for k in sobel_kernels(5))
    return torch.cat([F.conv2d(hv[:, :1], kernel_x, padding=2), F.conv2d(hv[:, 1:], kernel_y, padding=2)], dim=1)


def hv_loss(
    prediction: Tensor, target: Tensor, nuclei: Tensor, weights: dict[str, float] = DEFAULT_WEIGHTS
) -> tuple[Tensor, Tensor]:
    """(MSE, MSGE) for HV maps; MSGE is averaged over nuclear pixels (``nuclei`` (B, H, W) 0/1)."""
    mse = (prediction - target).pow(2).mean()
    focus = nuclei.to(prediction.dtype)[:, None].expand(-1, 2, -1, -1)
    gradient_error = (hv_gradients(prediction) - hv_gradients(target)).pow(2)
    msge = (gradient_error * focus).sum() / (focus.sum() + 1e-8)
    return weights["hv_mse"] * mse, weights["hv_msge"] * msge


def nc_loss(logits: Tensor, target: Tensor, weights: dict[str, float] = DEFAULT_WEIGHTS) -> tuple[Tensor, Tensor]:
    """(cross-entropy, Dice) for NC logits (B, n_classes, H, W) and a (B, H, W) class-index target."""
    target = target.long()
    ce = F.cross_entropy(logits, target)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    return weights["nc_ce"] * ce, weights["nc_dice"] * dice_loss(logits.softmax(dim=1), one_hot)


def hovernet_loss(
    outputs: dict[str, Tensor | None], targets: dict[str, Tensor], weights: dict[str, float] | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total weighted loss and its detached terms, for ``model.segment`` outputs and targets."""
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    _check_targets(outputs, targets)
    terms: dict[str, Tensor] = {}
    terms["np_ce"], terms["np_dice"] = np_loss(outputs["np"], targets["np"], weights)
    terms["hv_mse"], terms["hv_msge"] = hv_loss(outputs["hv"], targets["hv"], targets["np"], weights)
    if outputs.get("nc") is not None:
        terms["nc_ce"], terms["nc_dice"] = nc_loss(outputs["nc"], targets["nc"], weights)
    total = torch.stack(list(terms.values())).sum()
    return total, {k: v.detach() for k, v in terms.items()}


def _check_targets(outputs: dict[str, Tensor | None], targets: dict[str, Tensor]) -> None:
    batch, _, height, width = outputs["np"].shape
    expected = {"np": (batch, height, width), "hv": (batch, 2, height, width)}
    if outputs.get("nc") is not None:
        expected["nc"] = (batch, height, width)
    for key, shape in expected.items():
        if key not in targets:
            raise CmdfedError(f"missing target {key!r}; the model's heads need targets {sorted(expected)}")
        if tuple(targets[key].shape) != shape:
            raise CmdfedError(f"target {key!r} must have shape {shape}, got {tuple(targets[key].shape)}")
