"""Evaluate a checkpoint on the labelled tiles of a store: the numbers `cmdfed train evaluate` prints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.metrics import aggregate_panoptic, evaluate_instances, summarize
from cmdfed.inference.postprocess import WatershedParams, postprocess, postprocess_for
from cmdfed.inference.segment import LoadedModel, load_model, predict_maps
from cmdfed.inference.stain import HEStains, macenko, source_stains
from cmdfed.progress import Progress, report


def evaluate_model(
    loaded: LoadedModel,
    store: str | Path,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 8,
    params: WatershedParams | None = None,
    progress: Progress | None = None,
) -> dict:
    """Per-image metrics over labelled tiles, summarised (Dice, AJI, AJI+, PQ, mPQ, F1...).

    When the store records each tile's tissue, ``summary["pannuke"]`` also holds bPQ and mPQ
    aggregated as PanNuke does (per tissue, then over tissues; ``aggregate_panoptic``), which
    differs from ``mean_mpq``, the mean over tiles. ``params``: the post-processing; by
    default the settings ``cmdfed train tune`` chose for the checkpoint, else HoVer-Net's
    scaled to the store's resolution (``WatershedParams.for_mpp``).

    A model with a stain reference sees the tiles stain-normalised (:class:`ModelTiles`).
    """
    if batch_size < 1:
        raise CmdfedError(f"--batch-size must be at least 1, got {batch_size}")
    site = SiteStore.open(store)
    indices = site.labelled_indices() if indices is None else np.asarray(indices)
    if indices.size == 0:
        raise CmdfedError(f"{store} has no labelled tiles to evaluate on")
    if params is None:
        params, source = postprocess_for(loaded.checkpoint, site.mpp)
    else:
        source = "given"
    with_types = site.has_types and loaded.config.n_classes > 0
    if with_types and loaded.class_names != site.class_names:
        raise CmdfedError(
            f"the model classifies {', '.join(loaded.class_names[1:])} but {site.name} is labelled with "
            f"{', '.join(site.class_names[1:])}; type ids would be compared across different classes: evaluate on "
            "a store imported with the model's classes"
        )
    tiles = ModelTiles(site, indices, loaded.stain_reference)
    per_image = []
    for start in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[start : start + batch_size]]
        images = tiles.images(chunk)
        maps = predict_maps(loaded.model, images, loaded.device, loaded.encoder)
        for k, index in enumerate(chunk):
            result = postprocess(maps["np"][k], maps["hv"][k], maps["nc"][k] if "nc" in maps else None, params)
            per_image.append(
                evaluate_instances(
                    site.instances(index),
                    result.instance_map,
                    site.types(index) if with_types else None,
                    result.type_map if with_types else None,
                )
            )
        report(progress, min(start + batch_size, len(indices)), len(indices), "tiles")
    summary = summarize(per_image)
    tissues = [str(site.metadata("tissue")[i]) for i in indices]
    if all(tissues):
        summary["pannuke"] = aggregate_panoptic(per_image, tissues)
    summary["postprocess"] = params.to_dict()
    summary["postprocess_source"] = source
    summary["stain_normalised"] = loaded.stain_reference is not None
    summary["tiles"] = len(indices)
    summary["store"] = site.name
    summary["checkpoint"] = str(loaded.checkpoint)
    return summary


class ModelTiles:
    """A store's tiles as the model should see them: re-stained as its stain ``reference`` (when it
    has one) from the stains of the tiles of the same source image among ``indices``, estimated
    together, as a slide is normalised as a whole rather than tile by tile; a source with too
    little stain stays as it is."""

    def __init__(self, site: SiteStore, indices: np.ndarray, reference: HEStains | None):
        self.site, self.reference = site, reference
        self.sources = site.metadata("source")
        self.stains: dict[str, HEStains | None] = {}
        if reference is None:
            return
        indices = np.asarray(indices)
        for name in np.unique(self.sources[indices]):
            tiles = indices[self.sources[indices] == name]
            self.stains[name] = source_stains(site.stain_sample(tiles))

    def images(self, chunk: list[int]) -> np.ndarray:
        """The tiles ``chunk`` (indices among those given) as a uint8 (B, H, W, 3) batch."""
        images = []
        for index in chunk:
            image, source = self.site.image(index), self.stains.get(self.sources[index])
            images.append(image if source is None else macenko(image, source, self.reference))
        return np.stack(images)


def evaluate_checkpoint(
    checkpoint: str | Path,
    store: str | Path,
    *,
    device: torch.device,
    fm_weights: str | Path | None = None,
    stain_normalise: bool = True,
    **options,
) -> dict:
    loaded = load_model(checkpoint, device, fm_weights=fm_weights, stain_normalise=stain_normalise)
    return evaluate_model(loaded, store, **options)
