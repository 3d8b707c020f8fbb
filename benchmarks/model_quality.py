"""Does CMD pretraining help when labels are scarce? Measured on real labelled H&E.

Data: ``../shared/data/cpm15`` (MICCAI 2015 nuclei, TCGA brain tumours, expert instance
masks). Images 01-07 train, 08-10 test. 08-10 were scanned at 40x, so they are resized to
the 20x (about 0.5 um/px) of the others and of the sample slide; masks with nearest
neighbour. Training tiles are 128 px (a CPU budget choice); test images are segmented whole.

Arms, each fine-tuned on 10% and 100% of the training tiles with 3 seeds:

(a) ``cmd``: masked-diffusion pretraining on unlabelled real H&E (the cpm15 training images
    and the sample slide's tiles), then frozen backbone + trained heads;
(b) ``scratch-e2e``: the same network trained end to end from random initialisation;
(c) ``random-frozen``: a frozen random-init backbone + trained heads;

and, because the recipe lets a site also train the adaptive-normalisation layers
(``--trainable heads+modulation``, 8 % of the tiny model), the same pair with them trained:

(a') ``cmd-modulation``: CMD pretraining, then heads + modulation trained;
(c') ``random-modulation``: random init, then heads + modulation trained.

The pretraining is done once (seed 0) and shared by the three fine-tuning seeds. Metrics on
the three test images, whole: Dice, AJI, PQ (mean over images), mean +- std over seeds.
A ``--workdir`` that already holds runs of the same settings resumes them: finished runs are
evaluated again, not retrained.

    python -m benchmarks.model_quality [--cpm15 ../shared/data/cpm15] [--pretrain-steps 1000]
        [--finetune-steps 300] [--preset tiny] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import save
from cmdfed.data.importers.common import image_tiles
from cmdfed.data.samples import fetch_samples
from cmdfed.data.slide import tile_slide
from cmdfed.data.store import create_store
from cmdfed.evaluate.metrics import evaluate_instances, summarize
from cmdfed.inference.postprocess import WatershedParams, postprocess
from cmdfed.inference.segment import load_model, predict_image_maps
from cmdfed.model.config import ModelConfig
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune, pretrain

TILE = 128
TRAIN_IDS = [f"{i:02d}" for i in range(1, 8)]
TEST_IDS = ["08", "09", "10"]
POSTPROCESS = WatershedParams.for_mpp(0.5)
# arm -> (starts from the CMD pretraining, what is trained)
ARMS = {
    "cmd": (True, "heads"),
    "cmd-modulation": (True, "heads+modulation"),
    "scratch-e2e": (False, "all"),
    "random-frozen": (False, "heads"),
    "random-modulation": (False, "heads+modulation"),
}


def load_pair(folder: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = Image.open(folder / f"image{image_id}.png").convert("RGB")
    labels = Image.open(folder / f"image{image_id}_inst.png")
    if image_id in TEST_IDS:  # 40x -> 20x
        size = (image.width // 2, image.height // 2)
        image, labels = image.resize(size, Image.Resampling.BILINEAR), labels.resize(size, Image.Resampling.NEAREST)
    return np.asarray(image), np.asarray(labels).astype(np.int32)


def build_train_store(cpm15: Path, path: Path) -> Path:
    with create_store(path, tile_size=TILE, mpp=0.5, shard_tiles=32) as store:
        with store.writer() as writer:
            for image_id in TRAIN_IDS:
                image, labels = load_pair(cpm15, image_id)
                writer.extend(image_tiles(image, labels, None, tile_size=TILE, overlap=0, source="cpm15",
                                          slide_id=f"image{image_id}", tissue="brain", mpp=0.5))  # fmt: skip
    return path


def evaluate_on_test(run: Path, cpm15: Path) -> dict:
    loaded = load_model(run, torch.device("cpu"))
    results = []
    for image_id in TEST_IDS:
        image, truth = load_pair(cpm15, image_id)
        maps = predict_image_maps(loaded, image)
        # Watershed settings for the 20x the test images are resized to (the same for every arm).
        results.append(evaluate_instances(truth, postprocess(maps["np"], maps["hv"], params=POSTPROCESS).instance_map))
    return summarize(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpm15", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "cpm15")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cmdfed-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    train_store = work / "cpm15-train.zarr"
    if not train_store.exists():
        build_train_store(args.cpm15, train_store)
    slide_store = work / "slide.zarr"
    if not slide_store.exists():
        tile_slide(fetch_samples(names=["cmu_small_region.svs"])["cmu_small_region.svs"], slide_store, tile_size=TILE)

    model_config = ModelConfig.from_preset(args.preset)
    pre_config = TrainConfig(steps=args.pretrain_steps, batch_size=args.batch, lr=1e-3, warmup_steps=50,
                             sample_every=args.pretrain_steps // 4, checkpoint_every=args.pretrain_steps)  # fmt: skip
    pre = pretrain([train_store, slide_store], work / "pretrain", model_config=model_config, train_config=pre_config, device="cpu")

    per_run = []
    for fraction in (0.1, 1.0):
        for arm, (pretrained, trainable) in ARMS.items():
            for seed in range(args.seeds):
                run = work / f"{arm}-f{fraction}-s{seed}"
                config = TrainConfig(steps=args.finetune_steps, batch_size=args.batch, lr=1e-3 if trainable == "all" else 2e-3,
                                     warmup_steps=20, seed=seed, checkpoint_every=args.finetune_steps)  # fmt: skip
                result = finetune(
                    train_store, run, init=pre.run_dir if pretrained else None,
                    model_config=None if pretrained else model_config, trainable=trainable,
                    label_fraction=fraction, train_config=config, device="cpu",
                )  # fmt: skip
                metrics = evaluate_on_test(run, args.cpm15)
                per_run.append({"arm": arm, "fraction": fraction, "seed": seed, "dice": metrics["mean_dice"],
                                "aji": metrics["mean_aji"], "pq": metrics["mean_pq"],
                                "trainable": result.trainable_parameters, "final_loss": result.final_loss})  # fmt: skip
                print(json.dumps(per_run[-1]), flush=True)
    (work / "runs.json").write_text(json.dumps(per_run, indent=2))

    rows = []
    for fraction in (0.1, 1.0):
        for arm in ARMS:
            runs = [r for r in per_run if r["arm"] == arm and r["fraction"] == fraction]
            row = {"arm": arm, "label fraction": fraction, "seeds": len(runs), "trainable params": runs[0]["trainable"]}
            for key in ("dice", "aji", "pq"):
                values = np.array([r[key] for r in runs], float)
                row[key] = f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"
            rows.append(row)
    notes = (
        f"preset {args.preset}, {TILE} px tiles, pretraining {args.pretrain_steps} steps (one run, seed 0) on "
        f"cpm15 01-07 + sample slide, fine-tuning {args.finetune_steps} steps batch {args.batch}; "
        f"test: cpm15 08-10 whole images at 20x, watershed settings for 0.5 um/px (WatershedParams.for_mpp); wall time {(time.time() - started) / 60:.0f} min on this CPU"
    )
    save("model_quality", rows, notes=notes)


if __name__ == "__main__":
    main()
