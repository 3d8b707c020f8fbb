"""Nuclei quality of the default recipe and of the alternatives, on real labelled H&E.

Data: CPM-15 as the package ships it (``cmdfed.data.cpm15``: TCGA brain tumours, expert
instance masks). Images 01-07 train, 08-10 test; 08-10 were scanned at 40x and are
resampled to the 0.5 um/px (20x) of the others and of the sample slide (image bilinear,
masks nearest). Training tiles are 128 px; the test images are segmented whole.

Arms, each fine-tuned on 10 % and 100 % of the training tiles with the recipe's settings
(``cmdfed/train/recipe.py``: 1500 steps of 8 tiles, LR 1e-3; frozen-backbone arms LR 2e-3):

* ``cmd-e2e``: CMD masked-diffusion pretraining (the recipe's 3000 steps on the training
  images and the sample slide, unlabelled), then end to end fine-tuning;
* ``scratch-e2e``: the same network trained end to end from random initialisation: the
  default recipe (it measured better than ``cmd-e2e``);
* ``cmd-heads``: CMD pretraining, frozen backbone, heads trained;
* ``cmd-modulation``: CMD pretraining, heads + adaptive-normalisation layers trained;
* ``random-frozen``: a frozen random-init backbone, heads trained.

Levers (``--levers``): one change to the fine-tuning recipe each, trained and scored beside
the recipe with the same seeds, so that a lever is adopted on its figure, not on a guess:

* ``recipe``: the recipe as it is;
* ``noaug``: without the recipe's scale jitter (zoom by up to 1.2x either way) and Gaussian blur
  (sigma up to 1 px), ``cmdfed.data.augment``: flips, 90-degree rotations and stain jitter only,
  the recipe before these were adopted on this benchmark's figures;
* ``ema``: an exponential moving average of the weights (decay 0.999) is what is scored;
* ``long``: 3000 steps instead of 1500 (the time bf16 saved, spent; still well within the
  60-minute budget on this CPU);
* ``fp32``: the recipe in float32 instead of bf16 autocast, the check that the faster
  precision costs no quality (the performance issue asks for PQ within 0.01, same seeds);
* ``constlr``: the learning-rate schedule: constant after the warm-up instead of the cosine
  decay to 1 % of the peak;
* ``t0``, ``t250``: the diffusion timestep whose modulation the fine-tuned network reads
  (``finetune_timestep``: 0 = fully clean, the recipe's 50, 250 = the far end of the range
  DDPM-Seg found best); it matters where the backbone is CMD's, most with it frozen;
* ``lowmask``: a pretraining lever: each tile hides a share of its blocks drawn from
  [10 %, 60 %] instead of always 60 %, so that the network also sees nearly whole tiles, as
  fine-tuning gives it (a pretraining of its own, ``pretrain+lowmask``);
* ``tile256``: 256 px training tiles, 2 per step (the same pixels per step as 8 of 128 px),
  from a store of 256 px tiles of the same images;
* ``heads2``: the task heads at half resolution, their outputs upsampled (``head_stride`` 2,
  ``cmdfed/model/heads.py``): a quarter of the heads' cost, which is most of a tile's;
* ``sepheads``: the task heads' 3x3 convolutions split into depthwise 3x3 + pointwise 1x1
  (``head_conv`` ``separable``), at full resolution: ~1/7 of the heads' multiply-adds;
* ``scales1``: which decoder scales the heads read: the full-resolution map alone
  (``head_scales`` 1) instead of all four fused; it matters most over a frozen backbone;
* ``longpretrain``: a pretraining lever: 6000 masked-diffusion steps instead of 3000 (the
  time bf16 saved on a step, spent; a pretraining of its own, ``pretrain+longpretrain``).

Training on both magnifications cannot be a lever here: every training image of this split is
20x. ``benchmarks/magnification`` measures it on folds that hold out one 40x image each.

Levers combine with '+' (``noaug+ema``: EMA over the recipe without the new augmentation,
which is what EMA was measured against).

The pretraining is one run (seed 0) per diffusion setting, shared by the fine-tuning seeds.
Each run is scored on the test images (mean over the three of Dice, AJI, PQ) with two
post-processings: HoVer-Net's settings scaled to 0.5 um/px (on the images as scanned, and
re-stained as the run's training tiles, which predict and the edge do by default), and the
settings ``cmdfed train tune`` picks on the tiles the run trained on (the released nuclei model has
no held-out image left, so this measures how settings chosen that way transfer). Mean +- std
over seeds.

A ``--workdir`` that already holds runs of the same settings reuses them: finished runs
are scored again, not retrained. ``--arms``, ``--fractions`` and ``--seeds`` choose which
runs make the table, so a budget that cannot run all 30 still reports what it ran;
``--finished-only`` trains nothing and scores the finished runs there (a row's ``seeds``
says how many it has).

    python -m benchmarks.model_quality [--arms cmd-e2e scratch-e2e ...] [--fractions 0.1 1.0]
        [--levers recipe ema ...] [--seeds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPOSITORY, commit_of, save
from cmdfed.data import cpm15
from cmdfed.data.samples import fetch_samples
from cmdfed.data.slide import tile_slide
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.metrics import evaluate_instances, summarize
from cmdfed.evaluate.tune import tune_postprocess
from cmdfed.inference.postprocess import WatershedParams, tuned_postprocess
from cmdfed.inference.segment import load_model, segment_image
from cmdfed.inference.stain import REFERENCE_KEY, HEStains
from cmdfed.model.checkpoint import load_checkpoint
from cmdfed.model.config import ModelConfig
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import PhaseResult, finetune, pretrain, stain_reference, training_tiles
from cmdfed.train.recipe import RECIPE_TILE, finetune_config, pretrain_config, pretrain_diffusion

SCALED = WatershedParams.for_mpp(0.5)
# arm -> (starts from the CMD pretraining, what is trained)
ARMS = {
    "cmd-e2e": (True, "all"),
    "scratch-e2e": (False, "all"),
    "cmd-heads": (True, "heads"),
    "cmd-modulation": (True, "heads+modulation"),
    "random-frozen": (False, "heads"),
}


@dataclass(frozen=True)
class Lever:
    """One change to the recipe: settings over its fine-tuning, model, pretraining or tiles."""

    finetune: dict = field(default_factory=dict)  # TrainConfig settings over the recipe's FINETUNE
    model: dict = field(default_factory=dict)  # ModelConfig settings that fine-tuning may change (no weight shapes)
    pretrain_diffusion: dict = field(default_factory=dict)  # the CMD pretraining's DiffusionConfig settings
    tile: int = RECIPE_TILE  # training tile size in px (at 0.5 um/px)
    pretrain: dict = field(default_factory=dict)  # TrainConfig settings over the recipe's PRETRAIN

    def then(self, other: Lever) -> Lever:
        """This lever with ``other`` applied over it."""
        return Lever(
            {**self.finetune, **other.finetune},
            {**self.model, **other.model},
            {**self.pretrain_diffusion, **other.pretrain_diffusion},
            other.tile if other.tile != RECIPE_TILE else self.tile,
            {**self.pretrain, **other.pretrain},
        )


LEVERS = {
    "recipe": Lever(),
    "noaug": Lever(finetune={"scale_jitter": 0.0, "blur_sigma": 0.0}),
    "ema": Lever(finetune={"ema_decay": 0.999}),
    "long": Lever(finetune={"steps": 3000}),
    "fp32": Lever(finetune={"precision": "fp32"}),
    "constlr": Lever(finetune={"min_lr_ratio": 1.0}),
    "t0": Lever(model={"finetune_timestep": 0}),
    "t250": Lever(model={"finetune_timestep": 250}),
    "lowmask": Lever(pretrain_diffusion={"mask_ratio_min": 0.1}),
    "tile256": Lever(finetune={"batch_size": 2}, tile=256),
    "heads2": Lever(model={"head_stride": 2}),
    "sepheads": Lever(model={"head_conv": "separable"}),
    "scales1": Lever(model={"head_scales": 1}),
    "longpretrain": Lever(pretrain={"steps": 6000}),
}


def lever_settings(lever: str) -> Lever:
    """The settings of ``lever``: one of LEVERS, or several joined by '+', applied left to right."""
    merged = Lever()
    for part in lever.split("+"):
        merged = merged.then(LEVERS[part])
    return merged


def checked_lever(lever: str) -> str:
    """``--levers``' type: a lever name, or several joined by '+'."""
    unknown = [part for part in lever.split("+") if part not in LEVERS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown lever {unknown[0]!r}: use {', '.join(LEVERS)}, or several joined by '+'"
        )
    return lever


def run_name(arm: str, lever: str, fraction: float, seed: int) -> str:
    return f"{arm}{'' if lever == 'recipe' else '+' + lever}-f{fraction}-s{seed}"


def run_config(arm: str, lever: str, seed: int) -> TrainConfig:
    frozen_backbone = ARMS[arm][1] != "all"
    return finetune_config(seed=seed, **({"lr": 2e-3} if frozen_backbone else {}), **lever_settings(lever).finetune)


def train_store(work: Path, tile: int) -> Path:
    """The labelled training store (CPM-15 01-07 at 0.5 um/px) in ``tile`` px tiles, written once."""
    store = work / f"cpm15-train-{tile}-0.zarr"
    if not store.exists():
        cpm15.write_store(store, list(cpm15.TRAIN_IDS), tile_size=tile)
    return store


def pretraining(work: Path, lever: str) -> Path:
    """The CMD pretraining the cmd arms of ``lever`` start from, trained once per pretraining setting."""
    changes = [part for part in lever.split("+") if LEVERS[part].pretrain_diffusion or LEVERS[part].pretrain]
    run_dir = work / "+".join(["pretrain", *changes])
    config = pretrain_config(**lever_settings(lever).pretrain)
    slide_store = work / f"slide-{RECIPE_TILE}.zarr"
    if not slide_store.exists():
        tile_slide(
            fetch_samples(names=["cmu_small_region.svs"])["cmu_small_region.svs"], slide_store, tile_size=RECIPE_TILE
        )
    if finished(run_dir, config.steps):
        return run_dir
    return pretrain(
        [train_store(work, RECIPE_TILE), slide_store],
        run_dir,
        model_config=ModelConfig.from_preset("tiny"),
        diffusion_config=pretrain_diffusion(**lever_settings(lever).pretrain_diffusion),
        train_config=config,
        device="cpu",
    ).run_dir


def train_run(work: Path, arm: str, lever: str, fraction: float, seed: int) -> PhaseResult:
    """Fine-tune (or finish) the run ``arm``/``lever``/``fraction``/``seed`` in ``work``."""
    pretrained, trainable = ARMS[arm]
    settings = lever_settings(lever)
    return finetune(
        train_store(work, settings.tile),
        work / run_name(arm, lever, fraction, seed),
        init=pretraining(work, lever) if pretrained else None,
        model_config=None if pretrained else ModelConfig.from_preset("tiny", **settings.model),
        model_overrides=settings.model if pretrained else None,
        trainable=trainable,
        label_fraction=fraction,
        train_config=run_config(arm, lever, seed),
        device="cpu",
    )


def score(
    run: Path, test: dict[str, tuple[np.ndarray, np.ndarray]], params: WatershedParams, stains: HEStains | None
) -> dict:
    """Mean Dice, AJI and PQ of ``run`` on the test images, as scanned (``stains`` None) or
    re-stained as ``stains`` (``segment_image``, predict's path)."""
    loaded = load_model(run, torch.device("cpu"), stain_normalise=False)
    loaded.stain_reference = stains
    results = [
        evaluate_instances(truth, segment_image(loaded, image, params).instance_map) for image, truth in test.values()
    ]
    summary = summarize(results)
    return {key: summary[f"mean_{key}"] for key in ("dice", "aji", "pq")}


def training_stains(work: Path, arm: str, lever: str, fraction: float, seed: int) -> HEStains:
    """The stains of the tiles the run trained on: what its checkpoint records, or for a run from
    before checkpoints recorded them, measured on the same tiles as fine-tuning now does."""
    recorded = load_checkpoint(work / run_name(arm, lever, fraction, seed)).config.get(REFERENCE_KEY)
    if recorded is None:
        site = SiteStore.open(train_store(work, lever_settings(lever).tile))
        recorded = stain_reference([(site, training_tiles(site, fraction, seed))])
    return HEStains.from_dict(recorded, run_name(arm, lever, fraction, seed))


def finished(run: Path, steps: int) -> bool:
    """Whether ``run`` holds a fine-tuning run that took all its ``steps``."""
    try:
        return load_checkpoint(run).step >= steps
    except CmdfedError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--levers", nargs="+", type=checked_lever, default=["recipe"], metavar="LEVER")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="train nothing: score the runs --workdir holds finished, each row saying how many seeds it has",
    )
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cmdfed-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    test = {image_id: cpm15.load_pair(image_id, 0.5) for image_id in cpm15.TEST_IDS}

    per_run = []
    for fraction in args.fractions:
        for arm in args.arms:
            for lever in args.levers:
                for seed in range(args.seeds):
                    run = work / run_name(arm, lever, fraction, seed)
                    if args.finished_only and not finished(run, run_config(arm, lever, seed).steps):
                        continue
                    result = train_run(work, arm, lever, fraction, seed)
                    record = {
                        "arm": arm,
                        "lever": lever,
                        "fraction": fraction,
                        "seed": seed,
                        "trainable": result.trainable_parameters,
                    }
                    record.update({f"{k} scaled": v for k, v in score(run, test, SCALED, None).items()})
                    stains = training_stains(work, arm, lever, fraction, seed)
                    record.update({f"{k} normalised": v for k, v in score(run, test, SCALED, stains).items()})
                    checkpoint = result.checkpoint
                    if tuned_postprocess(checkpoint) is None:  # on the tiles this run trained on, no others
                        store = train_store(work, lever_settings(lever).tile)
                        tiles = training_tiles(SiteStore.open(store), fraction, seed)
                        tune_postprocess(load_model(run, torch.device("cpu")), store, indices=tiles)
                    # tuned and scored as the product runs the checkpoint (re-stained when it records stains)
                    own_stains = load_model(run, torch.device("cpu")).stain_reference
                    tuned = score(run, test, tuned_postprocess(checkpoint)[0], own_stains)
                    record.update({f"{k} tuned": v for k, v in tuned.items()})
                    per_run.append(record)
                    print(json.dumps(record), flush=True)
    (work / "runs.json").write_text(json.dumps(per_run, indent=2))

    rows = []
    for fraction in args.fractions:
        for arm in args.arms:
            for lever in args.levers:
                runs = [r for r in per_run if (r["arm"], r["lever"], r["fraction"]) == (arm, lever, fraction)]
                if not runs:
                    continue
                row = {
                    "arm": arm,
                    "lever": lever,
                    "label fraction": fraction,
                    "seeds": len(runs),
                    "trainable params": runs[0]["trainable"],
                }
                for key in (
                    "dice scaled",
                    "aji scaled",
                    "pq scaled",
                    "aji normalised",
                    "pq normalised",
                    "aji tuned",
                    "pq tuned",
                ):
                    values = np.array([r[key] for r in runs], float)
                    row[key] = f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"
                rows.append(row)
    code = commit_of(REPOSITORY, "cmdfed")  # the recipe's code: changes elsewhere do not touch the scores
    notes = (
        f"tiny preset, {RECIPE_TILE} px tiles at 0.5 um/px; pretraining {pretrain_config().steps} steps (one run, seed "
        f"0) on cpm15 01-07 + the sample slide; fine-tuning {finetune_config().steps} steps of "
        f"{finetune_config().batch_size} tiles (cmdfed/train/recipe.py); test: cpm15 08-10 whole images resampled to "
        "0.5 um/px; 'scaled' = HoVer-Net's watershed settings scaled to 0.5 um/px, as scanned; 'normalised' = the same "
        "settings on the test images re-stained as the run's training tiles (Macenko, cmdfed.inference.stain: what "
        "predict and the edge do by default); 'tuned' = cmdfed train tune on the run's training tiles, scored as the "
        "product runs the checkpoint (re-stained when it records its training stains); "
        f"code at commit {code}; wall time {(time.time() - started) / 60:.0f} min on this CPU (finished runs reused)"
    )
    path = save("model_quality", rows, notes=notes)
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "commit": code}, indent=2) + "\n")  # the released models' cards cite it


if __name__ == "__main__":
    main()
