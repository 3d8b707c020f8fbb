"""Does stain normalisation at inference help a model trained on few images? (a candidate lever
of the quality issue, measured before it enters the product)

Reinhard et al. (2001) colour transfer: each channel of an image in CIELAB is shifted and
scaled so that its tissue's mean and standard deviation become those of the model's training
images; the model then segments the normalised image. No parameter is fitted to the test
images: the target statistics are those of CPM-15 01-07 (the development split's training
images), the source statistics those of the image being segmented, both over tissue pixels
only (``cmdfed.data.slide.tissue_mask``: background would pull a slide's mean towards white).

Each run is scored on CPM-15 08-10 (resampled to 0.5 um/px, whole images, HoVer-Net's watershed
settings scaled to 0.5 um/px: model_quality's 'scaled' columns), as it is and normalised. Runs:
released model names or run folders trained on 01-07 only (08-10 must stay unseen).

    python -m benchmarks.stain_normalisation [--runs cmd-tiny-he-nuclei-dev RUN ...]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.common import save
from cmdfed.data import cpm15
from cmdfed.data.slide import tissue_mask
from cmdfed.evaluate.metrics import evaluate_instances, summarize
from cmdfed.inference.postprocess import WatershedParams, postprocess
from cmdfed.inference.segment import load_model, predict_image_maps
from cmdfed.model.checkpoint import resolve_checkpoint

MPP = 0.5


@dataclass(frozen=True)
class LabStats:
    """Per-channel mean and standard deviation of tissue pixels in OpenCV's 8-bit CIELAB."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, images: list[np.ndarray]) -> LabStats:
        pixels = np.concatenate([_lab(image)[tissue_mask(image)] for image in images])
        return cls(pixels.mean(0), pixels.std(0))


def _lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)


def reinhard(image: np.ndarray, target: LabStats) -> np.ndarray:
    """``image`` with its tissue's LAB statistics moved to ``target``'s (every pixel transformed alike)."""
    source = LabStats.of([image])
    moved = (_lab(image) - source.mean) / source.std * target.std + target.mean
    return cv2.cvtColor(np.clip(moved + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def scores(run: str, test: dict, target: LabStats | None) -> tuple[dict, list[float]]:
    loaded = load_model(resolve_checkpoint(run), torch.device("cpu"))
    params = WatershedParams.for_mpp(MPP)
    results = []
    for image, truth in test.values():
        maps = predict_image_maps(loaded, image if target is None else reinhard(image, target))
        results.append(evaluate_instances(truth, postprocess(maps["np"], maps["hv"], params=params).instance_map))
    summary = summarize(results)
    return {key: summary[f"mean_{key}"] for key in ("dice", "aji", "pq")}, [r["pq"] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["cmd-tiny-he-nuclei-dev"], help="released names or run folders")
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = LabStats.of([cpm15.load_pair(image_id, MPP)[0] for image_id in cpm15.TRAIN_IDS])
    test = {image_id: cpm15.load_pair(image_id, MPP) for image_id in cpm15.TEST_IDS}
    rows = []
    for run in args.runs:
        for normalised in (False, True):
            means, per_image = scores(run, test, target if normalised else None)
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
            f"CPM-15 08-10 at {MPP} um/px, whole images, watershed settings scaled to {MPP} um/px; target LAB "
            f"statistics of CPM-15 01-07's tissue: mean {np.round(target.mean, 1).tolist()}, std "
            f"{np.round(target.std, 1).tolist()} (OpenCV 8-bit LAB); 2 threads"
        ),
    )


if __name__ == "__main__":
    main()
