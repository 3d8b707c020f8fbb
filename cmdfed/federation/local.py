"""A site's part in a round: train or evaluate the global weights on its own store.

Only the phase's *sent* groups (``FederationConfig.sent_groups``) come in and go out; in
fine-tuning the frozen backbone is passed separately (the site keeps it from the phase's
first round, see ``client.client_app``), so a round's traffic is the heads alone (with
``finetune-trainable = "all"`` nothing is frozen and the whole model travels).

The model's architecture is the run's preset, or the initial checkpoint's when the run
starts from one (``init``); the site cannot read that checkpoint, so the server sends the
architecture with every message and the round functions take it as ``architecture``.

Every random choice of a local round (batches, augmentation, masks, noise) is seeded by
``(run seed, phase, round, site name)``: a round re-run after a crash trains exactly as it
did, and two sites never draw the same stream. The optimiser starts fresh every round with
a constant learning rate (FedAvg's local SGD with AdamW); FedProx adds
``mu/2 * ||w - w_global||^2`` over the trained weights to the loss.

With local differential privacy (``dp-mode = "local"``) a round is DP-SGD
(``cmdfed.privacy``) and spends from the site's ledger; the round then draws its seed
from a secret, because batches, masks and noise the server could recompute would leak
what the noise is meant to hide. Sampling for the accountant: a step takes a fixed-size
batch of ``B`` tiles from a shuffled pass over the ``N`` training tiles, and the ledger
accounts it as Poisson sampling at rate ``q = B / N``. That is the usual approximation
of DP-SGD implementations that shuffle; the RDP bound is proven for Poisson sampling
(each tile independently with probability ``q``), so the epsilon reported is the
standard estimate, not a formal guarantee for shuffled batches.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from cmdfed.data.dataset import SiteDataset
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.run import evaluate_model
from cmdfed.federation.config import PHASES, FederationConfig, check_phase
from cmdfed.inference.segment import LoadedModel, to_model_input
from cmdfed.inference.stain import HEStains
from cmdfed.model.config import DiffusionConfig, ModelConfig
from cmdfed.model.diffusion import MaskedDiffusion
from cmdfed.model.unet import ConvNeXtUNet, build_model
from cmdfed.privacy.accounting import PrivacyLedger, PrivateSteps, noise_for_budget
from cmdfed.train.device import memory_format, select_device
from cmdfed.train.loop import LossFn, TrainConfig, Trainer
from cmdfed.train.phases import batch_loader, finetune_loss, pretrain_loss, training_tiles

Weights = dict[str, Tensor]


class LocalUpdate(NamedTuple):
    """What a site sends back: trained weights of the sent groups, its example count, numbers,
    and its store's resolution (None when the store does not know it): the server records the
    run's training resolution in its round checkpoints when every site's agrees."""

    weights: Weights
    n_examples: int
    metrics: dict[str, float]
    mpp: float | None = None


def store_mpp(site_store: str | Path) -> float | None:
    """A store's resolution in um/px, None when unknown (its metadata holds no mpp)."""
    mpp = SiteStore.open(site_store).mpp
    return float(mpp) if math.isfinite(mpp) and mpp > 0 else None


def round_seed(seed: int, phase: str, round: int, site: str) -> int:
    """The seed of one site's round; a pure function, stable across machines and runs."""
    site_key = zlib.crc32(site.encode())
    state = np.random.SeedSequence([seed, PHASES.index(check_phase(phase)), round, site_key]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def local_pretrain_round(
    global_weights: Weights,
    site_store: str | Path,
    config: FederationConfig,
    round: int,
    site_name: str,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    proximal_mu: float = 0.0,
    ledger: PrivacyLedger | None = None,
    architecture: ModelConfig | None = None,
) -> LocalUpdate:
    """``config.local_steps`` masked-diffusion steps on all tiles of the site's store
    (DP-SGD spending from ``ledger`` when the run uses local DP)."""
    dev = select_device(device)
    model = site_model(config, "pretrain", global_weights, {}, dev, architecture)
    dataset = SiteDataset(site_store, augment=config.augment)
    diffusion = MaskedDiffusion(DiffusionConfig())
    loss_fn = _dpsgd().per_sample_pretrain_loss(model, diffusion) if ledger else pretrain_loss(model, diffusion, None)
    update = _train(model, loss_fn, dataset, config, "pretrain", round, site_name, dev, batch_size, proximal_mu, ledger)
    return update._replace(mpp=store_mpp(site_store))


def local_finetune_round(
    global_weights: Weights,
    frozen_weights: Weights,
    site_store: str | Path,
    config: FederationConfig,
    round: int,
    site_name: str,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    proximal_mu: float = 0.0,
    ledger: PrivacyLedger | None = None,
    architecture: ModelConfig | None = None,
) -> LocalUpdate:
    """``config.local_steps`` fine-tuning steps of the trainable groups (the heads over the
    frozen backbone by default; ``finetune-trainable``), on the run's reproducible
    ``label_fraction`` of the site's labelled tiles (DP-SGD spending from ``ledger`` when
    the run uses local DP)."""
    dev = select_device(device)
    site = open_site(site_store, config)
    model = site_model(config, "finetune", global_weights, frozen_weights, dev, architecture)
    dataset = SiteDataset(
        site_store,
        indices=training_tiles(site, config.label_fraction, config.seed),
        augment=config.augment,
        scale_jitter=config.finetune_scale_jitter,
        blur_sigma=config.finetune_blur_sigma,
        targets=True,
    )
    loss_fn = _dpsgd().per_sample_finetune_loss(model) if ledger else finetune_loss(model, None)
    update = _train(model, loss_fn, dataset, config, "finetune", round, site_name, dev, batch_size, proximal_mu, ledger)
    return update._replace(mpp=store_mpp(site_store))


def open_privacy_ledger(
    config: FederationConfig, site_store: str | Path, work_dir: Path, run_id: str, batch_size: int | None = None
) -> PrivacyLedger:
    """The site's ledger for the run; a new one gets the run's noise multiplier, or the least
    with which all planned rounds of the phases the site can take part in stay within the
    budget at the larger of those phases' sampling rates.

    A site that cannot fine-tune (a store of unlabelled slide tiles, or without the run's
    classes) plans pretraining only: its fine-tuning rounds fail before touching the data
    and spend nothing. Should it later take part after all, the ledger's check before every
    round still keeps it within its budget (it declines once a round would exceed it)."""

    def planned_noise() -> float:
        if config.dp_noise_multiplier:
            return config.dp_noise_multiplier
        phases = planned_phases(site_store, config)  # [(rounds, training tiles)]
        steps = config.local_steps * sum(rounds for rounds, _ in phases)
        smallest = min(tiles for _, tiles in phases)
        return noise_for_budget(
            config.dp_epsilon, config.dp_delta, sample_rate(smallest, batch_size or config.batch_size), steps
        )

    return PrivacyLedger.open(
        work_dir,
        run_id,
        budget_epsilon=config.dp_epsilon,
        delta=config.dp_delta,
        max_grad_norm=config.dp_max_grad_norm,
        noise_multiplier=planned_noise,
    )


def planned_phases(site_store: str | Path, config: FederationConfig) -> list[tuple[int, int]]:
    """(rounds, training tiles) of each phase of the run this site's store can train in."""
    phases, cannot = [], None
    if config.pretrain_rounds:
        phases.append((config.pretrain_rounds, len(SiteStore.open(site_store))))
    if config.finetune_rounds:
        try:
            site = open_site(site_store, config)
            phases.append((config.finetune_rounds, len(training_tiles(site, config.label_fraction, config.seed))))
        except CmdfedError as exc:  # no labels, or other classes: its fine-tuning rounds fail without spending
            cannot = exc
    if not phases:
        raise cannot or CmdfedError("the run has no rounds to plan privacy for")
    return phases


def sample_rate(n_tiles: int, batch_size: int) -> float:
    """The accountant's sampling rate of a step: ``B / N`` (see the module docstring)."""
    return min(1.0, batch_size / n_tiles)


def open_site(
    site_store: str | Path,
    config: FederationConfig,
    *,
    remedy: str = "import the store with the run's classes or start the run without classes",
) -> SiteStore:
    """The site's store, checked against the run's classes (an NC head needs the same types);
    ``remedy``: what the error tells the reader to do about other classes."""
    site = SiteStore.open(site_store)
    if len(config.class_names) > 1 and (not site.has_types or site.class_names != config.class_names):
        have = ", ".join(site.class_names[1:]) if site.has_types else "no nucleus types"
        raise CmdfedError(f"store {site.name} has {have} but the run classifies {config.classes}; {remedy}")
    return site


def site_model(
    config: FederationConfig,
    phase: str,
    sent: Weights,
    frozen: Weights,
    device: torch.device,
    architecture: ModelConfig | None = None,
) -> ConvNeXtUNet:
    """The run's model (``architecture``: the server's, see the module docstring) with the
    phase's sent (and frozen) groups loaded, only the sent ones trainable."""
    torch.manual_seed(config.seed)  # the groups nobody sends (heads in pretraining) start alike everywhere
    model = build_model(config.model_config(phase, architecture))
    model.load_partial_state_dict(sent, config.sent_groups(phase))
    if config.frozen_groups(phase):
        model.load_partial_state_dict(frozen, config.frozen_groups(phase))
    model.freeze(("backbone", "modulation", "heads"))
    model.unfreeze(config.sent_groups(phase))
    if phase == "finetune":
        # The diffusion output layer (and its modulation) is no part of segment(): it gets no gradient, which
        # AdamW skips but DP-SGD refuses (a trainable parameter without per-tile gradients). It still travels,
        # unchanged, with the groups that hold it (`all`, `heads+modulation`), so pretraining can go on from the result.
        model.final_layer.requires_grad_(False)
    return model.to(device, memory_format=memory_format(device))


def _with_proximal_term(loss_fn: LossFn, model: ConvNeXtUNet, mu: float) -> LossFn:
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def loss(batch):
        value, metrics = loss_fn(batch)
        drift = sum((p - anchor).pow(2).sum() for p, anchor in anchors)
        metrics["proximal"] = float(drift.detach())
        return value + 0.5 * mu * drift, metrics

    return loss


def _train(
    model: ConvNeXtUNet,
    loss_fn: LossFn,
    dataset: SiteDataset,
    config: FederationConfig,
    phase: str,
    round: int,
    site_name: str,
    device: torch.device,
    batch_size: int | None,
    proximal_mu: float,
    ledger: PrivacyLedger | None = None,
) -> LocalUpdate:
    if config.dp_mode == "local" and ledger is None:
        raise CmdfedError("the run trains with local differential privacy but this round has no privacy ledger")
    train = TrainConfig(
        steps=config.local_steps,
        batch_size=batch_size or config.batch_size,
        lr=config.lr(phase),
        weight_decay=config.weight_decay,
        warmup_steps=0,
        min_lr_ratio=1.0,
        grad_clip=0.0 if ledger else config.grad_clip,
        seed=_dpsgd().secret_seed() if ledger else round_seed(config.seed, phase, round, site_name),
        augment=config.augment,
        checkpoint_every=config.local_steps,
        sample_every=0,
        precision="auto",  # private rounds too: their per-tile gradients are clipped in fp32 (cmdfed.privacy.dpsgd)
    )
    spending = None
    if ledger is not None:
        spending = PrivateSteps(
            phase, round, ledger.noise_multiplier, sample_rate(len(dataset), train.batch_size), train.steps
        )
        ledger.check(spending)  # BudgetExhausted: the site declines before touching its data
    if proximal_mu > 0:
        loss_fn = _with_proximal_term(loss_fn, model, proximal_mu)
    trainer = Trainer(model, loss_fn, train, device)
    started = time.perf_counter()
    losses, terms = [], {}
    private = (
        _dpsgd().private_trainer(trainer, ledger.noise_multiplier, ledger.max_grad_norm)
        if ledger
        else contextlib.nullcontext(trainer)
    )
    with private:
        for result in trainer.run(batch_loader(dataset, train), train.steps):
            losses.append(result.loss)
            for key, value in result.metrics.items():
                terms.setdefault(key, []).append(value)
    seconds = time.perf_counter() - started
    metrics = {
        "loss": float(np.mean(losses)),
        "last_loss": losses[-1],
        "train_seconds": seconds,
        "images_per_second": train.steps * train.batch_size / seconds,
        **{key: float(np.mean(values)) for key, values in terms.items()},
    }
    if spending is not None:
        metrics.update(privacy_metrics(ledger, ledger.record(spending)))
    sent = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict_for(config.sent_groups(phase)).items()
    }
    return LocalUpdate(sent, len(dataset), metrics)


def _dpsgd():
    """DP-SGD, imported for rounds that use it: Opacus takes about a second to load, paid by
    every message's ClientApp process otherwise (Flower's default isolation)."""
    from cmdfed.privacy import dpsgd

    return dpsgd


def privacy_metrics(ledger: PrivacyLedger, epsilon: float) -> dict[str, float]:
    """What a site reports of its privacy spend (the server records it in telemetry)."""
    return {
        "dp_epsilon": epsilon,
        "dp_delta": ledger.delta,
        "dp_noise_multiplier": ledger.noise_multiplier,
        "dp_max_grad_norm": ledger.max_grad_norm,
        "dp_budget_epsilon": ledger.budget_epsilon,
    }


def shares_data_metrics(config: FederationConfig, share_metrics: bool = False) -> bool:
    """Whether a site sends metrics computed from its tiles: always without local DP; under
    local DP only if its admin opts in (node config ``share-metrics = true``), because its
    losses, loss terms and evaluation scores are un-noised statistics of the private tiles
    that the privacy accountant does not cover."""
    return config.dp_mode != "local" or share_metrics


def shared_metrics(
    metrics: dict[str, float], config: FederationConfig, share_metrics: bool = False
) -> dict[str, float]:
    """What of a round's metrics a site sends (see :func:`shares_data_metrics`); when it keeps
    them, its privacy numbers (``dp_*``) and its training time still go. Example counts travel
    beside these, always."""
    if shares_data_metrics(config, share_metrics):
        return dict(metrics)
    return {k: v for k, v in metrics.items() if k.startswith("dp_") or k == "train_seconds"}


# -- evaluation ------------------------------------------------------------------------


@torch.no_grad()
def evaluate_on_store(
    model: ConvNeXtUNet,
    phase: str,
    site_store: str | Path,
    config: FederationConfig,
    stain_reference: HEStains | None = None,
    **open_options: str,
) -> tuple[int, dict[str, float]]:
    """(tiles, metrics) of a global model on up to ``config.eval_tiles`` tiles of a store
    (``open_options``: :func:`open_site`'s), fine-tuning's stain-normalised to ``stain_reference``
    when the run has one (the init's), as inference will see them.

    Pretraining is scored by its own masked-diffusion loss under fixed masks and noise;
    fine-tuning by nuclei metrics (Dice, AJI, PQ; mPQ with types) on labelled tiles the
    run does not train on when the store has any, else on the training tiles.
    """
    model.eval()
    site = open_site(site_store, config, **open_options)
    device = next(model.parameters()).device
    if check_phase(phase) == "pretrain":
        count = min(config.eval_tiles, len(site))
        images = to_model_input(np.stack([site.image(i) for i in range(count)])).to(device)
        generator = torch.Generator().manual_seed(config.seed)
        diffusion = MaskedDiffusion(DiffusionConfig())
        total = 0.0
        for start in range(0, count, 8):
            chunk = images[start : start + 8]
            total += float(diffusion.training_loss(model, chunk, generator=generator).masked_mse) * len(chunk)
        return count, {"masked_mse": total / count}
    labelled = site.labelled_indices()
    trained = training_tiles(site, config.label_fraction, config.seed)
    held_out = np.setdiff1d(labelled, trained)
    indices = (held_out if held_out.size else trained)[: config.eval_tiles]
    loaded = LoadedModel(
        model, model.config, config.class_names, Path(site.name), device, stain_reference=stain_reference
    )
    summary = evaluate_model(loaded, site_store, indices=indices, batch_size=8)
    keys = ("mean_dice", "mean_aji", "mean_pq") + (("mean_mpq",) if "mean_mpq" in summary else ())
    return len(indices), {key.removeprefix("mean_"): float(summary[key]) for key in keys}


def local_evaluate(
    global_weights: Weights,
    frozen_weights: Weights,
    phase: str,
    site_store: str | Path,
    config: FederationConfig,
    *,
    device: str = "auto",
    architecture: ModelConfig | None = None,
    stain_reference: HEStains | None = None,
) -> tuple[int, dict[str, float]]:
    """A site's evaluation of the global weights of ``phase`` (see :func:`evaluate_on_store`)."""
    model = site_model(config, phase, global_weights, frozen_weights, select_device(device), architecture)
    return evaluate_on_store(model, phase, site_store, config, stain_reference)
