"""The optimisation loop both training phases share, as a small ``Trainer`` object.

Recipe (each a ``TrainConfig`` value): AdamW (decoupled weight decay, the ConvNeXt/DiT
default) with no decay on norms, biases and LayerScale gammas; linear warm-up then cosine
decay to ``min_lr_ratio`` of the peak; gradient-norm clipping; optional EMA of the weights
(``torch.optim.swa_utils``, as DiT keeps one for sampling); bf16 autocast where the
hardware has native bf16 (``precision``, see ``device.py``).

Determinism and exact resume. Each step reseeds torch's global RNG with a function of
``(seed, step)`` and draws that step's batch from ``StepBatchSampler``; masks, timesteps,
noise and drop-path therefore depend only on the seed and the step number. Resuming from a
checkpoint restores the weights, optimizer, scheduler and step, and the run continues with
the very numbers it would have drawn without the interruption (tested bit for bit on CPU).

A non-finite loss stops training: nothing is stepped with it, the last checkpoint written
stays the latest, and the error names the step.

The same object runs a federated round: the Flower client builds a ``Trainer`` on the
global weights and calls :meth:`Trainer.run` for the round's local steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from cmdfed.errors import CmdfedError
from cmdfed.model.config import ConfigBase, require
from cmdfed.train.device import PRECISIONS, autocast, memory_format

LossFn = Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Optimisation settings of one training phase."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables the EMA copy
    seed: int = 0
    num_workers: int = 0
    augment: bool = True  # flips, 90-degree rotations and stain jitter (cmdfed.data.augment)
    scale_jitter: float = 0.0  # with augment: zoom by up to 1 + this (0 = none)
    blur_sigma: float = 0.0  # with augment: Gaussian blur of up to this many pixels (0 = none)
    checkpoint_every: int = 500
    sample_every: int = 500  # pretraining: write an inpainting grid every N steps (0 = never)
    keep_checkpoints: int = 3
    precision: str = "auto"  # auto | bf16 | fp32; auto = bf16 where the device computes it natively

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "num_workers",
            "sample_every",
            "weight_decay",
            "grad_clip",
            "scale_jitter",
            "blur_sigma",
        ):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        require(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    def augmentation(self) -> dict[str, bool | float]:
        """The ``SiteDataset`` augmentation settings of this phase."""
        return {"augment": self.augment, "scale_jitter": self.scale_jitter, "blur_sigma": self.blur_sigma}


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: linear from 1/warmup to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".gamma")


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    layout = memory_format(device) if tensor.ndim == 4 else torch.preserve_format
    return tensor.to(device, non_blocking=True, memory_format=layout)


class NonFiniteLoss(CmdfedError):
    def __init__(self, step: int, loss: float):
        super().__init__(
            f"the loss became {loss} at step {step}; training stopped and the last checkpoint is kept. "
            "Lower --lr or check the data"
        )
        self.step = step


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    metrics: dict[str, float]
    seconds: float


class Trainer:
    """Optimises the model's trainable parameters with ``loss_fn`` over a batch stream."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, config: TrainConfig, device: torch.device):
        self.model, self.loss_fn, self.config, self.device = model, loss_fn, config, device
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise CmdfedError("no trainable parameters: every parameter group is frozen")
        self.parameters = [p for _, p in named]
        groups = [
            {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": config.weight_decay},
            {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, config.steps, config.warmup_steps, config.min_lr_ratio),
        )
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
            if config.ema_decay > 0
            else None
        )
        self.step = 0

    # -- running -----------------------------------------------------------------------

    def seed_step(self, step: int) -> None:
        torch.manual_seed(self.config.seed * 1_000_003 + step)

    def train_step(self, batch: dict[str, Tensor]) -> StepResult:
        start = time.perf_counter()
        self.seed_step(self.step)
        self.model.train()
        batch = {k: _to_device(v, self.device) for k, v in batch.items()}
        with autocast(self.device, self.config.precision):
            loss, metrics = self.loss_fn(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(self.step, value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.parameters, self.config.grad_clip))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return StepResult(self.step, value, lr, metrics, time.perf_counter() - start)

    def run(self, batches: Iterable[dict[str, Tensor]], steps: int) -> Iterator[StepResult]:
        """Take ``steps`` optimisation steps from ``batches``; yields after each one."""
        iterator = iter(batches)
        for _ in range(steps):
            try:
                batch = next(iterator)
            except StopIteration:
                raise CmdfedError(f"the batch stream ended after step {self.step}") from None
            yield self.train_step(batch)

    # -- state -------------------------------------------------------------------------

    def ema_state_dict(self) -> dict[str, Tensor] | None:
        return None if self.ema is None else self.ema.module.state_dict()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "ema_n_averaged": None if self.ema is None else self.ema.n_averaged,
        }

    def load_state_dict(self, state: dict, ema_weights: dict[str, Tensor] | None = None) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if self.ema is not None:
            if ema_weights is None:
                raise CmdfedError("the run uses an EMA but the checkpoint has none; resume with ema_decay 0")
            self.ema.module.load_state_dict(ema_weights)
            self.ema.n_averaged.fill_(int(state["ema_n_averaged"] or 0))
