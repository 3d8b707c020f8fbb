"""Watershed settings chosen for one model on labelled validation tiles (`cmdfed train tune`).

HoVer-Net's post-processing settings were tuned by its authors for their model at 40x;
``WatershedParams.for_mpp`` scales them to a resolution, but how sharp a model's NP and HV
maps are is the model's own: a weak model's noisy HV maps want a larger Sobel aperture
and a lower marker threshold than a strong one's. So the settings are searched per model,
on tiles it was not trained on, for the best mean PQ (the metric that counts both
detection and segmentation quality, Kirillov et al. 2019).

Search: coordinate ascent from the resolution-scaled defaults. Each setting in turn takes
the candidate value that maximises mean PQ with the others fixed; passes repeat until a
pass changes nothing (at most ``passes``). The model runs once: its maps are kept and only
the post-processing is repeated, so a search costs a few dozen post-processings of the
validation tiles. Spatial candidates (Sobel aperture, opening, minimum size) are multiples
of their scaled defaults, so the same search fits any resolution.

The choice is written beside the weights as ``postprocess.json`` (settings, the resolution
they hold at, the store, tile count, PQ before and after); ``cmdfed predict``, ``cmdfed
train evaluate`` and ``cmdfed edge export`` use it unless told otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from cmdfed.atomic import write_json_atomic
from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.metrics import evaluate_instances, summarize
from cmdfed.evaluate.run import ModelTiles
from cmdfed.inference.postprocess import TUNED_FILE, WatershedParams, postprocess
from cmdfed.inference.segment import LoadedModel, predict_maps
from cmdfed.progress import Progress, report

THRESHOLDS = {
    "foreground_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "marker_gradient_threshold": (0.2, 0.3, 0.4, 0.5, 0.6),
}
SPATIAL_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)


def candidates(name: str, start: WatershedParams) -> list:
    """Values tried for setting ``name`` around ``start`` (valid for WatershedParams)."""
    if name in THRESHOLDS:
        return list(THRESHOLDS[name])
    base = getattr(start, name)
    if name == "sobel_kernel_size":
        values = {min(31, max(3, 2 * int(base * f / 2) + 1)) for f in SPATIAL_FACTORS}
    elif name == "marker_opening_size":
        values = {max(1, int(base * f + 0.5)) for f in SPATIAL_FACTORS}
    else:  # min_object_size, an area
        values = {0, *(max(1, int(base * f * f + 0.5)) for f in SPATIAL_FACTORS)}
    return sorted(values)


def _mean_pq(maps: list[dict], truths: list[np.ndarray], params: WatershedParams) -> tuple[float, float]:
    results = [
        evaluate_instances(truth, postprocess(m["np"], m["hv"], params=params).instance_map)
        for m, truth in zip(maps, truths)
    ]
    summary = summarize(results)
    return float(summary["mean_pq"]), float(summary["mean_aji"])


def search(
    maps: list[dict],
    truths: list[np.ndarray],
    start: WatershedParams,
    *,
    passes: int = 2,
    progress: Progress | None = None,
) -> tuple[WatershedParams, list[dict]]:
    """Coordinate ascent on mean PQ from ``start`` (see the module docstring); returns the
    best settings and every evaluation made, in order."""
    best = start
    best_pq, best_aji = _mean_pq(maps, truths, best)
    trail = [{"params": asdict(best), "pq": best_pq, "aji": best_aji}]
    names = list(asdict(start))
    for done_passes in range(passes):
        changed = False
        for name in names:
            for value in candidates(name, start):
                if value == getattr(best, name):
                    continue
                trial = replace(best, **{name: value})
                pq, aji = _mean_pq(maps, truths, trial)
                trail.append({"params": asdict(trial), "pq": pq, "aji": aji})
                if pq > best_pq + 1e-6:
                    best, best_pq, best_aji, changed = trial, pq, aji, True
            report(progress, done_passes * len(names) + names.index(name) + 1, passes * len(names), "settings")
        if not changed:
            break
    return best, trail


def tune_postprocess(
    loaded: LoadedModel,
    store: str | Path,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 8,
    passes: int = 2,
    progress: Progress | None = None,
) -> dict:
    """Search the watershed settings for ``loaded`` on the labelled tiles of ``store`` (or the
    ``indices`` among them) and write them beside its weights (``postprocess.json``); returns
    what was written."""
    site = SiteStore.open(store)
    indices = site.labelled_indices() if indices is None else np.intersect1d(indices, site.labelled_indices())
    if indices.size == 0:
        raise CmdfedError(
            f"{store} has no labelled tiles; tuning needs instance labels: give a labelled "
            "validation store (cmdfed data import ..., never the tiles the model trained on)"
        )
    if site.mpp is None or not math.isfinite(site.mpp):
        raise CmdfedError(
            f"{store} does not record its resolution (mpp), and the settings hold only at one "
            "resolution: re-import it with --mpp"
        )
    maps, truths = [], []
    tiles = ModelTiles(site, indices, loaded.stain_reference)  # tuned on what inference will see
    for start in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[start : start + batch_size]]
        batch = predict_maps(loaded.model, tiles.images(chunk), loaded.device, loaded.encoder)
        maps += [{"np": batch["np"][k], "hv": batch["hv"][k]} for k in range(len(chunk))]
        truths += [site.instances(i) for i in chunk]
        report(progress, start + len(chunk), len(indices), "tiles")
    start_params = WatershedParams.for_mpp(site.mpp)
    best, trail = search(maps, truths, start_params, passes=passes, progress=progress)
    record = {
        "params": asdict(best),
        "mpp": float(site.mpp),
        "store": site.name,
        "tiles": len(indices),
        "pq_scaled_defaults": trail[0]["pq"],
        "aji_scaled_defaults": trail[0]["aji"],
        "pq": max(t["pq"] for t in trail),
        "aji": next(t["aji"] for t in trail if t["params"] == asdict(best)),
        "evaluations": len(trail),
    }
    write_json_atomic(loaded.checkpoint / TUNED_FILE, record)
    return {**record, "written": str(loaded.checkpoint / TUNED_FILE)}
