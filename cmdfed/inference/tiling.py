"""The model's pixel grid over an image: where tiles are cut, which tile keeps a nucleus found
in several, and how an image at another resolution is brought onto the grid and back.

One grid serves every place that cuts an image into tiles: the dataset importers
(``cmdfed.data.importers``), slide tiling (``cmdfed.data.slide.plan_tiles``), sliding-window
inference (``cmdfed.inference.segment``) and whole-slide inference's stitching (here).

Grid (:func:`grid_starts`)
    Tiles of side T start every S = T - O pixels along each axis (O = overlap), from 0.
    Where the grid meets the far edge of the image there are two ways to end it, and which
    one a caller uses is part of what its outputs are:

    ``flush_end=True``: the last tile is moved back to end exactly at the edge, so an image
    at least one tile large is covered without padding (the last tile overlaps its
    neighbour by more than O). Importers and sliding-window inference, which hold the
    whole image, use it: no padding means no invented pixels in training tiles or maps.

    ``flush_end=False``: positions stay on the regular grid (multiples of S) as long as a
    tile still reaches pixels its predecessor does not cover (start < length - O); the last
    tile may reach past the edge and is padded (a slide reads white there). Slides use it:
    the ownership cells below need every tile on a multiple of S.

Ownership (:class:`TileGrid`)
    Neighbouring tiles share a band O wide. Each tile is post-processed on its own; a
    nucleus in a shared band is found by both tiles (whole or cut by a tile edge). Exactly
    one of them must keep it, and it must keep the whole one.

    Rule: split the plane into nominal cells, one per grid position: along x, cell i spans
    [i*S + O/2, (i+1)*S + O/2) (the first starts at 0), i.e. each tile minus half the
    overlap on each side; the same along y. A
    nucleus is kept by the tile of the cell that contains its centroid. If that grid
    position has no tile (too little tissue there), the nucleus goes to the tile, among those
    containing the centroid, whose centre is nearest (ties: top-most, then left-most). Every
    point has one owner, so a nucleus that some tile sees whole is kept once.

    Why nothing is cut: a nucleus of diameter d <= O whose centroid lies in a tile's cell is
    at least O/2 >= d/2 from that tile's edges, so the tile sees it whole. Conversely the
    fragment a tile sees of a nucleus crossing its edge has its centroid within d/2 <= O/2 of
    that edge, outside the tile's cell, so fragments are never kept. Hence the requirement
    overlap >= the largest nucleus diameter (``max_nucleus_diameter_px`` in the manifest).
    Next to a grid position skipped for lack of tissue, a nucleus may be seen whole by no
    tile; then the fragments of it that neighbouring tiles see can each be kept (cut, and
    possibly twice). Such cases, and any object larger than the overlap, reach the edge of
    the tile that keeps them and are cut there: ``edge.infer`` drops them (a straight-sided
    fragment is no nucleus's outline) and counts them in the summary
    (``objects_cut_by_tile_edges_dropped``) rather than hiding them.

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

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cmdfed.inference.nuclei import NucleusRecord, nucleus_records
from cmdfed.inference.postprocess import PostprocessResult


def grid_starts(length: int, tile: int, overlap: int, *, flush_end: bool) -> list[int]:
    """Tile offsets along an axis ``length`` pixels long (see the module docstring)."""
    stride = tile - overlap
    if not flush_end:
        return list(range(0, max(length - overlap, 1), stride))
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]


@dataclass(frozen=True)
class TileGrid:
    """The slide's tiles that hold tissue, on the regular grid (``flush_end=False``)."""

    tile: int
    overlap: int
    corners: tuple[tuple[int, int], ...]  # level-0 (x0, y0) of the tiles with tissue, multiples of the stride
    _present: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_present", frozenset(self.corners))

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def _cell(self, value: float) -> int:
        return max(0, math.floor((value - self.overlap / 2) / self.stride))

    def owner(self, x: float, y: float) -> tuple[int, int] | None:
        """The (x0, y0) of the tile that keeps a nucleus with centroid (x, y) (level-0 pixels)."""
        i, j = self._cell(x), self._cell(y)
        nominal = (i * self.stride, j * self.stride)
        if nominal in self._present:
            return nominal
        containing = [
            (cx, cy)
            for cx in ((i - 1) * self.stride, i * self.stride, (i + 1) * self.stride)
            for cy in ((j - 1) * self.stride, j * self.stride, (j + 1) * self.stride)
            if (cx, cy) in self._present and cx <= x < cx + self.tile and cy <= y < cy + self.tile
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

    def nominal_cell_area(self, corner: tuple[int, int], width: int, height: int) -> int:
        """Pixels of the tile's nominal cell inside a width x height slide (cells never overlap)."""
        x0, y0 = corner
        return self._span(x0, width) * self._span(y0, height)

    def _span(self, start: int, limit: int) -> int:
        half = self.overlap // 2
        low = 0 if start == 0 else start + half
        # The grid's last position also owns the rest of the slide.
        last = start == grid_starts(limit, self.tile, self.overlap, flush_end=False)[-1]
        high = limit if last else min(start + self.stride + half, limit)
        return max(0, high - low)

    def touches_inner_edge(self, corner: tuple[int, int], nucleus: NucleusRecord, width: int, height: int) -> bool:
        """Whether the nucleus reaches a tile edge that lies inside the slide (it may be cut there)."""
        x0, y0 = corner
        bx0, by0, bx1, by1 = nucleus.bbox_xyxy
        return (
            (bx0 == 0 and x0 > 0)
            or (by0 == 0 and y0 > 0)
            or (bx1 == self.tile and x0 + self.tile < width)
            or (by1 == self.tile and y0 + self.tile < height)
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
