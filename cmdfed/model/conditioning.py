"""Conditioning of the U-Net on the timestep and on frozen foundation-model features.

Design (the CMD paper gives the mechanism, adaptive normalisation, not the sizes):

* One conditioning vector ``c`` of ``cond_dim`` channels: a DiT timestep embedding
  (sinusoidal features, then a 2-layer MLP) plus, when a foundation model (FM) is used,
  a projection of its summary vector (the CLS token, or CLS concatenated with the mean
  patch token; Virchow2's authors recommend the latter as the tile embedding). The FM
  vector is layer-normalised before its projection because FMs differ in output scale
  by an order of magnitude and the projection should start equally small for all.
* Optionally the FM patch-token grid: normalised, 1x1-projected to ``grid_dim``
  channels once, then bilinearly resized to each U-Net resolution, where every block
  turns it into per-pixel scale/shift. This is spatial conditioning: which tissue lies
  where, at the FM's 14-16 px patch resolution.
* Every block (and the final layer) owns an ``AdaptiveModulation``: ``c`` -> per-channel
  scale, shift and gate, plus grid -> per-pixel scale and shift. All of its layers are
  zero-initialised (adaLN-Zero), and the gate enters as ``1 + gate``. So an untrained
  modulation is exactly the identity and the block computes what the unconditioned
  ConvNeXt block computes. DiT instead multiplies by ``gate`` itself, which makes whole
  blocks vanish at init; here LayerScale already keeps residual branches near zero at
  init, and ``1 + gate`` means fresh modulation layers can be attached to, or reset on,
  a trained backbone without changing what it computes (federated sites may train only
  modulation and heads).
* The rank of every block's modulation is ``cond_dim``. It is the dominant parameter
  cost of conditioning (3 x cond_dim per channel per block), and it is what must stay
  small for "heads + modulation <= 5% of the model" in frozen-backbone fine-tuning; the
  base preset uses 32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmdfed.model.encoders import FMFeatures
from cmdfed.model.layers import LayerNorm2d


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> vectors: sinusoidal features, then an MLP (as DiT)."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoidal(self, t: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        frequencies = torch.exp(-math.log(self.max_period) * exponents)
        angles = t.float()[:, None] * frequencies[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoidal(t).to(self.mlp[0].weight.dtype))


class FMVectorEmbedder(nn.Module):
    """FM summary vector (CLS, or CLS || mean patch token) -> conditioning space."""

    def __init__(self, fm_dim: int, cond_dim: int, use_patch_mean: bool) -> None:
        super().__init__()
        self.use_patch_mean = use_patch_mean
        in_dim = fm_dim * (2 if use_patch_mean else 1)
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, fm: FMFeatures) -> Tensor:
        vector = torch.cat([fm.cls, fm.patch_mean], dim=-1) if self.use_patch_mean else fm.cls
        return self.mlp(self.norm(vector))


class PatchGridEmbedder(nn.Module):
    """FM patch-token grid (B, D, h, w) -> (B, grid_dim, h, w), resized later per resolution."""

    def __init__(self, fm_dim: int, grid_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(fm_dim)
        self.proj = nn.Conv2d(fm_dim, grid_dim, kernel_size=1)

    def forward(self, patch_grid: Tensor) -> Tensor:
        return self.proj(self.norm(patch_grid))


class Conditioning(nn.Module):
    """All conditioning inputs -> the vector ``c`` and the projected FM grid (or None)."""

    def __init__(self, cond_dim: int, fm_dim: int, fm_vector: str, grid_dim: int) -> None:
        super().__init__()
        self.timestep = TimestepEmbedder(cond_dim)
        self.fm_vector = (
            FMVectorEmbedder(fm_dim, cond_dim, use_patch_mean=fm_vector == "cls_mean")
            if fm_dim > 0 and fm_vector != "none"
            else None
        )
        self.patch_grid = PatchGridEmbedder(fm_dim, grid_dim) if fm_dim > 0 and grid_dim > 0 else None

    def forward(self, t: Tensor, fm: FMFeatures | None) -> tuple[Tensor, Tensor | None]:
        cond = self.timestep(t)
        if self.fm_vector is not None and fm is not None:
            cond = cond + self.fm_vector(fm)
        grid = self.patch_grid(fm.patch_grid) if self.patch_grid is not None and fm is not None else None
        return cond, grid


def grid_at(grid: Tensor, height: int, width: int) -> Tensor:
    """The projected FM grid bilinearly resized to (height, width), channels-last for the blocks."""
    resized = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class AdaptiveModulation(nn.Module):
    """One block's adaLN: ``c`` (and the grid) -> scale, shift and, optionally, gate.

    Outputs are channels-last and broadcast against (B, H, W, dim). Zero-initialised by
    ``ConvNeXtUNet.initialize_weights``, so at init scale = shift = gate = 0 exactly.
    """

    def __init__(self, dim: int, cond_dim: int, grid_dim: int, with_gate: bool = True) -> None:
        super().__init__()
        self.chunks = 3 if with_gate else 2
        self.vector = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, self.chunks * dim))
        self.grid = nn.Linear(grid_dim, 2 * dim) if grid_dim > 0 else None

    def forward(self, cond: Tensor, grid: Tensor | None) -> tuple[Tensor, ...]:
        scale, shift, *gate = self.vector(cond)[:, None, None, :].chunk(self.chunks, dim=-1)
        if self.grid is not None and grid is not None:
            grid_scale, grid_shift = self.grid(grid).chunk(2, dim=-1)
            scale = scale + grid_scale
            shift = shift + grid_shift
        return (scale, shift, *gate)


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return x * (1 + scale) + shift
