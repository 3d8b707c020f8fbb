"""A federated run's initial global weights from a checkpoint (run config ``init``).

The product's recipe starts from a released, pretrained CMD model and fine-tunes it at the
sites, so a run can take its first global weights from a checkpoint instead of the seed:
``init`` names a checkpoint folder, a run folder (its ``latest``) or a released model
(``cmdfed models list``), as every checkpoint reader takes them (``resolve_checkpoint``).
The path is the server's: only the weights travel, the sites never read it.

What is taken, and why:

* **architecture**: the checkpoint's model config (widths, depths, ...), with the run's NC
  head. The run's ``preset`` must name the preset the checkpoint was built from: it states
  the run's size in telemetry and run.json, so a mismatch is refused rather than one of
  the two silently winning. A checkpoint conditioned on a foundation model (``fm_kind``) is
  refused: the sites have no FM encoder to compute its features.
* **backbone and modulation**: always (the EMA weights when the checkpoint kept them, as
  ``cmdfed train finetune --init`` takes them: they are pretraining's result).
* **heads**: kept when the checkpoint was fine-tuned (phase ``finetune``) for the run's
  classes, so fine-tuning a released segmenter further continues its heads; fresh (seeded)
  from a pretraining checkpoint, whose heads were never trained. A checkpoint fine-tuned
  for other classes is refused: its heads would be dropped without a word, and a class
  list spelled differently is the likelier mistake than a wish for new heads.

``pretrain-rounds = 0`` then goes straight to fine-tuning from those weights. The init's
record (what was given, the folder it resolved to, the sha256 of the weights file read,
heads kept or fresh, its resolution) is pinned in ``run.json`` and written into every round
checkpoint's config, so a round says where it started; a run folder that has not finished a
round yet refuses an init whose weights changed since it was pinned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cmdfed.checksums import sha256_of_file
from cmdfed.errors import CmdfedError
from cmdfed.federation.config import FederationConfig
from cmdfed.inference.stain import REFERENCE_KEY
from cmdfed.model.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from cmdfed.model.config import ModelConfig
from cmdfed.model.unet import ConvNeXtUNet


@dataclass(frozen=True)
class InitialWeights:
    architecture: ModelConfig  # the run's model (with the run's NC head), from the checkpoint
    weights: dict[str, torch.Tensor]  # of ``groups``
    groups: tuple[str, ...]
    record: dict  # what run.json and the round checkpoints keep


def load_initial_weights(config: FederationConfig) -> InitialWeights:
    """The weights and architecture ``config.init`` names; one CmdfedError saying what to do
    when it is missing, damaged, or conflicts with the run (preset, classes, FM conditioning)."""
    given = config.init
    try:
        checkpoint = load_checkpoint(given, backbone_only=True)
    except CmdfedError as exc:
        raise CmdfedError(
            f"init: {exc}; set init to a checkpoint or run folder on the server, a released model's "
            'name (cmdfed models list), or "" to start from random weights'
        ) from exc
    saved = checkpoint.config
    try:
        model = ModelConfig.from_dict(dict(saved["model"]))
    except (KeyError, TypeError, CmdfedError) as exc:
        raise CmdfedError(
            f"init {given}: {checkpoint.path} has no usable model config ({exc}); is it a cmdfed checkpoint?"
        ) from exc
    if model.fm_kind != "none":
        raise CmdfedError(
            f"init {given} is conditioned on foundation-model features ({model.fm_kind}), which federated sites do not "
            "compute; start from a checkpoint without FM conditioning"
        )
    if model.preset != config.preset:
        raise CmdfedError(
            f"init {given} is a {model.preset!r} model but the run's preset is {config.preset!r}; set preset = "
            f'"{model.preset}" (with init the architecture is the checkpoint\'s; preset must state it) or choose '
            "another init"
        )
    fine_tuned = saved.get("phase") == "finetune"
    if fine_tuned and not _same_classes(model, saved, config):
        theirs = ",".join(saved.get("class_names", [])[1:]) if model.n_classes else ""
        raise CmdfedError(
            f"init {given} is fine-tuned for classes {theirs or '(none: no NC head)'!r} but the run classifies "
            f'{config.classes or "(none)"!r}; set classes = "{theirs}" to continue fine-tuning its heads, or start '
            "from the pretrained checkpoint it was fine-tuned from to train new heads"
        )
    keep_heads = fine_tuned and int(saved.get("format", 0)) == CHECKPOINT_FORMAT  # older heads do not load
    groups = ("backbone", "modulation", "heads") if keep_heads else ("backbone", "modulation")
    use_ema = checkpoint.ema is not None
    source = checkpoint.ema if use_ema else checkpoint.weights
    weights_file = checkpoint.path / ("ema.safetensors" if use_ema else "model.safetensors")
    architecture = ModelConfig.from_dict({**model.to_dict(), "n_classes": config.n_classes})
    record = {
        "init": given,
        "checkpoint": str(checkpoint.path.absolute()),
        "weights_file": weights_file.name,
        "sha256": sha256_of_file(weights_file),
        "phase": saved.get("phase"),
        "step": checkpoint.step,
        "heads": "kept" if keep_heads else "fresh",
        "mpp": saved.get("mpp"),
        # Inference moves images to the init's training colours: the run keeps them, so no site's
        # colour statistics (an aggregate of its patients' pixels) need to leave it.
        REFERENCE_KEY: saved.get(REFERENCE_KEY),
        "architecture": architecture.to_dict(),
    }
    weights = {k: v for k, v in source.items() if ConvNeXtUNet.group_of(k) in groups}
    return InitialWeights(architecture, weights, groups, record)


def check_pinned_init(pinned: dict | None, record: dict, run_json: Path) -> None:
    """Refuse to start a pinned run (no round finished yet) from init weights that changed since."""
    if pinned and pinned.get("sha256") != record["sha256"]:
        raise CmdfedError(
            f"{run_json} pinned init {pinned.get('init')} with weights sha256 {str(pinned.get('sha256'))[:12]}..., but "
            f"{record['checkpoint']} now holds {record['sha256'][:12]}...; restore those weights or choose a new run "
            "folder"
        )


def _same_classes(model: ModelConfig, saved: dict, config: FederationConfig) -> bool:
    """Whether a fine-tuned checkpoint's heads classify what the run does (both without NC head, or the same names)."""
    if model.n_classes != config.n_classes:
        return False
    return config.n_classes == 0 or list(saved.get("class_names", [])) == config.class_names
