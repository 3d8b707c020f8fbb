"""The model's pixel grid over an image: where tiles are cut, which tile keeps a nucleus found
in several, and how an image at another resolution is brought onto the grid and back.

One grid serves every place that cuts an image into tiles: the dataset importers
(``cmdfed.data.importers``), slide tiling (``cmdfed.data.slide.plan_tiles``), sliding-window
inference (``cmdfed.inference.segment`` and the edge service's ``edge.windows``) and
whole-slide inference's stitching (here).

Grid (:func:`grid_starts`)
    Tiles of side T start every S = T - O pixels along each axis (O = overlap), from 0, and
    the last one is moved back to end exactly at the image's far edge: an image at least one
    tile large is covered without padding, and the last tile overlaps its neighbour by O or
    more. An image smaller than a tile along an axis gets one tile at 0 there, which reaches
    past the edge and is padded (a slide reads white there). No padding means no invented
    pixels in training tiles, maps or slide tiles.

Ownership (:class:`TileGrid`)
    Neighbouring tiles share a band at least O wide. Each tile is post-processed on its own; a
    nucleus in a shared band is found by both tiles (whole or cut by a tile edge). Exactly
    one of them must keep it, and it must keep the whole one.

    Rule: split the plane into cells, one per grid position. Along an axis with tile starts
    s[0] < s[1] < ..., the border between the cells of s[j] and s[j+1] lies in the middle of
    the band they share, at (s[j] + s[j+1] + T) / 2; the first cell starts at 0 and the last
    runs to the end of the image. Where the step is S that is s[j] + S + O/2: each tile minus
    half the overlap on each side. The same along y. A nucleus is kept by the tile of the cell
    that contains its centroid. If that grid position has no tile (too little tissue there),
    the nucleus goes to the tile, among those containing the centroid, whose centre is nearest
    (ties: top-most, then left-most). Every point has one owner, so with every tile present
    each nucleus is kept once, and (below) whole.

    Why nothing is cut: a band shared by two tiles is w >= O wide (O where the step is S,
    more before the last tile) and the border between their cells lies in its middle, w/2 >=
    O/2 from both tiles' edges; every other side of a cell is an edge of the image. So a
    nucleus whose outline lies within r <= O/2 of its centroid (a round one: diameter <= O),
    centroid in a tile's cell, is at least O/2 >= r from that tile's edges inside the image,
    and the tile sees it whole. Conversely the fragment a tile sees of a nucleus crossing its
    edge has its centroid within r <= O/2 of that edge, outside the tile's cell, so fragments
    are never kept. Hence the requirement overlap >= the largest nucleus diameter
    (``max_nucleus_diameter_px`` in the manifest); a lopsided outline reaching further from
    its centroid is caught as cut (below).
    Next to a grid position skipped for lack of tissue, the tile that gets a nucleus in the
    skipped cell may see it cut (it may be seen whole by no tile), and the fragments of it
    that neighbouring tiles see can each be kept (cut, and possibly twice). Such cases, and
    any object larger than the overlap, reach the edge of the tile that keeps them and are
    cut there: ``edge.infer`` drops them (a straight-sided fragment is no nucleus's outline)
    and counts them in the summary (``objects_cut_by_tile_edges_dropped``) rather than
    hiding them.

    The two tiles predict a seam nucleus from different context, so their centroids differ
    by a fraction of a pixel; a centroid that falls exactly on a cell border could in
    principle be kept by both or neither. With O/2 of margin on each side this needs
    predictions that differ in where the nucleus is, not just in its outline. When it happens
    the label image decides (``edge.infer``): a kept nucleus more than half of whose pixels
    an earlier tile's nucleus already labels is the same nucleus again and is dropped
    (counted in the summary); otherwise it labels only pixels still free, so every nucleus
    in the GeoJSON is in the label image.

Resolution (:func:`resample_image`, :func:`to_image_pixels`)
    A model learns nuclei at one size in pixels: CMD's released models at 0.5 um/px (20x).
    Most scanners write 40x (about 0.25 um/px), where the same nucleus is twice as wide, and a
    model run there sees unfamiliar shapes and the post-processing's lengths are wrong. So an
    image at another resolution is resampled to the model's (bilinear, which averages
    neighbouring pixels when it shrinks, as a scanner's lower pyramid level does), segmented
    and post-processed there, and the instance map is brought back to the image's pixels
    (nearest neighbour, so ids stay whole); per-nucleus records (centroids, contours, areas)
    are measured on that map, in the image's own coordinates.

    A resolution within ``SAME_RESOLUTION`` (relative) of the model's is used as it is: the
    difference between 0.499 and 0.5 um/px is below what resampling could help.

    Whole-slide inference (``edge.infer``) resamples tile by tile: each tile is cut from a region
    read with a margin and resized with an exact (fractional) source box
    (:func:`resample_image`'s ``box``), so a tile's pixels are those a resize of the whole slide
    would give, and neighbouring tiles agree on the pixels they share.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cmdfed.inference.nuclei import NucleusRecord, nucleus_records
from cmdfed.inference.postprocess import PostprocessResult

# Names the grid and ownership rule above for records that depend on it (``edge.infer``'s
# resume fingerprint): change it when either changes.
GRID_RULE = "flush end, cells split shared bands in the middle"


def grid_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along an axis ``length`` pixels long: every ``tile - overlap`` from 0, the
    last flush with the far edge; one at 0 when the axis is no longer than a tile."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


@dataclass(frozen=True)
class _Axis:
    """One axis of the grid: its tile starts and the borders between their cells.

    A coordinate v lies in the cell of ``starts[j]`` when ``borders[j - 1] <= v < borders[j]``;
    the first cell reaches down to 0 and the last up to the end of the image (beyond, too)."""

    starts: tuple[int, ...]
    borders: tuple[float, ...]  # borders[j]: the middle of the band starts[j] and starts[j + 1] share

    @classmethod
    def of(cls, length: int, tile: int, overlap: int) -> _Axis:
        starts = grid_starts(length, tile, overlap)
        return cls(tuple(starts), tuple((a + b + tile) / 2 for a, b in itertools.pairwise(starts)))

    def cell(self, value: float) -> int:
        """The start whose cell contains ``value``."""
        return self.starts[bisect.bisect_right(self.borders, value)]

    def containing(self, value: float, tile: int) -> tuple[int, ...]:
        """The starts whose tiles contain ``value`` (start <= value < start + tile)."""
        return self.starts[bisect.bisect_right(self.starts, value - tile) : bisect.bisect_right(self.starts, value)]

    def cell_pixels(self, start: int, length: int) -> int:
        """How many pixels (pixel p at coordinate p) of an axis ``length`` long the cell of ``start`` holds."""
        j = self.starts.index(start)
        low = 0 if j == 0 else math.ceil(self.borders[j - 1])
        high = length if j == len(self.borders) else math.ceil(self.borders[j])
        return high - low


@dataclass(frozen=True)
class TileGrid:
    """The tiles that hold tissue of the grid laid over an image ``width`` x ``height`` pixels
    (the module docstring's grid and ownership rule)."""

    tile: int
    overlap: int
    width: int
    height: int
    corners: tuple[tuple[int, int], ...]  # (x0, y0) of the tiles with tissue, grid positions
    _present: frozenset = field(init=False, repr=False, compare=False)
    _x: _Axis = field(init=False, repr=False, compare=False)
    _y: _Axis = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_present", frozenset(self.corners))
        object.__setattr__(self, "_x", _Axis.of(self.width, self.tile, self.overlap))
        object.__setattr__(self, "_y", _Axis.of(self.height, self.tile, self.overlap))

    def owner(self, x: float, y: float) -> tuple[int, int] | None:
        """The (x0, y0) of the tile that keeps a nucleus with centroid (x, y), None when no tile
        with tissue contains it."""
        nominal = (self._x.cell(x), self._y.cell(y))
        if nominal in self._present:
            return nominal
        containing = [
            (cx, cy)
            for cx in self._x.containing(x, self.tile)
            for cy in self._y.containing(y, self.tile)
            if (cx, cy) in self._present
        ]
        if not containing:
            return None
        half = self.tile / 2
        return min(containing, key=lambda c: ((c[0] + half - x) ** 2 + (c[1] + half - y) ** 2, c[1], c[0]))

    def owned(self, corner: tuple[int, int], nuclei: list[NucleusRecord]) -> list[NucleusRecord]:
        """The nuclei (in tile coordinates) of the tile at ``corner`` that this tile keeps."""
        x0, y0 = corner
        # Rounded so that two tiles seeing the same pixels compute the same point exactly
        # (x0 + local centroid differs in the last bits between tiles, which can flip a tie).
        return [
            n for n in nuclei if self.owner(round(x0 + n.centroid_xy[0], 6), round(y0 + n.centroid_xy[1], 6)) == corner
        ]

    def nominal_cell_area(self, corner: tuple[int, int]) -> int:
        """Pixels of the image in the cell of the grid position ``corner`` (cells never overlap)."""
        x0, y0 = corner
        return self._x.cell_pixels(x0, self.width) * self._y.cell_pixels(y0, self.height)

    def touches_inner_edge(self, corner: tuple[int, int], nucleus: NucleusRecord) -> bool:
        """Whether the nucleus reaches a tile edge that lies inside the image (it may be cut there)."""
        x0, y0 = corner
        bx0, by0, bx1, by1 = nucleus.bbox_xyxy
        return (
            (bx0 == 0 and x0 > 0)
            or (by0 == 0 and y0 > 0)
            or (bx1 == self.tile and x0 + self.tile < self.width)
            or (by1 == self.tile and y0 + self.tile < self.height)
        )


SAME_RESOLUTION = 0.05


def needs_resampling(image_mpp: float | None, model_mpp: float | None) -> bool:
    if not image_mpp or not model_mpp or not math.isfinite(image_mpp) or not math.isfinite(model_mpp):
        return False
    return abs(image_mpp / model_mpp - 1.0) > SAME_RESOLUTION


def resampled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def resample_image(
    image: np.ndarray, shape: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """uint8 RGB (H, W, 3) resized to ``shape`` (rows, cols), bilinear with PIL's antialiasing.

    ``box``: (x0, y0, x1, y1), the part of ``image`` (in its pixel edges, fractions allowed)
    that becomes the output; pixels around it still feed the filter, which is why a tile is
    read with a margin (module docstring). Default: the whole image."""
    return np.array(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BILINEAR, box=box))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An id map resized to ``shape`` by nearest neighbour (pixel centres mapped, ids kept whole)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float maps resized bilinearly to ``shape``."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0].numpy()


def to_image_pixels(at_model: PostprocessResult, nc: np.ndarray | None, shape: tuple[int, int]) -> PostprocessResult:
    """A result post-processed at the model's resolution, brought back to an image of ``shape``:
    the instance and type maps nearest-resized (ids stay whole), the NC maps (C, h, w) of the
    model's resolution, when given, bilinearly, and the records measured again on that map, so
    centroids, contours and areas are in the image's own pixels."""
    instance_map = resize_labels(at_model.instance_map, shape)
    nc = None if nc is None else resize_maps(nc, shape)
    type_map = None if at_model.type_map is None else resize_labels(at_model.type_map, shape)
    return PostprocessResult(instance_map, type_map, nucleus_records(instance_map, nc))
