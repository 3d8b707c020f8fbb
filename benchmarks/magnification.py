"""Training on both magnifications: do 40x images help the recipe, and how should they enter it?

The dev split of ``benchmarks/model_quality`` cannot answer this: all its training images
(CPM-15 01-07) were scanned at 20x, and its test images (08-10) are the only 40x ones. So
this benchmark holds out one 40x image at a time (three folds) and trains the default
recipe (``cmdfed/train/recipe.py``, scratch end to end, all tiles) on 01-07 plus the two
other 40x images, entered two ways:

* ``resampled``: read at the model's 0.5 um/px (bilinear image, nearest labels), as
  ``cmdfed data import`` and the released nuclei model take them: nuclei keep one size;
* ``native``: at 0.25 um/px but stored as if 0.5 um/px (what an import with a wrong
  ``--mpp`` gives): the network sees nuclei at twice their 20x size beside the 20x ones,
  and four times the tiles from those two images.

Beside them, ``20x only``: the recipe's own run on 01-07 (model_quality's ``scratch-e2e``
runs: with ``--workdir`` pointing at that benchmark's folder they are reused, not
retrained), scored on the same held-out image. Every run is scored on its held-out image at
0.5 um/px, whole, re-stained as the run's training tiles (what predict and the edge do by
default), with HoVer-Net's watershed settings scaled to 0.5 um/px; "pq as scanned" without
re-staining. A row's values are the mean +- std over the held-out images (one per fold,
``--held-out`` chooses them), each fold with the seeds asked for; the per-fold PQ is given beside.

    python -m benchmarks.magnification [--seeds 1] [--held-out 08 09 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import REPOSITORY, commit_of, save
from benchmarks.model_quality import SCALED, finished, score, train_run
from cmdfed.data import cpm15
from cmdfed.data.importers.common import image_tiles
from cmdfed.data.store import create_store
from cmdfed.inference.segment import load_model
from cmdfed.model.config import ModelConfig
from cmdfed.train.phases import finetune
from cmdfed.train.recipe import RECIPE_TILE, finetune_config

MODEL_MPP = 0.5
# how the extra 40x images are read: at the model's um/px, or as scanned
HANDLINGS = {"resampled": MODEL_MPP, "native": None}


def fold_store(work: Path, held_out: str, handling: str) -> Path:
    """Labelled tiles of 01-07 at 0.5 um/px and of the 40x images but ``held_out``, read as ``handling`` says."""
    store = work / f"cpm15-mag-{handling}-without{held_out}-{RECIPE_TILE}.zarr"
    if store.exists():
        return store
    extra = [image_id for image_id in cpm15.TEST_IDS if image_id != held_out]
    with create_store(store, tile_size=RECIPE_TILE, mpp=MODEL_MPP) as site, site.writer() as writer:
        for image_id in [*cpm15.TRAIN_IDS, *extra]:
            read_at = MODEL_MPP if image_id in cpm15.TRAIN_IDS else HANDLINGS[handling]
            image, labels = cpm15.load_pair(image_id, read_at)
            writer.extend(
                image_tiles(
                    image,
                    labels,
                    None,
                    tile_size=RECIPE_TILE,
                    overlap=0,
                    source="cpm15",
                    slide_id=f"cpm15-image{image_id}",
                    tissue="brain",
                    mpp=MODEL_MPP,  # "native" claims 0.5 um/px, as a wrong --mpp would
                )
            )
    return store


def train_fold(work: Path, held_out: str, handling: str, seed: int) -> Path:
    """The recipe on ``fold_store``: fine-tuned (or finished) once, reused after."""
    run = work / f"mag-{handling}-without{held_out}-s{seed}"
    train = finetune_config(seed=seed)
    if not finished(run, train.steps):
        finetune(
            fold_store(work, held_out, handling),
            run,
            init=None,
            model_config=ModelConfig.from_preset("tiny"),
            trainable="all",
            label_fraction=1.0,
            train_config=train,
            device="cpu",
        )
    return run


def scored(run: Path, held_out: str) -> dict:
    """Dice, AJI and PQ of ``run`` on the held-out image, re-stained as its training tiles; PQ as scanned."""
    test = {held_out: cpm15.load_pair(held_out, MODEL_MPP)}
    stains = load_model(run, torch.device("cpu")).stain_reference
    record = score(run, test, SCALED, stains)
    record["pq as scanned"] = score(run, test, SCALED, None)["pq"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--held-out", nargs="+", choices=cpm15.TEST_IDS, default=list(cpm15.TEST_IDS))
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cmdfed-magnification-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    per_run = []
    for seed in range(args.seeds):
        baseline = train_run(work, "scratch-e2e", "recipe", 1.0, seed).run_dir
        for held_out in args.held_out:
            runs = {"20x only": baseline, **{h: train_fold(work, held_out, h, seed) for h in HANDLINGS}}
            for training, run in runs.items():
                record = {"training": training, "held out": held_out, "seed": seed, **scored(run, held_out)}
                per_run.append(record)
                print(json.dumps(record), flush=True)
    (work / "magnification-runs.json").write_text(json.dumps(per_run, indent=2))

    rows = []
    for training in ("20x only", *HANDLINGS):
        runs = [r for r in per_run if r["training"] == training]
        row = {"training images": training, "runs": len(runs)}
        for key in ("dice", "aji", "pq", "pq as scanned"):
            values = np.array([r[key] for r in runs], float)
            row[key] = f"{values.mean():.3f} ± {values.std():.3f}"
        for held_out in args.held_out:
            row[f"pq {held_out}"] = round(float(np.mean([r["pq"] for r in runs if r["held out"] == held_out])), 3)
        rows.append(row)
    code = commit_of(REPOSITORY, "cmdfed")
    notes = (
        f"folds: one 40x image of cpm15 08-10 held out; training: 01-07 at 0.5 um/px ('20x only'), plus the other "
        "two 40x images resampled to 0.5 um/px ('resampled') or as scanned at 0.25 um/px, stored as 0.5 ('native'); "
        f"the default recipe, scratch end to end, {finetune_config().steps} steps of {finetune_config().batch_size} "
        f"tiles of {RECIPE_TILE} px, all tiles, seeds 0-{args.seeds - 1}; scored on the held-out image at 0.5 um/px, "
        "re-stained as the run's training tiles (Macenko), HoVer-Net's watershed settings scaled to 0.5 um/px; "
        f"mean ± std over the folds held out ({', '.join(args.held_out)}; each fold one image, so the std is "
        "mostly the images' spread); "
        f"code at commit {code}; wall time {(time.time() - started) / 60:.0f} min on this CPU (finished runs reused)"
    )
    save("magnification", rows, notes=notes)


if __name__ == "__main__":
    main()
