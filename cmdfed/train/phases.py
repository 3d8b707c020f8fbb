"""The two CMD training phases as plain functions over site stores.

* ``pretrain``: masked-diffusion pretraining of the whole network (backbone + modulation)
  on every tile of the stores, labelled or not; an inpainting grid every ``sample_every``
  steps shows whether it learns.
* ``finetune``: the pretrained backbone frozen, only the task heads (and optionally the
  adaLN modulation) trained on the labelled tiles, or a reproducible fraction of them.

Both write the same run folder: checkpoints (``checkpoint.py``), ``metrics.jsonl`` (one
JSON line per logged step) and, for pretraining, ``samples/step-NNNNNN.png``. Calling
either again on a run folder that has a checkpoint resumes it exactly (``loop.py``);
the configs must then match the checkpoint's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cmdfed.atomic import atomic_path, write_bytes_atomic
from cmdfed.data.dataset import MultiStoreDataset, SiteDataset, StepBatchSampler
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.inference.segment import to_model_input
from cmdfed.inference.stain import REFERENCE_KEY, source_stains
from cmdfed.model.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from cmdfed.model.config import DiffusionConfig, ModelConfig
from cmdfed.model.diffusion import MaskedDiffusion, make_inpainting_grid
from cmdfed.model.encoders import frozen_encoder
from cmdfed.model.losses import hovernet_loss
from cmdfed.model.unet import build_model, count_parameters
from cmdfed.progress import Progress, report
from cmdfed.train.device import memory_format, select_device
from cmdfed.train.loop import LossFn, StepResult, TrainConfig, Trainer

TRAINABLE_CHOICES = {
    "heads": ("heads",),
    "heads+modulation": ("heads", "modulation"),
    "all": ("backbone", "modulation", "heads"),
}
# Architecture settings that shape no weight fine-tuning loads (its heads start fresh), so it may change them.
SHAPE_FREE_MODEL_SETTINGS = ("finetune_timestep", "drop_path", "head_stride", "head_conv", "head_scales")


@dataclass
class PhaseResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    final_loss: float
    trainable_parameters: int
    total_parameters: int
    images_per_second: float

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def stain_reference(tiles: list[tuple[SiteStore, np.ndarray]]) -> dict | None:
    """The stains of the training tiles (store, indices), which inference re-stains images as
    (``cmdfed.inference.stain``), as a checkpoint records them; None when they hold too little stain."""
    stains = source_stains([image for site, indices in tiles for image in site.stain_sample(indices)])
    return None if stains is None else stains.to_dict()


def training_mpp(resolutions: list[float]) -> float | None:
    """The resolution a run trained at, recorded in its checkpoints (``cmdfed edge export``
    defaults ``--mpp`` to it): the first store's mpp when every store's is within 5 % of it
    (a 0.499 um/px slide and 0.5 um/px tiles are one resolution), None if unknown or they differ."""
    if not resolutions or not all(r and math.isfinite(r) for r in resolutions):
        return None
    first = round(float(resolutions[0]), 4)
    return first if all(abs(r / first - 1) <= 0.05 for r in resolutions) else None


def _existing_run(run_dir: Path) -> dict | None:
    if not (run_dir / "latest").is_file():
        return None
    return load_checkpoint(resolve_checkpoint(run_dir), with_trainer=True).__dict__


# Settings a resumed run may change: they do not change what is trained (the batches are
# fixed by the seed whatever the worker count) and their old values remain in the config.
RESUME_FREE_TRAIN_KEYS = ("num_workers", "keep_checkpoints", "checkpoint_every", "sample_every", "precision")


def _check_resume(config: dict, saved: dict, keys: tuple[str, ...], run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` with settings that would train something else than it began."""
    differs = []
    for key in keys:
        given, before = config.get(key), saved.get(key)
        if key == "train" and isinstance(before, dict):
            # A setting added since the run began had its default value then (each new
            # setting's default must keep the old behaviour for this to hold).
            given, before = (
                {k: v for k, v in d.items() if k not in RESUME_FREE_TRAIN_KEYS}
                for d in (given, {**TrainConfig().to_dict(), **before})
            )
        if key == "model" and isinstance(before, dict):
            before = {**ModelConfig().to_dict(), **before}  # likewise for an architecture setting added since
        if isinstance(given, dict) and isinstance(before, dict):
            differs += [f"{key}.{k}" for k in sorted(set(given) | set(before)) if given.get(k) != before.get(k)]
        elif given != before:
            differs.append(key)
    if differs:
        raise CmdfedError(
            f"{run_dir} holds a run that differs in {', '.join(differs)}; resume with the same settings "
            "or choose a new --out"
        )


def _truncate_log(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines past ``step``: a resumed run logs those steps again."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
        if len(kept) != len(lines):
            write_bytes_atomic(path, "".join(kept).encode())


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def batch_loader(dataset, train: TrainConfig, start_step: int = 0) -> DataLoader:
    """The batches of steps ``start_step .. train.steps - 1``, fixed by ``train.seed``."""
    sampler = StepBatchSampler(len(dataset), train.batch_size, train.seed, start_step, train.steps - start_step)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=train.num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def _log(run_dir: Path, result: StepResult, extra: dict | None = None) -> None:
    record = {
        "step": result.step,
        "loss": result.loss,
        "lr": result.lr,
        "seconds": result.seconds,
        **result.metrics,
        **(extra or {}),
    }
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _saver(run_dir: Path, trainer: Trainer, config: dict) -> Callable[[], Path]:
    """Checkpoint the trainer's model, EMA and optimizer state at its current step."""

    def save() -> Path:
        return save_checkpoint(
            run_dir,
            trainer.step,
            config=config,
            weights=trainer.model.state_dict(),
            ema=trainer.ema_state_dict(),
            trainer=trainer.state_dict(),
            keep_last=trainer.config.keep_checkpoints,
        )

    return save


def _train_phase(
    trainer: Trainer,
    dataset: Dataset,
    run_dir: Path,
    config: dict,
    on_step: Callable[[StepResult], None] | None,
    progress: Progress | None,
    log_every: int = 10,
) -> PhaseResult:
    """Drive the trainer to ``config.steps`` from where it is, logging and checkpointing the
    run (``config`` is what its checkpoints record)."""
    save = _saver(run_dir, trainer, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    loader = batch_loader(dataset, trainer.config, trainer.step)
    total = trainer.config.steps
    last_loss, seconds, images = float("nan"), 0.0, 0
    for result in trainer.run(loader, total - trainer.step):
        last_loss = result.loss
        seconds += result.seconds
        images += trainer.config.batch_size
        if result.step % log_every == 0 or result.step == total:
            _log(run_dir, result)
        if on_step is not None:
            on_step(result)
        if result.step % trainer.config.checkpoint_every == 0 or result.step == total:
            save()
        report(progress, result.step, total, f"step {result.step}/{total} loss {result.loss:.4f}")
    trainable, parameters = count_parameters(trainer.model)
    speed = images / seconds if seconds else 0.0
    return PhaseResult(run_dir, resolve_checkpoint(run_dir), trainer.step, last_loss, trainable, parameters, speed)


def pretrain_loss(model, diffusion: MaskedDiffusion, encoder) -> LossFn:
    """The masked-diffusion loss of ``model`` on a batch, with its masked/visible MSE terms."""

    def loss_fn(batch):
        out = diffusion.training_loss(model, to_model_input(batch["image"]), encoder)
        return out.loss, {"masked_mse": float(out.masked_mse), "visible_mse": float(out.visible_mse)}

    return loss_fn


def finetune_loss(model, encoder) -> LossFn:
    """HoVer-Net's segmentation loss of ``model.segment`` on a batch with targets."""

    def loss_fn(batch):
        images = to_model_input(batch["image"])
        fm = None if encoder is None else encoder(images, None)
        # The losses in fp32 whatever the autocast precision (soft Dice sums over the batch).
        outputs = {k: None if v is None else v.float() for k, v in model.segment(images, fm).items()}
        targets = {"np": batch["np"], "hv": batch["hv"], "nc": batch["nc"]}
        total, terms = hovernet_loss(outputs, targets)
        return total, {k: float(v) for k, v in terms.items()}

    return loss_fn


def training_tiles(site: SiteStore, label_fraction: float, seed: int) -> np.ndarray:
    """The labelled tiles fine-tuning uses: a reproducible ``label_fraction`` of them."""
    if not site.labelled_indices().size:
        raise CmdfedError(
            f"{site.path} has no labelled tiles; fine-tuning needs instance labels (import a labelled dataset)"
        )
    return site.labelled_subset(label_fraction, seed)


def finetune_model_config(base: ModelConfig, n_classes: int, trainable: str) -> ModelConfig:
    """``base`` with an NC head for ``n_classes`` and no drop-path unless trained end to end."""
    if trainable not in TRAINABLE_CHOICES:
        raise CmdfedError(f"trainable must be one of {', '.join(TRAINABLE_CHOICES)}, got {trainable!r}")
    # Drop-path only adds noise to the inputs of heads over a frozen backbone.
    drop_path = base.drop_path if trainable == "all" else 0.0
    return ModelConfig.from_dict({**base.to_dict(), "n_classes": n_classes, "drop_path": drop_path})


def pretrain(
    stores: list[str | Path],
    run_dir: str | Path,
    *,
    model_config: ModelConfig,
    diffusion_config: DiffusionConfig = DiffusionConfig(),
    train_config: TrainConfig = TrainConfig(),
    device: str = "auto",
    fm_weights: str | Path | None = None,
    progress: Progress | None = None,
) -> PhaseResult:
    """Masked-diffusion pretraining on all tiles of ``stores`` (see module docstring)."""
    run_dir = Path(run_dir)
    dev = select_device(device)
    sites = [SiteStore.open(s) for s in stores]
    datasets = [SiteDataset(s, **train_config.augmentation()) for s in stores]
    dataset = MultiStoreDataset(datasets)
    config = {
        "phase": "pretrain",
        "model": model_config.to_dict(),
        "diffusion": diffusion_config.to_dict(),
        "train": train_config.to_dict(),
        "stores": [site.name for site in sites],
        "mpp": training_mpp([site.mpp for site in sites]),
        "class_names": ["background", "nucleus"],
        REFERENCE_KEY: stain_reference([(site, np.arange(len(site))) for site in sites]),
    }
    torch.manual_seed(train_config.seed)  # the initial weights are part of the run's seed
    model = build_model(model_config).to(dev, memory_format=memory_format(dev))
    encoder = frozen_encoder(model_config.fm_kind, fm_weights, dev)
    diffusion = MaskedDiffusion(diffusion_config)
    trainer = Trainer(model, pretrain_loss(model, diffusion, encoder), train_config, dev)
    saved = _existing_run(run_dir)
    if saved is not None:
        _check_resume(config, saved["config"], ("model", "diffusion", "train", "stores"), run_dir)
        model.load_state_dict(saved["weights"])
        trainer.load_state_dict(saved["trainer"], saved["ema"])
        _truncate_log(run_dir, trainer.step)

    # Preview tiles spread over the whole training set (the first tiles of a slide are often its edge).
    spread = sorted({int(i) for i in torch.linspace(0, len(dataset) - 1, min(4, len(dataset)))})
    preview = torch.stack([dataset[i]["image"] for i in spread])
    preview_mask = diffusion.sample_mask(len(preview), *preview.shape[-2:], torch.Generator().manual_seed(0))

    def write_grid(step: int) -> None:
        grid_model = model if trainer.ema is None else trainer.ema.module
        grid = make_inpainting_grid(
            grid_model,
            to_model_input(preview).to(dev),
            diffusion,
            encoder=encoder,
            mask=preview_mask.to(dev),
            generator=torch.Generator().manual_seed(step),
        )
        target = run_dir / "samples" / f"step-{step:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")

    def on_step(result: StepResult) -> None:
        every = train_config.sample_every
        if every and (result.step % every == 0 or result.step == train_config.steps):
            write_grid(result.step)

    return _train_phase(trainer, dataset, run_dir, config, on_step, progress)


def finetune(
    store: str | Path,
    run_dir: str | Path,
    *,
    init: str | Path | None,
    train_config: TrainConfig = TrainConfig(),
    label_fraction: float = 1.0,
    trainable: str = "heads",
    model_config: ModelConfig | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    device: str = "auto",
    fm_weights: str | Path | None = None,
    progress: Progress | None = None,
) -> PhaseResult:
    """Head fine-tuning on the labelled tiles of ``store``.

    ``init`` is a pretraining run or checkpoint whose backbone and modulation are loaded;
    ``None`` starts from random initialisation (``model_config`` then gives the
    architecture), the baseline the CMD recipe is compared against. ``trainable`` is
    ``heads`` (default), ``heads+modulation`` or ``all`` (end to end). ``model_overrides``
    change settings of the architecture that shape no weight loaded from ``init``
    (``finetune_timestep``, the diffusion step whose modulation the heads read;
    ``drop_path``; the heads' ``head_stride``, ``head_conv`` and ``head_scales``).
    """
    run_dir = Path(run_dir)
    unknown = sorted(set(model_overrides or {}) - set(SHAPE_FREE_MODEL_SETTINGS))
    if unknown:
        raise CmdfedError(
            f"fine-tuning cannot change the model's {', '.join(unknown)}: the weights it starts from fix them; "
            f"it can change {', '.join(SHAPE_FREE_MODEL_SETTINGS)}"
        )
    if trainable not in TRAINABLE_CHOICES:
        raise CmdfedError(f"trainable must be one of {', '.join(TRAINABLE_CHOICES)}, got {trainable!r}")
    dev = select_device(device)
    site = SiteStore.open(store)
    indices = training_tiles(site, label_fraction, train_config.seed)
    n_classes = len(site.class_names) if site.has_types else 0
    if init is not None:
        pretrained = load_checkpoint(init, backbone_only=True)
        base = ModelConfig.from_dict(pretrained.config["model"])
    elif model_config is not None:
        pretrained, base = None, model_config
    else:
        raise CmdfedError("give a pretraining run to start from (--init) or a model preset for random init")
    base = ModelConfig.from_dict({**base.to_dict(), **(model_overrides or {})})
    model_cfg = finetune_model_config(base, n_classes, trainable)
    torch.manual_seed(train_config.seed)
    model = build_model(model_cfg)
    if pretrained is not None:
        # The EMA weights, when pretraining kept them, are its result (its previews show them too).
        source = pretrained.ema if pretrained.ema is not None else pretrained.weights
        weights = {k: v for k, v in source.items() if model.group_of(k) != "heads"}
        model.load_partial_state_dict(weights, ("backbone", "modulation"))
    model.freeze(("backbone", "modulation", "heads"))
    model.unfreeze(TRAINABLE_CHOICES[trainable])
    model.to(dev, memory_format=memory_format(dev))
    encoder = frozen_encoder(model_cfg.fm_kind, fm_weights, dev)

    dataset = SiteDataset(store, indices=indices, targets=True, **train_config.augmentation())
    config = {
        "phase": "finetune",
        "model": model_cfg.to_dict(),
        "train": train_config.to_dict(),
        "label_fraction": label_fraction,
        "trainable": trainable,
        "labelled_tiles": len(indices),
        "init": None if pretrained is None else pretrained.path.parent.name + "/" + pretrained.path.name,
        "stores": [site.name],
        "mpp": training_mpp([site.mpp]),
        "class_names": site.class_names if n_classes else ["background", "nucleus"],
        REFERENCE_KEY: stain_reference([(site, indices)]),
    }

    trainer = Trainer(model, finetune_loss(model, encoder), train_config, dev)
    saved = _existing_run(run_dir)
    if saved is not None:
        _check_resume(
            config, saved["config"], ("model", "train", "label_fraction", "trainable", "init", "stores"), run_dir
        )
        model.load_state_dict(saved["weights"])
        trainer.load_state_dict(saved["trainer"], saved["ema"])
        _truncate_log(run_dir, trainer.step)

    return _train_phase(trainer, dataset, run_dir, config, None, progress)
