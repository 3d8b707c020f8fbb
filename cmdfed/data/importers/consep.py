"""CoNSeP: 41 colorectal adenocarcinoma H&E images (1000x1000 px, 40x) with typed nuclei.

Source: Graham et al., "HoVer-Net: Simultaneous segmentation and classification of nuclei in
multi-tissue histology images", Medical Image Analysis 2019; the dataset README
(https://warwick.ac.uk/fac/cross_fac/tia/data/hovernet) and vqdang/hover_net's loader.

Layout of one split (``CoNSeP/Train`` or ``CoNSeP/Test``; folder names matched ignoring case)::

    Images/<name>.png     RGB or RGBA (the release's PNGs carry an alpha channel, dropped here)
    Labels/<name>.mat     MATLAB v5: inst_map (H, W) instance ids, type_map (H, W) class per
                          pixel, inst_type (N, 1), inst_centroid (N, 2)
    Overlay/              renderings for viewing, ignored

Only ``inst_map`` and ``type_map`` are read: together they are the per-pixel labels,
which is how HoVer-Net reads them too. Pass one split: importing Train and Test into one
store would mix test images into training.

Classes: 1 other, 2 inflammatory, 3 healthy epithelial, 4 dysplastic/malignant epithelial,
5 fibroblast, 6 muscle, 7 endothelial. With ``merge_classes`` (the default) they are
merged as in HoVer-Net's paper and code: 3 and 4 become epithelial, 5, 6 and 7
spindle-shaped, giving other, inflammatory, epithelial, spindle-shaped.

Images were scanned at 40x (mpp 0.25) and are cut into tiles; CoNSeP is colon tissue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmdfed.data.importers.common import (
    ImportPlan,
    SourceImage,
    as_label_map,
    check_same_shape,
    load_mat,
    pair_by_stem,
    run_import,
)
from cmdfed.data.store import StoreInfo
from cmdfed.errors import CmdfedError
from cmdfed.images import read_rgb
from cmdfed.progress import Progress

ORIGINAL_CLASS_NAMES = [
    "background",
    "other",
    "inflammatory",
    "healthy epithelial",
    "dysplastic/malignant epithelial",
    "fibroblast",
    "muscle",
    "endothelial",
]
MERGED_CLASS_NAMES = ["background", "other", "inflammatory", "epithelial", "spindle-shaped"]
# Index: original class; value: merged class.
MERGE_LOOKUP = np.array([0, 1, 2, 3, 3, 4, 4, 4], np.uint8)
MPP = 0.25
TISSUE = "Colon"


def _child_dir(parent: Path, name: str) -> Path | None:
    matches = [p for p in parent.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
    return matches[0] if matches else None


def find_split_folders(split: Path) -> tuple[Path, Path]:
    """The ``Images`` and ``Labels`` folders of a CoNSeP split."""
    images, labels = _child_dir(split, "Images"), _child_dir(split, "Labels")
    if images is None or labels is None:
        splits = [p.name for p in split.iterdir() if p.is_dir() and _child_dir(p, "Images")]
        hint = (
            f"it holds the splits {', '.join(sorted(splits))}; import each into its own store"
            if splits
            else "pass a CoNSeP split folder (e.g. CoNSeP/Train) holding Images/ and Labels/"
        )
        missing = " and ".join(n for n, p in (("Images/", images), ("Labels/", labels)) if p is None)
        raise CmdfedError(f"{split} has no {missing}; {hint}")
    return images, labels


def read_labels(path: Path, merge_classes: bool) -> tuple[np.ndarray, np.ndarray]:
    content = load_mat(path, ("inst_map", "type_map"), "CoNSeP")
    instances = as_label_map(content["inst_map"], path, "inst_map")
    types = as_label_map(content["type_map"], path, "type_map")
    if instances.shape != types.shape:
        raise CmdfedError(f"{path}: inst_map is {instances.shape} but type_map is {types.shape}")
    if types.max() >= len(ORIGINAL_CLASS_NAMES):
        raise CmdfedError(
            f"{path}: type_map holds class {types.max()}, but CoNSeP classes are 1-7; is it a CoNSeP label file?"
        )
    types = types.astype(np.uint8)
    return instances, MERGE_LOOKUP[types] if merge_classes else types


def import_consep(
    source_path: str | Path,
    store_path: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    merge_classes: bool = True,
) -> StoreInfo:
    """Import one CoNSeP split folder into a new site store; see the module docstring."""

    def plan(split: Path) -> ImportPlan:
        image_dir, label_dir = find_split_folders(split)
        pairs = pair_by_stem(image_dir.glob("*.png"), label_dir.glob("*.mat"), split, "Labels/*.mat file")
        return ImportPlan(
            items=pairs,
            read=lambda pair: read_pair(*pair, merge_classes),
            source="consep",
            class_names=MERGED_CLASS_NAMES if merge_classes else ORIGINAL_CLASS_NAMES,
            has_types=True,
            mpp=MPP,
        )

    return run_import(
        source_path,
        store_path,
        plan,
        what="CoNSeP split folder (e.g. CoNSeP/Train)",
        tile_size=tile_size,
        overlap=overlap,
        overwrite=overwrite,
        progress=progress,
    )


def read_pair(image_file: Path, label_file: Path, merge_classes: bool) -> SourceImage:
    image = read_rgb(image_file)
    instances, types = read_labels(label_file, merge_classes)
    check_same_shape(image, instances, image_file, label_file)
    return SourceImage(image, instances, types, image_file.stem, TISSUE, MPP)
