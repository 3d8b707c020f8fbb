"""Does stain normalisation at inference help a model trained on few images? (the quality
issue's lever that predict, evaluate and the edge now apply by default)

Macenko stain normalisation (``cmdfed.inference.stain``): the image is unmixed into hematoxylin
and eosin by its own stain vectors and mixed again with those of the model's training images,
each stain's concentration scaled to theirs; the model then segments the re-stained image. No
parameter is fitted to the test images: the reference stains are the training images', the
source stains those of the image being segmented.

Each run is scored on CPM-15 08-10 (resampled to 0.5 um/px, whole images, HoVer-Net's watershed
settings scaled to 0.5 um/px: model_quality's 'scaled' columns), as scanned and normalised, through
``segment_image``, the path ``cmdfed predict`` takes: the reference is the one the checkpoint
records (its training tiles', written by training); a run from before checkpoints recorded one is
given CPM-15 01-07's, measured on the whole images. Runs: released model names or run folders
trained on 01-07 only (08-10 must stay unseen).

    python -m benchmarks.stain_normalisation [--runs cmd-tiny-he-nuclei-dev RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import save
from cmdfed.data import cpm15
from cmdfed.evaluate.metrics import evaluate_instances, summarize
from cmdfed.inference.postprocess import WatershedParams
from cmdfed.inference.segment import load_model, segment_image
from cmdfed.inference.stain import HEStains
from cmdfed.model.checkpoint import resolve_checkpoint

MPP = 0.5


def scores(run: str, test: dict, normalise: bool, fallback: HEStains) -> tuple[dict, list[float], str]:
    """Mean Dice, AJI and PQ, per-image PQ, and where the reference came from."""
    loaded = load_model(resolve_checkpoint(run), torch.device("cpu"), stain_normalise=normalise)
    source = "checkpoint" if loaded.stain_reference is not None else "-"
    if normalise and loaded.stain_reference is None:
        loaded.stain_reference, source = fallback, "01-07 whole images"
    params = WatershedParams.for_mpp(MPP)
    results = [
        evaluate_instances(truth, segment_image(loaded, image, params).instance_map) for image, truth in test.values()
    ]
    summary = summarize(results)
    return {key: summary[f"mean_{key}"] for key in ("dice", "aji", "pq")}, [r["pq"] for r in results], source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["cmd-tiny-he-nuclei-dev"], help="released names or run folders")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reference = HEStains.of([cpm15.load_pair(image_id, MPP)[0] for image_id in cpm15.TRAIN_IDS])
    test = {image_id: cpm15.load_pair(image_id, MPP) for image_id in cpm15.TEST_IDS}
    rows = []
    for run in args.runs:
        for normalised in (False, True):
            means, per_image, source = scores(run, test, normalised, reference)
            rows.append(
                {
                    "run": Path(run).name,
                    "inference": "stain-normalised" if normalised else "as scanned",
                    "reference": source,
                    **{key: round(value, 3) for key, value in means.items()},
                    "pq 08 / 09 / 10": " / ".join(f"{pq:.3f}" for pq in per_image),
                }
            )
            print(rows[-1], flush=True)
    save(
        "stain_normalisation",
        rows,
        notes=(
            f"CPM-15 08-10 at {MPP} um/px, whole images, watershed settings scaled to {MPP} um/px; reference: the "
            f"checkpoint's; for runs without one, CPM-15 01-07's whole images: {reference.to_dict()}; 2 threads"
        ),
    )


if __name__ == "__main__":
    main()
