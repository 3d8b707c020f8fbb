"""A plain folder of images and instance masks, for data that is in no published format.

Layout (only the folder itself is read, not sub-folders)::

    NAME.png | .tif | .tiff | .jpg | .jpeg     the image (grey, RGB or RGBA; 8 or 16 bit)
    NAME_inst.png | .tif | .tiff               its instance map: 0 background, 1..k nuclei
                                               (8, 16 or 32 bit integers, one id per nucleus)
    NAME_types.png | .tif | .tiff              optional class map: 0 background, c = class c

Masks must be lossless, hence no JPEG. The suffixes are options (``inst_suffix``,
``types_suffix``). Either every labelled image has a type map or none does; with type maps,
``class_names`` must say what the classes are (background first), because sites that train
together have to agree on them and cmdfed cannot guess. An image without a mask is an
error unless ``allow_unlabelled``, when it becomes unlabelled tiles (``labelled`` False)
for self-supervised use. ``mpp`` is unknown (NaN) unless given.

Example: the MICCAI 2015 nuclei-segmentation images as ``image01.png`` +
``image01_inst.png`` (uint16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdfed.data.importers.common import (
    ImportPlan,
    SourceImage,
    as_label_map,
    check_same_shape,
    run_import,
)
from cmdfed.data.store import StoreInfo
from cmdfed.errors import CmdfedError
from cmdfed.images import read_image_file, read_rgb
from cmdfed.progress import Progress

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
DEFAULT_CLASS_NAMES = ("background", "nucleus")


@dataclass
class Sample:
    image: Path
    instances: Path | None = None
    types: Path | None = None


def _listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def find_samples(folder: Path, inst_suffix: str, types_suffix: str) -> list[Sample]:
    """Group the folder's files into image + masks by name; reject ambiguous or orphaned files."""
    files: dict[str, dict[str, Path]] = {"image": {}, "instances": {}, "types": {}}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        suffix, stem = path.suffix.lower(), path.stem
        is_mask = stem.endswith((inst_suffix, types_suffix))
        if is_mask and suffix in IMAGE_SUFFIXES and suffix not in MASK_SUFFIXES:
            raise CmdfedError(
                f"{path.name} is named as a mask but is {suffix[1:].upper()}, which is lossy: its nucleus ids "
                f"are not kept exactly; save the mask as {' or '.join(MASK_SUFFIXES)} (or rename it if it is an image)"
            )
        if stem.endswith(inst_suffix) and suffix in MASK_SUFFIXES:
            kind, name = "instances", stem[: -len(inst_suffix)]
        elif stem.endswith(types_suffix) and suffix in MASK_SUFFIXES:
            kind, name = "types", stem[: -len(types_suffix)]
        elif suffix in IMAGE_SUFFIXES:
            kind, name = "image", stem
        else:
            continue
        if name in files[kind]:
            raise CmdfedError(f"{files[kind][name]} and {path} are both the {kind} of {name!r}; keep one")
        files[kind][name] = path
    images = files["image"]
    if not images:
        raise CmdfedError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; is it the right folder?")
    orphans = sorted(p.name for kind in ("instances", "types") for n, p in files[kind].items() if n not in images)
    if orphans:
        raise CmdfedError(f"masks without an image in {folder}: {_listing(orphans)}; rename or remove them")
    untyped_masks = sorted(files["types"][n].name for n in files["types"] if n not in files["instances"])
    if untyped_masks:
        raise CmdfedError(
            f"type maps without an instance mask in {folder}: {_listing(untyped_masks)}; "
            f"add the NAME{inst_suffix} files"
        )
    return [Sample(images[n], files["instances"].get(n), files["types"].get(n)) for n in sorted(images)]


def _check_labelling(
    samples: list[Sample], folder: Path, inst_suffix: str, types_suffix: str, allow_unlabelled: bool
) -> None:
    unlabelled = [s.image.name for s in samples if s.instances is None]
    if unlabelled and not allow_unlabelled:
        raise CmdfedError(
            f"images without an instance mask (NAME{inst_suffix}.png/.tif) in {folder}: "
            f"{_listing(unlabelled)}; add the masks, or pass allow_unlabelled "
            "(--allow-unlabelled) to import them as unlabelled tiles"
        )
    labelled = [s for s in samples if s.instances is not None]
    typed = [s for s in labelled if s.types is not None]
    if typed and len(typed) != len(labelled):
        missing = [s.image.name for s in labelled if s.types is None]
        raise CmdfedError(
            f"some images in {folder} have type maps and some do not: {_listing(missing)} lack "
            f"NAME{types_suffix}; give every labelled image a type map or none"
        )


def read_sample(sample: Sample, n_classes: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    image = read_rgb(sample.image)
    instances = types = None
    if sample.instances is not None:
        instances = as_label_map(read_image_file(sample.instances, labels=True), sample.instances, "instance mask")
        check_same_shape(image, instances, sample.image, sample.instances)
    if sample.types is not None:
        types = as_label_map(read_image_file(sample.types, labels=True), sample.types, "type map")
        check_same_shape(image, types, sample.image, sample.types)
        if types.max() >= n_classes:
            raise CmdfedError(
                f"{sample.types} holds class {types.max()} but only {n_classes - 1} classes "
                "are named; pass all class names (background first)"
            )
    return image, instances, types


def import_folder(
    source_path: str | Path,
    store_path: str | Path,
    *,
    tile_size: int = 256,
    overlap: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    inst_suffix: str = "_inst",
    types_suffix: str = "_types",
    class_names: Sequence[str] | None = None,
    mpp: float | None = None,
    tissue: str = "",
    allow_unlabelled: bool = False,
) -> StoreInfo:
    """Import a folder of images with NAME_inst (and NAME_types) masks; see the module docstring."""
    if not inst_suffix or not types_suffix or inst_suffix == types_suffix:
        raise CmdfedError(f"mask suffixes must be non-empty and different (got {inst_suffix!r} and {types_suffix!r})")

    def plan(folder: Path) -> ImportPlan:
        samples = find_samples(folder, inst_suffix, types_suffix)
        _check_labelling(samples, folder, inst_suffix, types_suffix, allow_unlabelled)
        has_types = any(s.types is not None for s in samples)
        if has_types and class_names is None:
            raise CmdfedError(
                f"{folder} has type maps ({types_suffix}); pass class_names (background first) "
                "to say what each class number means"
            )
        if class_names is not None and not has_types:
            raise CmdfedError(f"class_names were given but {folder} has no type maps (NAME{types_suffix})")
        names = list(class_names) if class_names is not None else list(DEFAULT_CLASS_NAMES)
        if mpp is not None and not mpp > 0:
            raise CmdfedError(f"mpp must be positive (got {mpp})")
        store_mpp = float("nan") if mpp is None else float(mpp)

        def read(sample) -> SourceImage:
            image, instances, types = read_sample(sample, len(names))
            return SourceImage(image, instances, types, sample.image.stem, tissue, store_mpp)

        return ImportPlan(
            items=samples,
            read=read,
            source=folder.name,
            class_names=names,
            has_types=has_types,
            mpp=store_mpp,
        )

    return run_import(
        source_path,
        store_path,
        plan,
        what="folder of images and their masks",
        tile_size=tile_size,
        overlap=overlap,
        overwrite=overwrite,
        progress=progress,
    )
