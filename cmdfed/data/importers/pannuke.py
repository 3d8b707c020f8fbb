"""PanNuke: 256x256 H&E patches from 19 tissues with five nucleus classes, in NumPy arrays.

Source: the dataset's own README and download (https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke)
and Gamper et al., "PanNuke Dataset Extension, Insights and Baselines", arXiv:2003.10778.

Layout of one fold as downloaded (``fold_1.zip``)::

    Fold 1/
      images/fold1/images.npy   (N, 256, 256, 3) float64, RGB values 0-255
      images/fold1/types.npy    (N,) str, the tissue of each patch ("Breast", "Colon", ...)
      masks/fold1/masks.npy     (N, 256, 256, 6) float64, one instance map per channel

Some re-packaged copies put the three files side by side; either way the fold folder is
passed and each file is found by name below it (exactly one of each, so passing the parent
of several folds is an error rather than a silent mix).

``masks.npy`` channels: 0 neoplastic, 1 inflammatory, 2 connective/soft tissue, 3 dead,
4 epithelial, 5 background (the README calls it "6", but there are six channels).
Channels 0-4 each hold instance ids of that class; ids are not guaranteed unique across
channels, so every (channel, id) pair gets its own new id and the type is channel + 1.
Where two channels claim the same pixel (rare), the later channel wins.

PanNuke was scanned at 40x, so mpp is 0.25. The arrays are memory-mapped
(``np.load(mmap_mode="r")``): a 2.6k-patch fold's masks are 8 GB of float64, and only one
patch is in memory at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmdfed.data.importers.common import (
    ImportPlan,
    SourceImage,
    as_label_map,
    run_import,
)
from cmdfed.data.store import StoreInfo
from cmdfed.errors import CmdfedError
from cmdfed.images import to_rgb_uint8
from cmdfed.progress import Progress

CLASS_NAMES = ["background", "neoplastic", "inflammatory", "connective", "dead", "epithelial"]
CLASS_CHANNELS = 5  # channels 0-4 are classes; channel 5 is background
MASK_CHANNELS = 6
MPP = 0.25
NPY_MAGIC = b"\x93NUMPY"


def find_fold_file(fold: Path, name: str) -> Path:
    """The one file called ``name`` at any depth under the fold folder."""
    found = sorted(fold.rglob(name))
    if not found:
        raise CmdfedError(f"no {name} under {fold}; pass a PanNuke fold folder such as 'Fold 1'")
    if len(found) > 1:
        raise CmdfedError(
            f"{len(found)} files named {name} under {fold} "
            f"({', '.join(str(f) for f in found[:3])}); "
            "pass one fold folder and import each fold into its own store"
        )
    return found[0]


def load_array(path: Path, *, mmap: bool) -> np.ndarray:
    with open(path, "rb") as file:
        if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise CmdfedError(f"{path} is not a NumPy .npy file (no .npy header); pass a PanNuke fold as downloaded")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CmdfedError(
            f"cannot read {path} ({exc}); the file is damaged or truncated, re-download the fold"
        ) from exc


def combine_class_channels(mask: np.ndarray, file: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One instance map with unique ids and one type map from PanNuke's per-class channels."""
    instances = np.zeros(mask.shape[:2], np.int32)
    types = np.zeros(mask.shape[:2], np.uint8)
    next_id = 1
    for channel in range(CLASS_CHANNELS):
        ids = as_label_map(mask[..., channel], file, f"patch {index} channel {channel}")
        present = ids > 0
        if not present.any():
            continue
        channel_ids = np.unique(ids[present])
        instances[present] = next_id + np.searchsorted(channel_ids, ids[present])
        types[present] = channel + 1
        next_id += channel_ids.size
    return instances, types


def _check_arrays(images: np.ndarray, masks: np.ndarray, tissues: np.ndarray, files: dict[str, Path]) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise CmdfedError(f"{files['images']} has shape {images.shape}; PanNuke images are (N, 256, 256, 3)")
    if masks.ndim != 4 or masks.shape[-1] != MASK_CHANNELS:
        raise CmdfedError(f"{files['masks']} has shape {masks.shape}; PanNuke masks are (N, 256, 256, 6)")
    if masks.shape[:3] != images.shape[:3]:
        raise CmdfedError(
            f"{files['masks']} has shape {masks.shape} but {files['images']} has {images.shape}; "
            "both must come from the same fold"
        )
    if tissues.shape != images.shape[:1]:
        raise CmdfedError(
            f"{files['types']} names {tissues.size} tissues for {images.shape[0]} images; "
            "both must come from the same fold"
        )


def import_pannuke(
    source_path: str | Path,
    store_path: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StoreInfo:
    """Import one PanNuke fold folder into a new site store; see the module docstring."""

    def plan(fold: Path) -> ImportPlan:
        files = {key: find_fold_file(fold, f"{key}.npy") for key in ("images", "masks", "types")}
        images = load_array(files["images"], mmap=True)
        masks = load_array(files["masks"], mmap=True)
        tissues = load_array(files["types"], mmap=False)
        _check_arrays(images, masks, tissues, files)

        def read(index: int) -> SourceImage:
            image = to_rgb_uint8(images[index], files["images"])
            instances, types = combine_class_channels(np.asarray(masks[index]), files["masks"], index)
            return SourceImage(image, instances, types, f"{fold.name}/{index}", str(tissues[index]), MPP)

        return ImportPlan(
            items=range(images.shape[0]),
            read=read,
            source="pannuke",
            class_names=CLASS_NAMES,
            has_types=True,
            mpp=MPP,
            unit="patches",
        )

    return run_import(
        source_path,
        store_path,
        plan,
        what="PanNuke fold folder (e.g. 'Fold 1')",
        tile_size=tile_size,
        overlap=overlap,
        overwrite=overwrite,
        progress=progress,
    )
