"""Does stain normalisation at inference help a model trained on few images? (a candidate lever
of the quality issue, measured before it enters the product)

Reinhard colour transfer (``cmdfed.inference.stain``): each channel of an image in CIELAB is
shifted and scaled so that its tissue's mean and standard deviation become those of the model's
training images; the model then segments the normalised image. No parameter is fitted to the
test images: the reference statistics are those of CPM-15 01-07 (the development split's
training images), the source statistics those of the image being segmented, both over tissue
pixels only.

Each run is scored on CPM-15 08-10 (resampled to 0.5 um/px, whole images, HoVer-Net's watershed
settings scaled to 0.5 um/px: model_quality's 'scaled' columns), as it is and normalised. Runs:
released model names or run folders trained on 01-07 only (08-10 must stay unseen).

    python -m benchmarks.stain_normalisation [--runs cmd-tiny-he-nuclei-dev RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import save
from cmdfed.data import cpm15
from cmdfed.evaluate.metrics import evaluate_instances, summarize
from cmdfed.inference.postprocess import WatershedParams, postprocess
from cmdfed.inference.segment import load_model, predict_image_maps
from cmdfed.inference.stain import LabStats, reinhard
from cmdfed.model.checkpoint import resolve_checkpoint

MPP = 0.5


def scores(run: str, test: dict, reference: LabStats | None) -> tuple[dict, list[float]]:
    loaded = load_model(resolve_checkpoint(run), torch.device("cpu"))
    params = WatershedParams.for_mpp(MPP)
    results = []
    for image, truth in test.values():
        seen = image if reference is None else reinhard(image, LabStats.of([image]), reference)
        maps = predict_image_maps(loaded, seen)
        results.append(evaluate_instances(truth, postprocess(maps["np"], maps["hv"], params=params).instance_map))
    summary = summarize(results)
    return {key: summary[f"mean_{key}"] for key in ("dice", "aji", "pq")}, [r["pq"] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["cmd-tiny-he-nuclei-dev"], help="released names or run folders")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reference = LabStats.of([cpm15.load_pair(image_id, MPP)[0] for image_id in cpm15.TRAIN_IDS])
    test = {image_id: cpm15.load_pair(image_id, MPP) for image_id in cpm15.TEST_IDS}
    rows = []
    for run in args.runs:
        for normalised in (False, True):
            means, per_image = scores(run, test, reference if normalised else None)
            rows.append(
                {
                    "run": Path(run).name,
                    "inference": "Reinhard to 01-07" if normalised else "as scanned",
                    **{key: round(value, 3) for key, value in means.items()},
                    "pq 08 / 09 / 10": " / ".join(f"{pq:.3f}" for pq in per_image),
                }
            )
            print(rows[-1], flush=True)
    save(
        "stain_normalisation",
        rows,
        notes=(
            f"CPM-15 08-10 at {MPP} um/px, whole images, watershed settings scaled to {MPP} um/px; reference LAB "
            f"statistics of CPM-15 01-07's tissue: mean {np.round(reference.mean, 1).tolist()}, std "
            f"{np.round(reference.std, 1).tolist()} (OpenCV 8-bit LAB); 2 threads"
        ),
    )


if __name__ == "__main__":
    main()
