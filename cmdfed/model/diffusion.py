"""Masked diffusion in pixel space: masks, noise schedule, loss and a DDIM inpainting sampler.

Pre-training step (``MaskedDiffusion.training_loss``):

1. Hide a random set of square blocks (``mask_block_size`` px, aligned to a grid of that
   size so every U-Net cell is either wholly hidden or wholly visible). The number of
   hidden blocks per image is ``floor(ratio * cells + U)``, ``U ~ U[0, 1)``, so its
   expectation is exactly ``ratio * cells`` even when that is not an integer; it is
   clipped to leave at least one hidden and (with >= 2 cells) one visible block.
2. Sample t uniformly in [0, T) and noise the hidden pixels with the cosine schedule;
   visible pixels stay clean. The network input is the mixture (x_t where hidden, x0
   where visible), the mask and t; the FM sees the image with hidden pixels replaced by
   its mean colour (``encoder(images, mask)``), so it cannot describe hidden content.
3. Loss: mean squared error over hidden pixels + ``visible_loss_weight`` (0.1) x mean
   squared error over visible pixels, each averaged over its own pixels so the balance
   does not drift with the mask ratio. The visible term keeps the output layer an
   image model everywhere (the DDIM sampler and the inpainting grid read it), while its
   small weight keeps the easy copy task from dominating.

Targets. The network can always be read as predicting x0 from the mixture, treating the
mixture as x_t. At hidden pixels that is the usual target; at visible pixels x0 is the
input itself and the matching "noise" is eps~ = x0 (1 - sqrt(a)) / sqrt(1 - a), the eps
for which the mixture is exactly x_t. Using eps~ there makes the eps and v targets
consistent with the same reading, so one conversion (``split``) serves training and
sampling for every parametrisation; with x0-prediction (default) the visible target is
simply the clean pixel.

Timesteps are integers 0..T-1 and ``alphas_cumprod[t]`` is abar_{t+1} of the
1-indexed DDPM notation (so t = 0 is already slightly noisy), as in improved-diffusion.

Images are float tensors in [-1, 1] throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cmdfed.errors import CmdfedError
from cmdfed.model.config import DiffusionConfig
from cmdfed.model.encoders import FMFeatures


def cosine_alphas_cumprod(timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """abar_t of Nichol & Dhariwal's cosine schedule (float64), betas clipped at ``max_beta``."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


@dataclass
class DiffusionLoss:
    loss: Tensor  # what to backpropagate
    masked_mse: Tensor  # detached, for logging
    visible_mse: Tensor  # detached, for logging


def masked_diffusion_loss(prediction: Tensor, target: Tensor, mask: Tensor, visible_weight: float) -> DiffusionLoss:
    """MSE over hidden pixels + ``visible_weight`` x MSE over visible pixels (mask: nonzero = hidden)."""
    error = (prediction - target).float().pow(2).mean(dim=1, keepdim=True)
    hidden = mask.bool().to(error.dtype)
    visible = 1 - hidden
    masked_mse = (error * hidden).sum() / hidden.sum().clamp(min=1)
    visible_mse = (error * visible).sum() / visible.sum().clamp(min=1)
    return DiffusionLoss(masked_mse + visible_weight * visible_mse, masked_mse.detach(), visible_mse.detach())


class MaskedDiffusion:
    """Schedule and procedures of masked pixel-space diffusion for one ``DiffusionConfig``."""

    def __init__(self, config: DiffusionConfig | None = None) -> None:
        self.config = config or DiffusionConfig()
        self.alphas_cumprod = cosine_alphas_cumprod(self.config.timesteps, self.config.cosine_offset)

    # Schedule and parametrisation conversions.

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) shaped (B, 1, 1, 1) like ``like``."""
        abar = self.alphas_cumprod[t.detach().long().cpu()]
        alpha = abar.sqrt().view(-1, 1, 1, 1).to(like.device, like.dtype)
        sigma = (1 - abar).sqrt().view(-1, 1, 1, 1).to(like.device, like.dtype)
        return alpha, sigma

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output for clean ``x0`` noised with ``noise`` at ``t``."""
        if self.config.prediction == "x0":
            return x0
        if self.config.prediction == "eps":
            return noise
        alpha, sigma = self.coefficients(t, x0)
        return alpha * noise - sigma * x0

    def split(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        """Network output at (x_t, t) -> (x0, eps) estimates, whatever the parametrisation."""
        alpha, sigma = self.coefficients(t, x_t)
        if self.config.prediction == "x0":
            return prediction, (x_t - alpha * prediction) / sigma
        if self.config.prediction == "eps":
            return (x_t - sigma * prediction) / alpha, prediction
        return alpha * x_t - sigma * prediction, sigma * x_t + alpha * prediction

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        alpha, sigma = self.coefficients(t, x_t)
        return (x_t - alpha * x0) / sigma

    # Sampling the training inputs.

    def sample_mask(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """(B, 1, H, W) float mask of aligned square blocks, 1 = hidden."""
        block = self.config.mask_block_size
        if height % block or width % block:
            raise CmdfedError(f"image sides {height}x{width} must be multiples of mask_block_size {block}")
        rows, cols = height // block, width // block
        cells = rows * cols
        jitter = torch.rand(batch, generator=generator, device=_generator_device(generator))
        low, high = self.config.mask_ratio_min or self.config.mask_ratio, self.config.mask_ratio
        if low < high:  # a ratio per tile; the fixed-ratio draw stays as it was (same seeds, same masks)
            ratio = low + (high - low) * torch.rand(batch, generator=generator, device=_generator_device(generator))
        else:
            ratio = torch.full((batch,), high, device=_generator_device(generator))
        counts = torch.floor(ratio * cells + jitter).clamp(1, max(cells - 1, 1))
        scores = torch.rand(batch, cells, generator=generator, device=_generator_device(generator))
        ranks = scores.argsort(dim=1).argsort(dim=1)
        hidden = (ranks < counts[:, None]).float().view(batch, 1, rows, cols)
        return hidden.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3).to(device)

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        t = torch.randint(0, self.config.timesteps, (batch,), generator=generator, device=_generator_device(generator))
        return t.to(device)

    def training_loss(
        self,
        model: nn.Module,
        images: Tensor,
        encoder: nn.Module | None = None,
        *,
        mask: Tensor | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DiffusionLoss:
        """One pre-training loss on clean ``images``; mask, t and noise are sampled unless given."""
        batch, _, height, width = images.shape
        if mask is None:
            mask = self.sample_mask(batch, height, width, generator, images.device)
        if t is None:
            t = self.sample_timesteps(batch, generator, images.device)
        if noise is None:
            noise = _randn(images, generator)
        mixture, target = self.training_pair(images, mask, t, noise)
        prediction = model(mixture, t, mask, _fm(encoder, images, mask)).prediction
        return masked_diffusion_loss(prediction, target, mask, self.config.visible_loss_weight)

    def training_pair(self, images: Tensor, mask: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(network input, regression target): the mixture (x_t where hidden, clean where visible)
        and the parametrisation's target, with eps~ at visible pixels (module docstring)."""
        hidden = mask.bool()
        mixture = torch.where(hidden, self.q_sample(images, t, noise), images)
        alpha, sigma = self.coefficients(t, images)
        effective_noise = torch.where(hidden, noise, images * (1 - alpha) / sigma)
        return mixture, self.target(images, effective_noise, t)

    # Sampling.

    def sampling_timesteps(self, steps: int | None = None) -> list[int]:
        """Evenly spaced from T-1 down to 0, both ends included (the first step is pure noise)."""
        steps = steps or self.config.sampling_steps
        grid = np.linspace(self.config.timesteps - 1, 0, steps).round().astype(int)
        return list(dict.fromkeys(grid.tolist()))

    @torch.no_grad()
    def inpaint(
        self,
        model: nn.Module,
        images: Tensor,
        mask: Tensor,
        encoder: nn.Module | None = None,
        generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> Tensor:
        """DDIM inpainting: hidden pixels are generated, visible pixels are kept exactly at every step."""
        was_training = model.training
        model.eval()
        try:
            hidden = mask.bool()
            fm = _fm(encoder, images, mask)
            timesteps = self.sampling_timesteps(steps)
            batch = images.shape[0]
            t = torch.full((batch,), timesteps[0], device=images.device, dtype=torch.long)
            _, sigma = self.coefficients(t, images)
            x = torch.where(hidden, sigma * _randn(images, generator), images)
            for index, step in enumerate(timesteps):
                t = torch.full((batch,), step, device=images.device, dtype=torch.long)
                x0, eps = self.split(x, t, model(x, t, mask, fm).prediction)
                if self.config.clip_x0:
                    x0 = x0.clamp(-1, 1)
                    eps = self.eps_from_x0(x, t, x0)
                if index == len(timesteps) - 1:
                    x = x0
                else:
                    x = self._ddim_step(x0, eps, t, timesteps[index + 1], generator)
                x = torch.where(hidden, x, images)
            return x
        finally:
            model.train(was_training)

    def _ddim_step(
        self, x0: Tensor, eps: Tensor, t: Tensor, next_step: int, generator: torch.Generator | None
    ) -> Tensor:
        abar = self.alphas_cumprod[t.cpu()].view(-1, 1, 1, 1)
        abar_next = self.alphas_cumprod[next_step].expand_as(abar)
        eta_sigma = self.config.sampling_eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)).sqrt()
        direction = (1 - abar_next - eta_sigma**2).clamp(min=0).sqrt()
        to = {"device": x0.device, "dtype": x0.dtype}
        x = abar_next.sqrt().to(**to) * x0 + direction.to(**to) * eps
        if self.config.sampling_eta > 0:
            x = x + eta_sigma.to(**to) * _randn(x0, generator)
        return x


def make_inpainting_grid(
    model: nn.Module,
    images: Tensor,
    diffusion: MaskedDiffusion,
    *,
    encoder: nn.Module | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    gap: int = 2,
) -> np.ndarray:
    """uint8 (H', W', 3) image: rows original | masked (hidden = grey) | inpainted, one column per image."""
    batch, channels, height, width = images.shape
    if channels not in (1, 3):
        raise CmdfedError(f"inpainting grids need 1- or 3-channel images, got {channels}")
    if mask is None:
        mask = diffusion.sample_mask(batch, height, width, generator, images.device)
    inpainted = diffusion.inpaint(model, images, mask, encoder, generator)
    masked = torch.where(mask.bool(), torch.zeros_like(images), images)
    canvas = np.full((3 * height + 2 * gap, batch * width + (batch - 1) * gap, 3), 255, dtype=np.uint8)
    for row, tiles in enumerate((images, masked, inpainted)):
        pixels = ((tiles.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        pixels = pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        for column in range(batch):
            top, left = row * (height + gap), column * (width + gap)
            canvas[top : top + height, left : left + width] = pixels[column]
    return canvas


def _fm(encoder: nn.Module | None, images: Tensor, mask: Tensor) -> FMFeatures | None:
    return None if encoder is None else encoder(images, mask)


def _generator_device(generator: torch.Generator | None) -> torch.device | None:
    return None if generator is None else generator.device


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    noise = torch.randn(
        like.shape, generator=generator, device=_generator_device(generator) or like.device, dtype=like.dtype
    )
    return noise.to(like.device)
