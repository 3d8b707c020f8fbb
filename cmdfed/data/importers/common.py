"""What every dataset importer shares: reading and checking files, cutting tiles, writing stores.

The skeleton (:func:`run_import`)
    Every importer is ``require_dir -> check grid and target -> find and pair the source's
    files -> read each image with its labels -> cut tiles -> write the store``. Only the
    middle differs between formats, so an importer gives :func:`run_import` a ``plan``
    function: from the source folder to an :class:`ImportPlan` (the items to read, how to
    read one into a :class:`SourceImage`, and the store's class names and resolution).

Tiling (:func:`cut_tiles`)
    Tiles sit on :mod:`cmdfed.inference.tiling`'s grid, its last row and column flush with
    the image edge, so an image at least one tile large is covered without padding.
    Images smaller than a tile are padded at the bottom/right with constant white, not by
    reflection: reflection would mirror real nuclei into the padding while the labels there
    say background, teaching the model that nuclei are background. White is what empty
    glass looks like in a bright-field slide, and padding pixels are background (0) in the
    labels. ``tissue_fraction`` of such a tile is the share of real (unpadded) pixels.

Labels
    Instance ids are renumbered 1..k within every tile
    (``skimage.segmentation.relabel_sequential``), as the store requires; a nucleus cut by a
    tile edge therefore appears in both tiles, under whatever id each tile gives it.
    Type maps are cropped unchanged.

Images are read by :mod:`cmdfed.images`.

Writing (:func:`write_store`)
    Through :func:`cmdfed.data.store.create_store`: the store is built at a hidden sibling of
    the target and renamed into place only when every tile is written, so a failed or
    interrupted import leaves no half-written store at the target (and an old store there,
    with ``overwrite``, stays as it was). :func:`check_target` runs first, before any file is
    read, and refuses to replace anything that is not a site store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.io
from skimage.segmentation import relabel_sequential

from cmdfed.data.store import StoreInfo, Tile, check_target, create_store
from cmdfed.errors import CmdfedError
from cmdfed.inference.tiling import grid_starts
from cmdfed.progress import Progress, report

PAD_VALUE = 255
INT32_MAX = np.iinfo(np.int32).max


# -- checks ------------------------------------------------------------------------------


def require_dir(path: Path, what: str) -> Path:
    """``path`` as a directory, or a CmdfedError saying what was expected there."""
    if not path.exists():
        raise CmdfedError(f"{path} does not exist; pass the {what}")
    if not path.is_dir():
        raise CmdfedError(f"{path} is a file, not a folder; pass the {what}")
    return path


def check_grid(tile_size: int, overlap: int) -> None:
    if tile_size <= 0 or tile_size % 32:
        raise CmdfedError(f"tile size must be a positive multiple of 32 (got {tile_size})")
    if not 0 <= overlap < tile_size:
        raise CmdfedError(f"overlap must be at least 0 and less than the tile size {tile_size} (got {overlap})")


def check_same_shape(image: np.ndarray, labels: np.ndarray, image_file: Path, labels_file: Path) -> None:
    if image.shape[:2] != labels.shape[:2]:
        raise CmdfedError(
            f"{labels_file} is {labels.shape[1]}x{labels.shape[0]} px but its image {image_file} "
            f"is {image.shape[1]}x{image.shape[0]} px; pair each label file with its own image"
        )


def as_label_map(array: np.ndarray, file: Path, what: str) -> np.ndarray:
    """A 2-D map of non-negative integer labels as int32 (.mat files often hold them as double)."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise CmdfedError(f"{file}: {what} must be a 2-D label map, got shape {array.shape}")
    if array.dtype == bool:
        raise CmdfedError(f"{file}: {what} is a binary mask; it must give every nucleus its own integer id")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise CmdfedError(f"{file}: {what} must hold integers, got dtype {array.dtype}")
    if array.size == 0:
        raise CmdfedError(f"{file}: {what} is empty")
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.floor(array)):
        raise CmdfedError(f"{file}: {what} holds non-integer values; it must hold integer labels")
    low, high = array.min(), array.max()
    if low < 0 or high > INT32_MAX:
        raise CmdfedError(f"{file}: {what} holds values outside 0..{INT32_MAX} ({low}..{high})")
    return array.astype(np.int32)


# -- reading -------------------------------------------------------------------------------


def load_mat(path: Path, keys: Sequence[str], dataset: str) -> dict[str, np.ndarray]:
    """The named variables of a MATLAB v5/v7 .mat file (``scipy.io.loadmat``).

    MATLAB v7.3 files are HDF5 containers that scipy cannot read; they get a clear error
    rather than half support, since the public datasets read here ship as v5 files.
    """
    try:
        content = scipy.io.loadmat(path, variable_names=list(keys))
    except NotImplementedError as exc:  # scipy's answer to a v7.3 (HDF5) file
        raise CmdfedError(
            f"{path} is a MATLAB v7.3 (HDF5) file, which cmdfed cannot read; re-save it in MATLAB "
            "with save(file, ..., '-v7'), or convert it with h5py to a v5 .mat file"
        ) from exc
    except Exception as exc:  # a damaged file surfaces as any of several scipy/zlib/struct errors
        raise CmdfedError(
            f"{path} is not a readable MATLAB .mat file ({type(exc).__name__}: {exc}); re-download it"
        ) from exc
    missing = [key for key in keys if key not in content]
    if missing:
        present = sorted(name for name, _, _ in scipy.io.whosmat(path))
        raise CmdfedError(
            f"{path} has no variable {', '.join(repr(k) for k in missing)} (it holds: "
            f"{', '.join(present) or 'nothing'}); is it a {dataset} label file?"
        )
    return {key: content[key] for key in keys}


def pair_by_stem(
    images: Iterable[Path], labels: Iterable[Path], source: Path, label_kind: str
) -> list[tuple[Path, Path]]:
    """Match image and label files by file name without suffix; every file must find its partner."""
    by_stem: dict[str, dict[str, Path]] = {"image": {}, "label": {}}
    for kind, files in (("image", images), ("label", labels)):
        for file in sorted(files):
            if file.stem in by_stem[kind]:
                raise CmdfedError(
                    f"two {kind} files are named {file.stem}: {by_stem[kind][file.stem]} and {file}; keep one"
                )
            by_stem[kind][file.stem] = file
    image_of, label_of = by_stem["image"], by_stem["label"]
    if not image_of:
        raise CmdfedError(f"no images found under {source}; is it the right folder?")
    unmatched = sorted(set(image_of) ^ set(label_of))
    if unmatched:
        names = ", ".join(
            f"{image_of[s].name} (no {label_kind})" if s in image_of else f"{label_of[s].name} (no image)"
            for s in unmatched[:5]
        )
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        raise CmdfedError(f"unpaired files under {source}: {names}{more}; every image needs its {label_kind}")
    return [(image_of[stem], label_of[stem]) for stem in sorted(image_of)]


# -- tiling --------------------------------------------------------------------------------


class TileCut(NamedTuple):
    x: int
    y: int
    image: np.ndarray
    instances: np.ndarray | None
    types: np.ndarray | None


def covered_fraction(height: int, width: int, tile_size: int) -> float:
    """Share of each tile's pixels that are real image rather than padding."""
    return min(height, tile_size) * min(width, tile_size) / tile_size**2


def _pad_to(array: np.ndarray, height: int, width: int, value: int) -> np.ndarray:
    pad = [(0, height - array.shape[0]), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="constant", constant_values=value)


def cut_tiles(
    image: np.ndarray,
    instances: np.ndarray | None,
    types: np.ndarray | None,
    tile_size: int,
    overlap: int,
) -> Iterator[TileCut]:
    """Cut an image and its labels into ``tile_size`` tiles; see the module docstring."""
    check_grid(tile_size, overlap)
    height, width = image.shape[:2]
    if height < tile_size or width < tile_size:
        padded_h, padded_w = max(height, tile_size), max(width, tile_size)
        image = _pad_to(image, padded_h, padded_w, PAD_VALUE)
        instances = None if instances is None else _pad_to(instances, padded_h, padded_w, 0)
        types = None if types is None else _pad_to(types, padded_h, padded_w, 0)
    for y in grid_starts(image.shape[0], tile_size, overlap):
        for x in grid_starts(image.shape[1], tile_size, overlap):
            window = np.s_[y : y + tile_size, x : x + tile_size]
            yield TileCut(
                x=x,
                y=y,
                image=image[window],
                instances=None if instances is None else relabel_sequential(instances[window])[0],
                types=None if types is None else types[window],
            )


def image_tiles(
    image: np.ndarray,
    instances: np.ndarray | None,
    types: np.ndarray | None,
    *,
    tile_size: int,
    overlap: int,
    source: str,
    slide_id: str,
    tissue: str,
    mpp: float,
) -> Iterator[Tile]:
    """:func:`cut_tiles` wrapped into store :class:`Tile` records carrying the image's metadata."""
    fraction = covered_fraction(image.shape[0], image.shape[1], tile_size)
    for cut in cut_tiles(image, instances, types, tile_size, overlap):
        yield Tile(
            image=cut.image,
            instances=cut.instances,
            types=None if cut.types is None else cut.types.astype(np.uint8),
            source=source,
            slide_id=slide_id,
            tissue=tissue,
            x=cut.x,
            y=cut.y,
            mpp=mpp,
            tissue_fraction=fraction,
        )


# -- writing -------------------------------------------------------------------------------


def write_store(
    store_path: Path,
    tiles: Iterable[Tile],
    *,
    overwrite: bool,
    tile_size: int,
    class_names: Sequence[str],
    has_types: bool,
    mpp: float,
) -> StoreInfo:
    """Write ``tiles`` into a new store at ``store_path``, all or nothing (see module docstring)."""
    with create_store(
        store_path,
        overwrite=overwrite,
        tile_size=tile_size,
        class_names=class_names,
        has_types=has_types,
        mpp=mpp,
    ) as store:
        with store.writer() as writer:
            writer.extend(tiles)
        if len(store) == 0:
            raise CmdfedError(f"no tiles were produced for {store_path}; the source holds no images")
    return store.info()


# -- the skeleton ---------------------------------------------------------------------------


class SourceImage(NamedTuple):
    """One image of a dataset with its labels, and what its tiles record about it."""

    image: np.ndarray
    instances: np.ndarray | None
    types: np.ndarray | None
    slide_id: str
    tissue: str
    mpp: float


@dataclass(frozen=True)
class ImportPlan:
    """What an importer found in its source folder.

    ``items``: one per source image (file pairs, array indices...), read in this order by
    ``read``. ``source``: every tile's ``source``. ``class_names``, ``has_types``, ``mpp``:
    the store's. ``unit``: what the progress bar counts.
    """

    items: Sequence[Any]
    read: Callable[[Any], SourceImage]
    source: str
    class_names: Sequence[str]
    has_types: bool
    mpp: float
    unit: str = "images"


def run_import(
    source_path: str | Path,
    store_path: str | Path,
    plan: Callable[[Path], ImportPlan],
    *,
    what: str,
    tile_size: int,
    overlap: int,
    overwrite: bool,
    progress: Progress | None,
) -> StoreInfo:
    """Import a dataset folder into a new store (see the module docstring). ``what`` names the
    folder expected at ``source_path`` in the error when it is missing."""
    root = require_dir(Path(source_path), what)
    store_path = Path(store_path)
    check_grid(tile_size, overlap)
    check_target(store_path, overwrite)
    found = plan(root)

    def tiles() -> Iterator[Tile]:
        for done, item in enumerate(found.items, start=1):
            sample = found.read(item)
            yield from image_tiles(
                sample.image,
                sample.instances,
                sample.types,
                tile_size=tile_size,
                overlap=overlap,
                source=found.source,
                slide_id=sample.slide_id,
                tissue=sample.tissue,
                mpp=sample.mpp,
            )
            report(progress, done, len(found.items), found.unit)

    return write_store(
        store_path,
        tiles(),
        overwrite=overwrite,
        tile_size=tile_size,
        class_names=found.class_names,
        has_types=found.has_types,
        mpp=found.mpp,
    )
