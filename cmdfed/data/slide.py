"""Whole-slide images: reading regions, finding tissue, cutting tiles with bounded memory.

Readers, tried in order:

* OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel, so no system package is
  needed) for scanner formats: SVS, NDPI, MRXS, SCN, BIF, Philips TIFF...
* tifffile for any other TIFF (generic pyramids with SubIFDs, OME-TIFF, plain TIFF), read
  through its zarr view, so a region read decodes only the TIFF tiles/strips it touches.
* Pillow for small plain images (PNG/JPEG), which are loaded whole.

Tissue detection: ``cmdfed.inference.tissue.tissue_mask`` on a thumbnail of the slide. A tile
is kept when the tissue fraction of its footprint reaches ``min_tissue``. Tiles lie on the
grid of :mod:`cmdfed.inference.tiling`.

Memory stays bounded whatever the slide size: the thumbnail is built band by band from the
lowest pyramid level that is large enough, tiles are read one at a time, and the store
writer holds at most one shard of tiles.
"""

from __future__ import annotations

import abc
import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
from PIL import Image

from cmdfed.data.store import SiteStore, StoreInfo, Tile, create_store
from cmdfed.errors import CmdfedError
from cmdfed.inference.tiling import SAME_RESOLUTION, grid_starts
from cmdfed.inference.tissue import tissue_mask
from cmdfed.progress import Progress, report

PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
THUMBNAIL_SIDE = 2048


class SlideReader(abc.ABC):
    """A slide as a pyramid of levels; coordinates are level-0 pixels, like OpenSlide's."""

    path: Path
    level_dimensions: list[tuple[int, int]]  # (width, height) per level
    mpp: float  # micrometres per level-0 pixel, NaN when unknown

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> list[float]:
        w0 = self.level_dimensions[0][0]
        return [w0 / w for w, _ in self.level_dimensions]

    @property
    def level_mpps(self) -> list[float]:
        """Micrometres per pixel of each level (NaN when the slide's resolution is unknown)."""
        return [self.mpp * d for d in self.level_downsamples]

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3); areas outside the slide are white."""
        try:
            return self._read(x, y, level, width, height)
        except Exception as exc:  # decoder errors from a damaged file surface here, mid-slide
            raise _unreadable(self, x, y, exc) from exc

    def read_level_region(self, lx: int, ly: int, level: int, width: int, height: int) -> np.ndarray:
        """Like :meth:`read_region`, with the corner in the level's own pixels: a level whose
        downsample is not a whole number cannot be addressed pixel-exactly through level 0's."""
        try:
            return self._read_level(lx, ly, level, width, height)
        except Exception as exc:
            raise _unreadable(self, lx, ly, exc) from exc

    @abc.abstractmethod
    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """The region as RGB uint8, without error translation."""

    def _read_level(self, lx: int, ly: int, level: int, width: int, height: int) -> np.ndarray:
        d = self.level_downsamples[level]
        return self._read(round(lx * d), round(ly * d), level, width, height)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @functools.cached_property
    def tissue(self) -> tuple[np.ndarray, float]:
        """The tissue mask of the slide's thumbnail (:func:`tissue_mask`) and the thumbnail's
        downsample from level 0: found once per opened slide, whoever asks first (``edge.infer``
        finds it while the model loads)."""
        thumb, downsample = self.thumbnail()
        return tissue_mask(thumb), downsample

    def thumbnail(self, max_side: int = THUMBNAIL_SIDE) -> tuple[np.ndarray, float]:
        """A thumbnail no larger than ``max_side`` and its downsample from level 0."""
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_side if max(w0, h0) > max_side else 1.0
        # The coarsest level still at least as fine as the thumbnail.
        level = max((i for i, d in enumerate(self.level_downsamples) if d <= scale + 1e-6), key=lambda i: i, default=0)
        lw, lh = self.level_dimensions[level]
        out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        ratio = self.level_downsamples[level] / scale  # level px -> thumbnail px
        band = max(1, (1 << 22) // max(lw, 1))  # rows per read: ~4 Mpx (12 MB) at a time
        bands = []
        for top in range(0, lh, band):
            rows = min(band, lh - top)
            region = self.read_region(0, round(top * self.level_downsamples[level]), level, lw, rows)
            target_rows = max(1, round((top + rows) * ratio) - round(top * ratio))
            bands.append(np.asarray(Image.fromarray(region).resize((out_w, target_rows), Image.Resampling.BILINEAR)))
        thumb = np.concatenate(bands, axis=0)[:out_h]
        return thumb, w0 / thumb.shape[1]


class OpenSlideReader(SlideReader):
    def __init__(self, path: Path):
        import openslide

        vendor = openslide.OpenSlide.detect_format(str(path))
        if vendor in (None, "generic-tiff"):
            # tifffile reads generic TIFF pyramids (SubIFDs, OME-TIFF) that OpenSlide sees as one level.
            raise ValueError(f"not a scanner format OpenSlide specialises in (detected {vendor})")
        self.path = path
        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions = list(self._slide.level_dimensions)
        mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = float(mpp) if mpp else float("nan")

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._slide.level_downsamples)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        rgba = self._slide.read_region((x, y), level, (width, height))
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))

    def close(self) -> None:
        self._slide.close()


class TiffReader(SlideReader):
    def __init__(self, path: Path):
        import tifffile
        import zarr

        self.path = path
        self._tif = tifffile.TiffFile(str(path))
        series = self._tif.series[0]
        self._levels = []
        for level in range(len(series.levels)):
            store = series.aszarr(level=level)
            arr = zarr.open_array(store, mode="r")
            self._levels.append((arr, series.levels[level].axes))
        self.level_dimensions = []
        for arr, axes in self._levels:
            self.level_dimensions.append((arr.shape[axes.index("X")], arr.shape[axes.index("Y")]))
        self.mpp = _tiff_mpp(self._tif)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        d = self.level_downsamples[level]
        return self._read_level(int(x / d), int(y / d), level, width, height)

    def _read_level(self, lx: int, ly: int, level: int, width: int, height: int) -> np.ndarray:
        arr, axes = self._levels[level]
        lw, lh = self.level_dimensions[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + width, lw), min(ly + height, lh)
        if x1 > x0 and y1 > y0:
            index = tuple(
                slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == "S" else 0
                for a in axes
            )
            region = np.asarray(arr[index])
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = _to_rgb_uint8(region)
        return out

    def close(self) -> None:
        self._tif.close()


class PlainImageReader(SlideReader):
    def __init__(self, path: Path, mpp: float = float("nan")):
        with Image.open(path) as im:
            self._image = np.asarray(im.convert("RGB"))
        self.path = path
        self.level_dimensions = [(self._image.shape[1], self._image.shape[0])]
        self.mpp = mpp

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, np.uint8)
        h, w = self._image.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out


def _unreadable(reader: SlideReader, x: int, y: int, exc: Exception) -> CmdfedError:
    """Decoder errors from a damaged file surface mid-slide: one message naming the file."""
    return CmdfedError(
        f"cannot read the region at ({x}, {y}) of {reader.path.name}: {type(exc).__name__}: {exc}; "
        "the slide file may be truncated or corrupt"
    )


def _to_rgb_uint8(region: np.ndarray) -> np.ndarray:
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=-1)
    region = region[..., :3]
    if region.dtype != np.uint8:
        hi = float(region.max()) or 1.0
        region = (region.astype(np.float64) * (255.0 / hi)).astype(np.uint8)
    return region


# Microscopy scans lie between about 0.1 (100x oil) and 10 (1.25x) um/px. A TIFF resolution
# outside that is a screen or print default (72 dpi = 353 um/px), not a scan: unknown.
PLAUSIBLE_MPP = (0.05, 20.0)


def _tiff_mpp(tif) -> float:
    mpp = _tiff_resolution(tif.pages[0])
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else float("nan")


def _tiff_resolution(page) -> float:
    match = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = num / den if den else 0
        um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)
        if per_unit > 0 and um_per_unit:
            return um_per_unit / per_unit
    return float("nan")


def open_slide(path: str | Path, mpp: float | None = None) -> SlideReader:
    """Open a slide or plain image; one clear error if nothing can read it."""
    path = Path(path)
    if not path.is_file():
        raise CmdfedError(f"slide {path} does not exist or is not a file")
    errors = []
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        try:
            reader: SlideReader = PlainImageReader(path)
        except Exception as exc:
            raise CmdfedError(f"cannot read image {path}: {exc}") from exc
    else:
        reader = None
        for kind in (OpenSlideReader, TiffReader):
            try:
                reader = kind(path)
                break
            except Exception as exc:  # noqa: BLE001 - whatever a reader raises, try the next; all are reported
                errors.append(f"{kind.__name__[:-6]}: {exc}")
        if reader is None:
            raise CmdfedError(
                f"cannot read slide {path} ({'; '.join(errors)}); supported: SVS/NDPI/MRXS/TIFF "
                "(OpenSlide, tifffile) and PNG/JPEG"
            )
    if mpp is not None:
        reader.mpp = mpp
    return reader


def level_for_mpp(reader: SlideReader, mpp: float) -> int:
    """The pyramid level to read for work at ``mpp`` um/px: the coarsest level at least as fine
    (a level within ``SAME_RESOLUTION`` of ``mpp`` counts as it), so a tile read there is only
    ever shrunk, never enlarged from a coarser level, which would invent detail the model
    would read as texture. Level 0 when even level 0 is coarser (it is enlarged then: the
    finest there is). The slide's resolution must be known."""
    if not math.isfinite(reader.mpp):
        raise CmdfedError(f"the resolution of {reader.path.name} is unknown; give it (--mpp)")
    limit = mpp * (1 + SAME_RESOLUTION)
    fine_enough = [i for i, level_mpp in enumerate(reader.level_mpps) if level_mpp <= limit]
    return max(fine_enough, key=lambda i: reader.level_downsamples[i], default=0)


@dataclass(frozen=True)
class TilePlan:
    """Where tiles come from: level-0 corners of every tile with enough tissue."""

    level: int
    tile_size: int
    stride: int
    downsample: float
    corners: list[tuple[int, int, float]]  # (x0, y0, tissue fraction), level-0 pixels
    grid_tiles: int


def plan_tiles(
    reader: SlideReader, tile_size: int = 256, level: int = 0, overlap: int = 0, min_tissue: float = 0.25
) -> TilePlan:
    if level < 0 or level >= len(reader.level_dimensions):
        raise CmdfedError(
            f"{reader.path.name} has levels 0..{len(reader.level_dimensions) - 1}; level {level} does not exist"
        )
    if tile_size <= 0 or tile_size % 32:
        raise CmdfedError(f"tile size must be a positive multiple of 32 (got {tile_size}); e.g. --tile 256")
    if not 0 <= overlap < tile_size:
        raise CmdfedError(f"overlap must be in [0, tile size), got {overlap}")
    down = reader.level_downsamples[level]
    found, grid = tissue_grid(reader, reader.level_dimensions[level], down, tile_size, overlap, min_tissue)
    corners = [(round(lx * down), round(ly * down), fraction) for lx, ly, fraction in found]
    return TilePlan(level, tile_size, tile_size - overlap, down, corners, grid)


def tissue_grid(
    reader: SlideReader, size: tuple[int, int], downsample: float, tile_size: int, overlap: int, min_tissue: float
) -> tuple[list[tuple[int, int, float]], int]:
    """The tiles with tissue of a grid laid over the slide: (x0, y0, tissue fraction) in the
    grid's pixels, and how many positions the grid has. The grid is ``size`` (width, height)
    pixels of ``downsample`` level-0 pixels each: a pyramid level's (:func:`plan_tiles`) or the
    model's resolution, which no level need have (``edge.infer``). Its last tiles are flush with
    the slide's far edges (:mod:`cmdfed.inference.tiling`), so a tile reaches past the slide
    only along a side shorter than a tile, where it reads white (:meth:`SlideReader.read_region`)."""
    if not 0 <= overlap < tile_size:
        raise CmdfedError(f"overlap must be in [0, tile size), got {overlap}")
    mask, thumb_down = reader.tissue
    width, height = size
    corners = []
    grid = 0
    for ly in grid_starts(height, tile_size, overlap):
        for lx in grid_starts(width, tile_size, overlap):
            grid += 1
            # Footprint of the tile on the thumbnail.
            t0y, t0x = int(ly * downsample / thumb_down), int(lx * downsample / thumb_down)
            t1y = max(t0y + 1, math.ceil((ly + tile_size) * downsample / thumb_down))
            t1x = max(t0x + 1, math.ceil((lx + tile_size) * downsample / thumb_down))
            footprint = mask[t0y:t1y, t0x:t1x]
            fraction = float(footprint.mean()) if footprint.size else 0.0
            if fraction >= min_tissue:
                corners.append((lx, ly, fraction))
    return corners, grid


def iter_slide_tiles(reader: SlideReader, plan: TilePlan, slide_id: str) -> Iterator[Tile]:
    mpp = reader.mpp * plan.downsample
    for x0, y0, fraction in plan.corners:
        image = reader.read_region(x0, y0, plan.level, plan.tile_size, plan.tile_size)
        yield Tile(
            image=image,
            source="slide",
            slide_id=slide_id,
            x=x0,
            y=y0,
            mpp=mpp,
            tissue_fraction=fraction,
        )


def _write_tiles(store: SiteStore, tiles: Iterator[Tile], total: int, progress: Progress | None) -> None:
    with store.writer() as writer:
        for i, tile in enumerate(tiles, start=1):
            writer.add(tile)
            report(progress, i, total, "tiles")


def tile_slide(
    slide_path: str | Path,
    store_path: str | Path,
    *,
    tile_size: int = 256,
    level: int = 0,
    overlap: int = 0,
    min_tissue: float = 0.25,
    mpp: float | None = None,
    append: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StoreInfo:
    """Cut the tissue of one slide into unlabelled tiles of a site store.

    Only the slide's file *name* is recorded (``slide_id``), never its full path: paths on
    hospital file systems can carry patient identifiers.
    """
    store_path = Path(store_path)
    with open_slide(slide_path, mpp=mpp) as reader:
        plan = plan_tiles(reader, tile_size, level, overlap, min_tissue)
        if not plan.corners:
            raise CmdfedError(
                f"no tissue found in {reader.path.name} at min_tissue={min_tissue}; "
                "lower --min-tissue or check the slide"
            )
        total = len(plan.corners)
        tiles = iter_slide_tiles(reader, plan, Path(slide_path).name)
        if append:
            store = SiteStore.open(store_path, mode="r+")
            if store.tile_size != tile_size:
                raise CmdfedError(f"{store_path} holds {store.tile_size} px tiles; use --tile {store.tile_size}")
            _write_tiles(store, tiles, total, progress)
        else:
            options = {"tile_size": tile_size, "mpp": reader.mpp * plan.downsample}
            with create_store(store_path, overwrite=overwrite, **options) as store:
                _write_tiles(store, tiles, total, progress)
    return store.info()
