"""DP-SGD for a local round: per-tile gradients, clipped and noised by Opacus.

How the pieces fit the ordinary ``Trainer`` (``cmdfed.train.loop``):

* **Per-sample gradients.** Opacus's ``GradSampleModule`` hooks every trainable layer
  and computes each tile's gradient from the layer's input and output gradient. The model
  is checked with ``ModuleValidator`` first (it has no BatchNorm or other cross-sample
  layers; the validator is clean). Conv2d (depthwise too), Linear and LayerNorm use
  Opacus's own samplers; ``LayerScale`` gets one here (it is its own module for this
  reason); anything else falls back to Opacus's functorch sampler. On the tiny model on a
  CPU these hook samplers ran a step several times faster than ``force_functorch``.
* **Per-sample losses.** A tile's gradient is only its own when the loss is a mean of
  per-tile losses. The phases' ordinary losses normalise over the whole batch (hidden
  pixels of all tiles, Dice over the batch), which would let one tile change another's
  gradient and void the clipping bound, so private rounds use the per-tile versions below:
  one batched forward pass, the loss of each tile computed on its own slice, averaged.
* **Clipping and noise.** ``DPOptimizer`` wraps the Trainer's AdamW: each step clips every
  tile's gradient to ``max_grad_norm``, sums, adds Gaussian noise of std
  ``noise_multiplier * max_grad_norm`` and divides by the batch size; AdamW then steps on
  that, which is post-processing. The Trainer's own clipping is off in private rounds.
* **Precision.** Private rounds train in the Trainer's precision, bf16 autocast where the CPU
  computes it, as plain rounds do: the per-tile gradients may then be bf16, but they are
  clipped in fp32 (:class:`Fp32ClippingDPOptimizer`), so the clipping bound, on which the
  accounting rests, is exact; the noise is drawn and added in fp32.
* **Secrets.** The Trainer reseeds torch's RNG every step from the round seed, which the
  server can compute; noise drawn from it could be subtracted. The DP noise therefore comes
  from a generator seeded by the operating system's CSPRNG, and private rounds draw their
  batch order and masks from a secret seed too (see ``cmdfed.federation.local``).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from cmdfed.errors import CmdfedError
from cmdfed.inference.segment import to_model_input
from cmdfed.model.diffusion import MaskedDiffusion, masked_diffusion_loss
from cmdfed.model.layers import LayerScale
from cmdfed.model.losses import hovernet_loss
from cmdfed.train.loop import LossFn, Trainer


@register_grad_sampler(LayerScale)
def layer_scale_grad_sample(
    layer: LayerScale, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """``y = x * gamma`` over the last axis: tile n's gradient is sum over positions of x * dy
    (in fp32: under bf16 autocast the input is bf16 and its output gradient fp32)."""
    return {layer.gamma: torch.einsum("n...c,n...c->nc", activations[0].float(), backprops.float())}


def check_private_model(model: nn.Module) -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise CmdfedError(f"the model cannot be trained with per-sample gradients: {'; '.join(map(str, errors))}")


class Fp32ClippingDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer, with every tile's gradient clipped in fp32.

    Under bf16 autocast the samplers give bf16 per-tile gradients, and Opacus would take
    their norms in bf16: a norm rounded down by up to 2**-8 lets a clipped tile's gradient
    reach ``max_grad_norm * (1 + 2**-8)``, past the sensitivity the privacy accounting
    assumes. Cast to fp32 first, the bound holds to fp32's rounding, whatever precision the
    backward pass ran in."""

    def clip_and_accumulate(self) -> None:
        for p in self.params:
            if isinstance(p.grad_sample, list):
                p.grad_sample = [g.float() for g in p.grad_sample]
            elif p.grad_sample is not None:
                p.grad_sample = p.grad_sample.float()
        super().clip_and_accumulate()


@contextlib.contextmanager
def private_trainer(trainer: Trainer, noise_multiplier: float, max_grad_norm: float) -> Iterator[Trainer]:
    """``trainer`` with DP-SGD steps while the block runs; the model is unhooked after."""
    check_private_model(trainer.model)
    if trainer.config.grad_clip:
        raise CmdfedError("a private round clips per tile; its TrainConfig must have grad_clip 0")
    hooked = GradSampleModule(trainer.model, batch_first=True, loss_reduction="mean")
    plain = trainer.optimizer
    trainer.optimizer = Fp32ClippingDPOptimizer(
        plain,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=trainer.config.batch_size,
        generator=secret_generator(trainer.device),
    )
    try:
        yield trainer
    finally:
        trainer.optimizer = plain
        hooked.to_standard_module()  # removes the hooks and per-sample gradients


def secret_generator(device: torch.device) -> torch.Generator:
    """A torch generator no one else can reproduce: seeded from the OS's CSPRNG."""
    return torch.Generator(device=device).manual_seed(secret_seed())


def secret_seed() -> int:
    return secrets.randbits(31)


def per_sample_pretrain_loss(model: nn.Module, diffusion: MaskedDiffusion) -> LossFn:
    """The masked-diffusion loss as a mean of per-tile losses (masks, timesteps, noise as usual)."""

    def loss_fn(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images = to_model_input(batch["image"])
        count, _, height, width = images.shape
        mask = diffusion.sample_mask(count, height, width, None, images.device)
        t = diffusion.sample_timesteps(count, None, images.device)
        mixture, target = diffusion.training_pair(images, mask, t, torch.randn_like(images))
        prediction = model(mixture, t, mask, None).prediction
        weight = diffusion.config.visible_loss_weight
        terms = [
            masked_diffusion_loss(prediction[i : i + 1], target[i : i + 1], mask[i : i + 1], weight)
            for i in range(count)
        ]
        metrics = {
            "masked_mse": float(np.mean([float(x.masked_mse) for x in terms])),
            "visible_mse": float(np.mean([float(x.visible_mse) for x in terms])),
        }
        return torch.stack([x.loss for x in terms]).mean(), metrics

    return loss_fn


def per_sample_finetune_loss(model: nn.Module) -> LossFn:
    """HoVer-Net's loss of each tile on its own (its Dice terms too), averaged over the batch."""

    def loss_fn(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        images = to_model_input(batch["image"])
        outputs = model.segment(images, None)
        totals, sums = [], {}
        for i in range(len(images)):
            tile_outputs = {k: None if v is None else v[i : i + 1] for k, v in outputs.items()}
            total, terms = hovernet_loss(tile_outputs, {k: batch[k][i : i + 1] for k in ("np", "hv", "nc")})
            totals.append(total)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return torch.stack(totals).mean(), {k: v / len(images) for k, v in sums.items()}

    return loss_fn
