"""Lizard: colon H&E regions at 20x with about half a million typed nuclei.

Source: Graham et al., "Lizard: A Large-Scale Dataset for Colonic Nuclear Instance
Segmentation and Classification", ICCV workshops 2021; the README and ``read_label.py``
shipped in ``lizard_labels.zip`` (https://warwick.ac.uk/fac/cross_fac/tia/data/lizard).

Layout: PNG images in any folder whose name contains "images" and .mat labels in any
folder whose name contains "labels", paired by file name. This covers both a tidy
``images/`` + ``labels/`` folder and the download as unzipped::

    lizard_images1/Lizard_Images1/<name>.png
    lizard_images2/Lizard_Images2/<name>.png
    lizard_labels/Lizard_Labels/Labels/<name>.mat

Each .mat (MATLAB v5) holds ``inst_map`` (H, W) int32 instance ids, ``id`` (N, 1) the ids of
the nuclei, ``class`` (N, 1) the class of each nucleus in the same order, ``bbox`` (N, 4) and
``centroid`` (N, 2). The type map is ``class`` looked up through ``id`` for every pixel of
``inst_map``; a nucleus id in the map without a class is an error.

Classes: 1 neutrophil, 2 epithelial, 3 lymphocyte, 4 plasma, 5 eosinophil, 6 connective
tissue (the shipped README names class 5 "Neutrophil" by mistake; the paper says eosinophil).
All regions are from colon at 20x (mpp 0.5).
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

CLASS_NAMES = [
    "background",
    "neutrophil",
    "epithelial",
    "lymphocyte",
    "plasma",
    "eosinophil",
    "connective",
]
MPP = 0.5
TISSUE = "Colon"


def _under_folder_named(root: Path, pattern: str, word: str) -> list[Path]:
    """Files matching ``pattern`` below ``root`` inside a folder whose name contains ``word``."""
    return [
        path for path in root.rglob(pattern) if any(word in part.lower() for part in path.relative_to(root).parts[:-1])
    ]


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    content = load_mat(path, ("inst_map", "id", "class"), "Lizard")
    instances = as_label_map(content["inst_map"], path, "inst_map")
    nucleus_ids = np.asarray(content["id"]).reshape(-1).astype(np.int64)
    classes = np.asarray(content["class"]).reshape(-1).astype(np.int64)
    if nucleus_ids.size != classes.size:
        raise CmdfedError(f"{path}: 'id' lists {nucleus_ids.size} nuclei but 'class' {classes.size}")
    if classes.size and (classes.min() < 1 or classes.max() >= len(CLASS_NAMES)):
        raise CmdfedError(f"{path}: 'class' holds {classes.min()}..{classes.max()}; Lizard classes are 1-6")
    in_map = np.unique(instances[instances > 0])
    unclassified = np.setdiff1d(in_map, nucleus_ids)
    if unclassified.size:
        raise CmdfedError(
            f"{path}: nuclei {', '.join(map(str, unclassified[:5]))} of inst_map are missing "
            "from 'id', "
            "so their class is unknown; the label file is inconsistent"
        )
    # Nuclei listed in 'id' but absent from inst_map have no pixels to type; skip them.
    lookup = np.zeros(int(instances.max()) + 1, np.uint8)
    listed = (nucleus_ids > 0) & (nucleus_ids < lookup.size)
    lookup[nucleus_ids[listed]] = classes[listed]
    return instances, lookup[instances]


def import_lizard(
    source_path: str | Path,
    store_path: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StoreInfo:
    """Import a Lizard folder (images and labels) into a new site store; see module docstring."""

    def plan(root: Path) -> ImportPlan:
        pairs = pair_by_stem(
            _under_folder_named(root, "*.png", "images"),
            _under_folder_named(root, "*.mat", "labels"),
            root,
            "label .mat file",
        )
        return ImportPlan(
            items=pairs,
            read=lambda pair: read_pair(*pair),
            source="lizard",
            class_names=CLASS_NAMES,
            has_types=True,
            mpp=MPP,
        )

    return run_import(
        source_path,
        store_path,
        plan,
        what="Lizard folder holding the image and label folders",
        tile_size=tile_size,
        overlap=overlap,
        overwrite=overwrite,
        progress=progress,
    )


def read_pair(image_file: Path, label_file: Path) -> SourceImage:
    image = read_rgb(image_file)
    instances, types = read_labels(label_file)
    check_same_shape(image, instances, image_file, label_file)
    return SourceImage(image, instances, types, image_file.stem, TISSUE, MPP)
