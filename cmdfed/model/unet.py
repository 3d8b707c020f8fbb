"""The CMD network: a fully convolutional ConvNeXt U-Net with adaLN conditioning.

Layout (strides relative to the input; widths w0..w3 from the config):

    input (x, mask) --context--> stem 4x4/4 -> stage1 (1/4, w0) -> down -> stage2 (1/8)
                                  -> down -> stage3 (1/16) -> down -> stage4 (1/32)
    decoder: 1/32 -> 1/16 -> 1/8 -> 1/4 -> full resolution, each level = 1x1 conv,
             nearest upsampling, concat with the skip, 1x1 fuse, ConvNeXt blocks
    outputs: final layer (pre-training: the image in the diffusion parametrisation)
             task heads over the decoder maps at 1, 1/4, 1/8, 1/16 (fine-tuning)

Choices and why:

* Stem: 4x4 stride-4 patchify, as ConvNeXt. The encoder is then exactly ConvNeXt-T in
  the base preset (known cost and behaviour); a 2x2 stem would quadruple the cost of the
  widest-resolution stage. Full-resolution output comes from the decoder instead: its
  last level upsamples 1/4 -> 1 and fuses a full-resolution 3x3 embedding of the input,
  so boundaries are pixel-exact. Total stride 32, hence inputs must be multiples of 32.
* Blocks: 7x7 depthwise conv, LayerNorm over channels (channels-last ``nn.LayerNorm``,
  one ONNX LayerNormalization), adaLN scale/shift, 4x inverted-bottleneck MLP with GELU,
  LayerScale (own module, for Opacus), adaLN gate as ``1 + gate``, DropPath. No GRN:
  it pools globally, which would break the locality the leak guarantee relies on.
* Upsampling: nearest only (TensorRT-native; the following 7x7 depthwise convs smooth
  the blocks), after a 1x1 conv so the channel reduction runs at the low resolution.
  No transposed convs: Opacus has no per-sample-gradient rule for them.

Masking and leak prevention (pre-training). The input is the mixture image x (clean
where visible, x_t where hidden) and the mask (1 = hidden). Two paths read it:

1. The *context encoder* (stem + 4 stages, the bulk of the backbone and what the heads
   reuse) sees only the visible pixels: hidden pixels are set to 0 before the stem, and
   after the stem, every block and every downsample norm the features of cells with no
   visible pixel are set to 0 again (ConvNeXt V2's dense emulation of a sparse conv:
   holes stay empty instead of filling with bias terms, so the dense, mask-free
   fine-tuning forward applies the same operator to more cells). Guarantee: every
   encoder feature, and every decoder feature at 1/8 and 1/16, is an exact function
   of (visible pixels, mask, t, FM features). The hidden content, even at small t where
   x_t is nearly clean, cannot reach them, so the deep network must infer hidden tissue
   from context rather than denoise it, which is the representation we want to reuse.
2. The *input skips* into the decoder: a 4x4/4 patchify added at 1/4 and a 3x3 conv at
   full resolution, both over the full mixture. They are the only way x_t enters, and
   denoising needs it. Their reach is local: a decoder output depends on hidden content
   only within the receptive field of the 1/4 and full-resolution decoder levels, at most
   about 12 x decoder_depths[0] + 3 x full_res_depth + 4 px from the hole (19 px for
   ``tiny``, 34 px for ``base``; measured 15 and 30 for an aligned 32-px hole).

The FM must see the same visible-only image: ``encoder(images, mask)`` (encoders.py).

Fine-tuning/inference: ``segment(x, fm)`` runs the clean image with an all-zero mask at
``finetune_timestep``; nothing is re-masked, and the decoder maps feed the heads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmdfed.errors import CmdfedError
from cmdfed.model.checkpoint import state_dict_mismatch
from cmdfed.model.conditioning import AdaptiveModulation, Conditioning, grid_at, modulate
from cmdfed.model.encoders import FMFeatures
from cmdfed.model.heads import SegmentationHeads
from cmdfed.model.layers import DropPath, LayerNorm2d, LayerScale

if TYPE_CHECKING:
    from cmdfed.model.config import ModelConfig

PARAMETER_GROUPS = ("backbone", "modulation", "heads")
STRIDE = 32
_GRID_STRIDES = (1, 4, 8, 16, 32)


@dataclass
class DiffusionOutput:
    prediction: Tensor  # (B, C, H, W): x0, eps or v, as the diffusion config says
    features: list[Tensor]  # decoder maps, finest first: 1, 1/4, 1/8, 1/16


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int, grid_dim: int, drop_path: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.modulation = AdaptiveModulation(dim, cond_dim, grid_dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = LayerScale(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, cond: Tensor, grid: Tensor | None) -> Tensor:
        scale, shift, gate = self.modulation(cond, grid)
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.pwconv2(self.act(self.pwconv1(modulate(h, scale, shift))))
        h = self.layer_scale(h) * (1 + gate)
        return x + self.drop_path(h.permute(0, 3, 1, 2))


class Downsample(nn.Module):
    """LayerNorm + 2x2 stride-2 conv; hidden cells are re-zeroed between the two."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        return self.conv(_keep(self.norm(x), keep))


class DecoderLevel(nn.Module):
    """1x1 conv, nearest upsampling by ``scale``, concat with the skip, 1x1 fuse, blocks."""

    def __init__(self, in_dim: int, out_dim: int, scale: int, depth: int, cond_dim: int, grid_dim: int) -> None:
        super().__init__()
        self.scale = scale
        self.reduce = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.fuse = nn.Conv2d(2 * out_dim, out_dim, kernel_size=1)
        self.blocks = nn.ModuleList(ConvNeXtBlock(out_dim, cond_dim, grid_dim, 0.0) for _ in range(depth))

    def forward(self, x: Tensor, skip: Tensor, cond: Tensor, grid: Tensor | None) -> Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=self.scale, mode="nearest")
        x = self.fuse(torch.cat([x, skip], dim=1))
        for block in self.blocks:
            x = block(x, cond, grid)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear to image channels (DiT's final layer, per pixel)."""

    def __init__(self, dim: int, out_channels: int, cond_dim: int, grid_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.modulation = AdaptiveModulation(dim, cond_dim, grid_dim, with_gate=False)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x: Tensor, cond: Tensor, grid: Tensor | None) -> Tensor:
        scale, shift = self.modulation(cond, grid)
        return self.linear(modulate(self.norm(x.permute(0, 2, 3, 1)), scale, shift)).permute(0, 3, 1, 2)


class ConvNeXtUNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        w0, w1, w2, w3 = config.widths
        widths, cond_dim = config.widths, config.cond_dim
        grid_dim = config.grid_dim if config.use_patch_grid else 0
        input_channels = config.in_channels + 1  # image + mask

        self.conditioning = Conditioning(cond_dim, config.fm_dim, config.fm_vector, grid_dim)
        self.stem = nn.Sequential(nn.Conv2d(input_channels, w0, kernel_size=4, stride=4), LayerNorm2d(w0))
        self.downsamples = nn.ModuleList(Downsample(widths[i], widths[i + 1]) for i in range(3))
        rates = torch.linspace(0, config.drop_path, sum(config.depths)).tolist()
        offsets = [sum(config.depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            nn.ModuleList(ConvNeXtBlock(widths[i], cond_dim, grid_dim, rates[offsets[i] + j]) for j in range(depth))
            for i, depth in enumerate(config.depths)
        )
        self.input_skip_quarter = nn.Conv2d(input_channels, w0, kernel_size=4, stride=4)
        self.input_skip_full = nn.Conv2d(input_channels, config.full_res_width, kernel_size=3, padding=1)
        d4, d8, d16 = config.decoder_depths
        self.decoder = nn.ModuleList(
            [
                DecoderLevel(w3, w2, 2, d16, cond_dim, grid_dim),
                DecoderLevel(w2, w1, 2, d8, cond_dim, grid_dim),
                DecoderLevel(w1, w0, 2, d4, cond_dim, grid_dim),
                DecoderLevel(w0, config.full_res_width, 4, config.full_res_depth, cond_dim, grid_dim),
            ]
        )
        self.final_layer = FinalLayer(config.full_res_width, config.in_channels, cond_dim, grid_dim)
        self.heads = SegmentationHeads(
            (config.full_res_width, w0, w1, w2)[: config.head_scales],
            config.head_width,
            config.np_channels,
            config.n_classes,
            config.head_stride,
            config.head_conv,
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def base_init(module: nn.Module) -> None:
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, self.config.layer_scale_init)

        self.apply(base_init)
        # adaLN-Zero: untrained modulation is the identity (scale = shift = gate = 0).
        for module in self.modules():
            if isinstance(module, AdaptiveModulation):
                for layer in (module.vector[-1], module.grid):
                    if layer is not None:
                        nn.init.zeros_(layer.weight)
                        nn.init.zeros_(layer.bias)
        # Zero output layer (DiT): the untrained model predicts 0, the data mean in [-1, 1].
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self, x: Tensor, t: Tensor | float, mask: Tensor | None = None, fm: FMFeatures | None = None
    ) -> DiffusionOutput:
        """Pre-training forward: mixture image (clean where visible, x_t where hidden), timestep,
        mask (B, 1, H, W; nonzero = hidden; None = nothing hidden) and FM features computed
        from the visible pixels -> the image in the diffusion parametrisation."""
        x, t, mask, fm = self._check_inputs(x, t, mask, fm)
        features, cond, grids = self._features(x, t, mask, fm)
        return DiffusionOutput(prediction=self.final_layer(features[0], cond, grids[1]), features=features)

    def segment(self, x: Tensor, fm: FMFeatures | None = None) -> dict[str, Tensor | None]:
        """Fine-tuning/inference forward: clean image, no mask, t = finetune_timestep ->
        {"np": (B, np_channels, H, W) logits, "hv": (B, 2, H, W), "nc": (B, n_classes, H, W) logits or None}."""
        x, t, _, fm = self._check_inputs(x, self.config.finetune_timestep, None, fm)
        features, _, _ = self._features(x, t, None, fm)
        return self.heads(features)

    def _features(
        self, x: Tensor, t: Tensor, mask: Tensor | None, fm: FMFeatures | None
    ) -> tuple[list[Tensor], Tensor, dict[int, Tensor | None]]:
        batch, _, height, width = x.shape
        cond, grid = self.conditioning(t, fm)
        grids = {s: None if grid is None else grid_at(grid, height // s, width // s) for s in _GRID_STRIDES}

        if mask is None:
            network_input = torch.cat([x, x.new_zeros(batch, 1, height, width)], dim=1)
            context, keeps = network_input, [None] * 4
        else:
            hidden = mask.bool()
            network_input = torch.cat([x, hidden.to(x.dtype)], dim=1)
            context = torch.cat([x.masked_fill(hidden, 0.0), hidden.to(x.dtype)], dim=1)
            visible = (~hidden).to(x.dtype)
            keeps = [F.max_pool2d(visible, kernel_size=s, stride=s) for s in (4, 8, 16, 32)]

        skips = []
        h = _keep(self.stem(context), keeps[0])
        for i, stage in enumerate(self.stages):
            if i > 0:
                h = _keep(self.downsamples[i - 1](h, keeps[i - 1]), keeps[i])
            for block in stage:
                h = _keep(block(h, cond, grids[4 * 2**i]), keeps[i])
            skips.append(h)

        d16 = self.decoder[0](skips[3], skips[2], cond, grids[16])
        d8 = self.decoder[1](d16, skips[1], cond, grids[8])
        d4 = self.decoder[2](d8, skips[0] + self.input_skip_quarter(network_input), cond, grids[4])
        d1 = self.decoder[3](d4, self.input_skip_full(network_input), cond, grids[1])
        return [d1, d4, d8, d16], cond, grids

    def _check_inputs(
        self, x: Tensor, t: Tensor | float, mask: Tensor | None, fm: FMFeatures | None
    ) -> tuple[Tensor, Tensor, Tensor | None, FMFeatures | None]:
        channels = self.config.in_channels
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise CmdfedError(
                f"expected an image batch of shape (B, {channels}, H, W), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        batch, got_channels, height, width = x.shape
        if got_channels != channels:
            raise CmdfedError(
                f"expected {channels} image channels, got {got_channels} (input shape {tuple(x.shape)}); "
                f"pass the image only, the mask goes in the mask argument"
            )
        if height == 0 or width == 0 or height % STRIDE or width % STRIDE:
            raise CmdfedError(
                f"image sides must be positive multiples of {STRIDE}, got {height}x{width}; crop or pad the tile"
            )
        parameter_dtype = self.stem[0].weight.dtype
        if not x.is_floating_point() or (x.dtype != parameter_dtype and not torch.is_autocast_enabled(x.device.type)):
            raise CmdfedError(
                f"expected a {parameter_dtype} image scaled to [-1, 1], got {x.dtype}; "
                f"convert with images.float() / 127.5 - 1 for uint8 tiles"
            )
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (batch, 1, height, width)):
            raise CmdfedError(
                f"mask must have shape {(batch, 1, height, width)} (nonzero = hidden), got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise CmdfedError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        return x, t, mask, self._check_fm(fm, batch)

    def _check_fm(self, fm: FMFeatures | None, batch: int) -> FMFeatures | None:
        dim = self.config.fm_dim
        if dim == 0:
            if fm is not None:
                raise CmdfedError("this model has no FM conditioning (fm_kind none) but fm features were passed")
            return None
        if fm is None:
            raise CmdfedError(
                f"this model is conditioned on {self.config.fm_kind} features: "
                f"pass fm=encoder(images, mask) (feature_dim {dim})"
            )
        shapes = (tuple(fm.cls.shape), tuple(fm.patch_mean.shape), tuple(fm.patch_grid.shape[:2]))
        if shapes != ((batch, dim),) * 3 or fm.patch_grid.ndim != 4:
            raise CmdfedError(
                f"fm features must be cls/patch_mean (B={batch}, {dim}) and patch_grid "
                f"({batch}, {dim}, h, w); got {shapes[0]}, {shapes[1]}, {tuple(fm.patch_grid.shape)}"
            )
        dtype = self.stem[0].weight.dtype
        return FMFeatures(cls=fm.cls.to(dtype), patch_mean=fm.patch_mean.to(dtype), patch_grid=fm.patch_grid.to(dtype))

    # Parameter groups: what federated rounds send and what fine-tuning freezes.

    @staticmethod
    def group_of(name: str) -> str:
        """'heads' (task heads), 'modulation' (conditioning embedders + every adaLN layer) or 'backbone'."""
        if name.startswith("heads."):
            return "heads"
        if name.startswith("conditioning.") or ".modulation." in name:
            return "modulation"
        return "backbone"

    def parameter_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {group: [] for group in PARAMETER_GROUPS}
        for name, _ in self.named_parameters():
            groups[self.group_of(name)].append(name)
        return groups

    def state_dict_for(self, groups: Iterable[str]) -> dict[str, Tensor]:
        """The state-dict entries of the named groups (detached tensors sharing storage)."""
        wanted = _check_groups(groups)
        return {k: v for k, v in self.state_dict().items() if self.group_of(k) in wanted}

    def load_partial_state_dict(self, state_dict: dict[str, Tensor], groups: Iterable[str]) -> None:
        """Overwrite exactly the named groups; the rest of the model is untouched."""
        wanted = _check_groups(groups)
        current = {k: v for k, v in self.state_dict().items() if self.group_of(k) in wanted}
        mismatch = state_dict_mismatch(current, state_dict)
        if mismatch:
            raise CmdfedError(
                f"state dict does not match groups {sorted(wanted)} of this model: {mismatch}; "
                "was it saved from the same config?"
            )
        with torch.no_grad():
            for key, tensor in current.items():
                tensor.copy_(state_dict[key])

    def freeze(self, groups: Iterable[str]) -> None:
        """requires_grad=False for the named groups; others keep their setting."""
        self._set_trainable(groups, False)

    def unfreeze(self, groups: Iterable[str]) -> None:
        self._set_trainable(groups, True)

    def _set_trainable(self, groups: Iterable[str], trainable: bool) -> None:
        wanted = _check_groups(groups)
        for name, parameter in self.named_parameters():
            if self.group_of(name) in wanted:
                parameter.requires_grad_(trainable)


class SegmentationGraph(nn.Module):
    """``model.segment`` with tensor inputs and a tuple output, for torch.onnx.export / TensorRT.

    Inputs: image, and the three FM tensors when the model is FM-conditioned.
    Outputs: (np, hv) or (np, hv, nc).
    """

    def __init__(self, model: ConvNeXtUNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        image: Tensor,
        fm_cls: Tensor | None = None,
        fm_patch_mean: Tensor | None = None,
        fm_patch_grid: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        fm = None if fm_cls is None else FMFeatures(fm_cls, fm_patch_mean, fm_patch_grid)
        outputs = self.model.segment(image, fm)
        return tuple(outputs[k] for k in ("np", "hv", "nc") if outputs[k] is not None)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _keep(x: Tensor, keep: Tensor | None) -> Tensor:
    return x if keep is None else x * keep


def _check_groups(groups: Iterable[str]) -> set[str]:
    if isinstance(groups, str):
        groups = [groups]
    wanted = set(groups)
    unknown = sorted(wanted - set(PARAMETER_GROUPS))
    if unknown:
        raise CmdfedError(f"unknown parameter groups {unknown}; choose from {', '.join(PARAMETER_GROUPS)}")
    return wanted


def build_model(config: ModelConfig) -> ConvNeXtUNet:
    """A freshly initialised CMD model for ``config``."""
    return ConvNeXtUNet(config)
