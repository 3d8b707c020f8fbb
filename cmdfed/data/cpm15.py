"""CPM-15: real H&E nuclei with expert instance masks, shipped inside the package.

Ten H&E tiles (``bundled/cpm15/imageNN.png``, 439-1032 px a side) from TCGA brain-tumour
whole-slide images with instance masks (``imageNN_inst.png``, uint16, 0 = background), from
the MICCAI 2015 "Segmentation of Nuclei in Digital Pathology Images" challenge training set
(images 01-10 of 15; the other five are kept back as an unseen evaluation set). The images
come from The Cancer Genome Atlas (TCGA); see ``bundled/cpm15/README.md`` for origin and terms.
2,337 nuclei in all.

Images 01-07 were scanned at 20x (about 0.5 um/px), 08-10 at 40x (about 0.25 um/px). The
development split every benchmark and the released models' cards use: 01-07 train,
08-10 test, scored at 20x (the 40x images resampled to 0.5 um/px: bilinear for the image,
nearest for the mask, as a scanner's 20x level would be read).

``cmdfed data import cpm15`` writes any subset of them to a site store at one resolution.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

from cmdfed.errors import CmdfedError

# Scanning resolution of each image (the challenge gives magnifications, not um/px).
MPP: dict[str, float] = {**{f"{i:02d}": 0.5 for i in range(1, 8)}, **{f"{i:02d}": 0.25 for i in range(8, 11)}}
TRAIN_IDS = tuple(f"{i:02d}" for i in range(1, 8))
TEST_IDS = ("08", "09", "10")
ORIGIN = (
    "CPM-15: TCGA brain-tumour H&E (The Cancer Genome Atlas) with expert nuclei instance masks, "
    "from the MICCAI 2015 'Segmentation of Nuclei in Digital Pathology Images' challenge "
    "training set, images 01-10"
)


def data_dir() -> Path:
    return Path(str(files("cmdfed.data") / "bundled" / "cpm15"))


def parse_ids(spec: str) -> list[str]:
    """'01-07', '8,9,10', 'all' or 'train'/'test' -> sorted image ids; a clear error otherwise."""
    named = {"all": tuple(MPP), "train": TRAIN_IDS, "test": TEST_IDS}
    if spec in named:
        return list(named[spec])
    ids: set[str] = set()
    try:
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            for number in range(int(low), int(high or low) + 1):
                ids.add(f"{number:02d}")
    except ValueError:
        raise CmdfedError(f"cannot read image ids {spec!r}; give e.g. 01-07, 8,9,10, train, test or all") from None
    unknown = sorted(ids - set(MPP))
    if unknown or not ids:
        raise CmdfedError(f"CPM-15 has images 01-10; {', '.join(unknown) or 'none'} asked for")
    return sorted(ids)


def resample_pair(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear) and instance labels (nearest) scaled by ``factor``; 1 = unchanged."""
    if abs(factor - 1.0) < 1e-6:
        return image, labels
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)
    resized_labels = Image.fromarray(labels.astype(np.int32)).resize(size, Image.Resampling.NEAREST)
    return np.asarray(resized), np.asarray(resized_labels).astype(np.int32)


def load_pair(image_id: str, mpp: float | None = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 image and int32 instance map of one image at ``mpp`` (None: as scanned)."""
    if image_id not in MPP:
        raise CmdfedError(f"CPM-15 has images 01-10, not {image_id!r}")
    folder = data_dir()
    image = np.asarray(Image.open(folder / f"image{image_id}.png").convert("RGB"))
    labels = np.asarray(Image.open(folder / f"image{image_id}_inst.png")).astype(np.int32)
    if mpp is None:
        return image, labels
    return resample_pair(image, labels, MPP[image_id] / mpp)


def write_store(
    path: str | Path,
    image_ids: list[str],
    *,
    tile_size: int = 256,
    overlap: int = 0,
    mpp: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """A labelled site store of ``image_ids`` resampled to ``mpp``, cut into tiles."""
    from cmdfed.data.importers.common import image_tiles
    from cmdfed.data.store import create_store

    with create_store(path, tile_size=tile_size, mpp=mpp, overwrite=overwrite) as store, store.writer() as writer:
        for image_id in image_ids:
            image, labels = load_pair(image_id, mpp)
            writer.extend(
                image_tiles(
                    image,
                    labels,
                    None,
                    tile_size=tile_size,
                    overlap=overlap,
                    source="cpm15",
                    slide_id=f"cpm15-image{image_id}",
                    tissue="brain",
                    mpp=mpp,
                )
            )
    return Path(path)
