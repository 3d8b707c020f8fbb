"""Nuclei of an instance map: per-instance tables, records, and QuPath GeoJSON features.

Instance ids are arbitrary non-negative integers (0 = background, ids need not be
contiguous), so :class:`LabelIndex` first maps them to row indices 0..n-1 of a table and
then uses ``np.bincount`` instead of one boolean mask per instance.

Types (:func:`nucleus_records`): each instance takes the majority of the per-pixel NC argmax
inside it, ignoring background (class 0) unless nothing else is present, and ``type_prob`` is
the share of the instance's pixels that voted for that type, as HoVer-Net's ``process``
reports it (a vote share, not a mean softmax probability).

Coordinates: two conventions, and the one place that converts between them.

* Tile pixels (everything computed here): numpy indices, pixel ``[row, col]`` has its centre
  at ``x = col, y = row``. A centroid is the mean of its pixels' centres. A contour traces
  the level-0.5 line of the instance mask (``skimage.measure.find_contours`` with
  diagonal neighbours joined), i.e. it runs half-way between the outermost nucleus pixel
  centres and the first background pixel centres; collinear points are left out.
* Image coordinates (what leaves the program: GeoJSON for QuPath, the edge service's
  ``Nucleus`` messages): pixel centres at ``+0.5``, so pixel ``[row, col]`` covers
  ``[col, col + 1) x [row, row + 1)``. :func:`image_xy` adds ``PIXEL_CENTRE`` and the tile's
  corner to any points, contours and centroids alike, so they stay consistent.
* A tile segmented at a coarser resolution than the image it describes (a 40x slide read at
  a 20x model's resolution, ``edge.infer``): image coordinates of the tile's grid are
  multiplied by ``scale`` (image pixels per tile pixel) after the rule above, so tile pixel
  ``[row, col]`` covers ``[col * scale, (col + 1) * scale)`` of the image: the same square
  the label image's nearest upsampling gives it.

GeoJSON (:func:`nucleus_feature`, :func:`write_feature_collection`): one ``Feature`` per
nucleus with a ``Polygon`` in level-0 image coordinates and ``properties`` as QuPath writes
and reads them: ``objectType: "detection"``, ``classification: {"name", "color": [r, g, b]}``
and numeric ``measurements``. Features are appended to a JSON-lines file while tiles finish
and assembled into one FeatureCollection at the end by streaming, so memory does not grow
with the slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from cmdfed.atomic import atomic_path
from cmdfed.errors import CmdfedError
from cmdfed.model.targets import check_label_map

# Image coordinates put a pixel's centre half a pixel from its corner (see the module docstring).
PIXEL_CENTRE = 0.5
UNCLASSIFIED = "Nucleus"


@dataclass(frozen=True)
class LabelIndex:
    """Instance ids of a map and, for every pixel, the row of its instance.

    ``ids``: (n,) sorted instance ids. ``pixel_rows``: (H*W,) int64 row in ``ids`` of
    each pixel in C order, -1 for background. ``areas``: (n,) pixel counts.
    """

    ids: np.ndarray
    pixel_rows: np.ndarray
    areas: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def of(cls, instance_map: np.ndarray, name: str = "instance_map") -> LabelIndex:
        check_label_map(instance_map, name)
        flat = instance_map.ravel()
        if flat.dtype == bool:
            flat = flat.view(np.uint8)
        largest = int(flat.max()) if flat.size else 0
        if largest <= 4 * flat.size:
            # The usual map (ids up to about the pixel count): counting is linear, sorting is not.
            counts = np.bincount(flat.astype(np.intp, copy=False), minlength=1)
            values = np.flatnonzero(counts[1:]) + 1
            row_of_id = np.full(largest + 1, -1, dtype=np.int64)
            row_of_id[values] = np.arange(values.size)
            return cls(values.astype(flat.dtype), row_of_id[flat], counts[values], instance_map.shape)
        values, inverse = np.unique(flat, return_inverse=True)
        inverse = inverse.astype(np.int64)
        if values[0] == 0:
            values = values[1:]
            inverse -= 1
        areas = np.bincount(inverse[inverse >= 0], minlength=values.size)
        return cls(values, inverse, areas, instance_map.shape)

    def __len__(self) -> int:
        return int(self.ids.size)

    def centroids_xy(self) -> np.ndarray:
        """(n, 2) float64 mean pixel position (x, y) of each instance."""
        foreground = self.pixel_rows >= 0
        rows_of_instances = self.pixel_rows[foreground]
        y, x = np.unravel_index(np.flatnonzero(foreground), self.shape)
        sum_x = np.bincount(rows_of_instances, weights=x, minlength=len(self))
        sum_y = np.bincount(rows_of_instances, weights=y, minlength=len(self))
        return np.stack([sum_x, sum_y], axis=1) / np.maximum(self.areas, 1)[:, None]

    def majority_types(self, pixel_types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Type of each instance by majority vote of its pixels, and the vote share.

        ``pixel_types`` is an (H, W) map of non-negative class ids. Votes for class 0
        (background) are ignored unless no pixel votes for anything else, as in
        HoVer-Net's ``process``; ties go to the smaller class id. The share is the
        fraction of the instance's pixels voting for the chosen type (HoVer-Net's
        ``type_prob``).
        """
        check_label_map(pixel_types, "type map")
        if pixel_types.shape != self.shape:
            raise CmdfedError(
                f"type map has shape {pixel_types.shape} but the instance map has "
                f"{self.shape}; both must describe the same tile"
            )
        foreground = self.pixel_rows >= 0
        classes = pixel_types.ravel()[foreground].astype(np.int64)
        # At least one nucleus class column, so an all-background vote still works.
        class_count = max(int(classes.max()) + 1 if classes.size else 0, 2)
        votes = np.bincount(
            self.pixel_rows[foreground] * class_count + classes,
            minlength=len(self) * class_count,
        ).reshape(len(self), class_count)
        nucleus_votes = votes[:, 1:]
        types = np.where(nucleus_votes.any(axis=1), nucleus_votes.argmax(axis=1) + 1, 0)
        shares = votes[np.arange(len(self)), types] / np.maximum(self.areas, 1)
        return types, shares


@dataclass(frozen=True)
class NucleusRecord:
    """One nucleus, in pixel coordinates of the tile (see the module docstring).

    ``bbox_xyxy`` is (x_min, y_min, x_max, y_max) with the max exclusive (slice bounds).
    ``contour_xy`` is an (N, 2) float closed polygon (first point == last point): the
    outer boundary of the instance's largest part, diagonal neighbours joined (watershed
    instances have only one); holes are not represented.
    ``type`` and ``type_prob`` are None when no NC output was given.
    """

    id: int
    centroid_xy: tuple[float, float]
    bbox_xyxy: tuple[int, int, int, int]
    area: int
    type: int | None
    type_prob: float | None
    contour_xy: np.ndarray


def _pixel_types(nc: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    nc = np.asarray(nc)
    if nc.ndim == 3 and nc.shape[1:] == shape:
        return nc.argmax(axis=0)
    if nc.ndim == 2 and nc.shape == shape:
        check_label_map(nc, "NC type map")
        return nc
    raise CmdfedError(
        f"NC output must be (C, H, W) class scores or an (H, W) type map for a {shape} tile, got shape {nc.shape}"
    )


def nucleus_records(instance_map: np.ndarray, nc: np.ndarray | None = None) -> list[NucleusRecord]:
    """One record per instance (ids ascending): centroid, box, area, type, polygon."""
    labels = LabelIndex.of(instance_map)
    if nc is None:
        types = shares = None
    else:
        types, shares = labels.majority_types(_pixel_types(nc, instance_map.shape))
    centroids = labels.centroids_xy()
    sequential = (labels.pixel_rows + 1).reshape(instance_map.shape)
    framed = np.pad(sequential, 1)  # a background frame around every box: each contour is closed
    records = []
    for row, box in enumerate(ndimage.find_objects(sequential)):
        y0, x0 = box[0].start, box[1].start
        mask = framed[y0 : box[0].stop + 2, x0 : box[1].stop + 2] == row + 1
        records.append(
            NucleusRecord(
                id=int(labels.ids[row]),
                centroid_xy=(float(centroids[row, 0]), float(centroids[row, 1])),
                bbox_xyxy=(x0, y0, box[1].stop, box[0].stop),
                area=int(labels.areas[row]),
                type=None if types is None else int(types[row]),
                type_prob=None if shares is None else float(shares[row]),
                contour_xy=_outer_contour_xy(mask) + [x0 - 1, y0 - 1],
            )
        )
    return records


def _outer_contour_xy(pixels: np.ndarray) -> np.ndarray:
    """Closed (N, 2) x, y polygon around the largest part of a boolean mask whose outermost
    pixels are all background: its level-0.5 line with diagonal neighbours joined
    (``find_contours(pixels, 0.5, fully_connected="high")``).

    OpenCV traces it on a grid of half-pixel steps, where a point is inside when it is a
    nucleus pixel's centre, lies between two pixels of which one is nucleus, or amid four of
    which two or more are: the outer boundary of those points is the level line. Straight
    runs keep only their ends (``CHAIN_APPROX_SIMPLE``): the same polygon, fewer points.
    """
    height, width = pixels.shape
    half_steps = np.zeros((2 * height - 1, 2 * width - 1), dtype=np.uint8)
    half_steps[0::2, 0::2] = pixels
    half_steps[0::2, 1::2] = pixels[:, :-1] | pixels[:, 1:]
    half_steps[1::2, 0::2] = pixels[:-1] | pixels[1:]
    corners = pixels[:-1, :-1].view(np.uint8) + pixels[:-1, 1:] + pixels[1:, :-1] + pixels[1:, 1:]
    half_steps[1::2, 1::2] = corners >= 2
    contours, _ = cv2.findContours(half_steps, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outer = contours[0] if len(contours) == 1 else max(contours, key=cv2.contourArea)
    points = outer[::-1, 0, :] / 2.0  # reversed: wound as find_contours winds it
    return np.vstack([points, points[:1]])


def image_xy(points_xy, corner: tuple[int, int] = (0, 0), scale: float = 1.0) -> np.ndarray:
    """Tile-pixel (x, y) points, shape (..., 2), as image coordinates of the image whose
    pixel ``corner`` (x0, y0) is the tile's first: the one pixel-centre rule. ``scale``: image
    pixels per tile pixel, when the tile's grid is coarser (``corner`` is then in that grid)."""
    x0, y0 = corner
    points = np.asarray(points_xy, np.float64) + [x0 + PIXEL_CENTRE, y0 + PIXEL_CENTRE]
    return points if scale == 1.0 else points * scale


# One colour per class id (0 = background, unused); readable on H&E pink and purple.
TYPE_COLOURS = np.array(
    [
        (0, 0, 0),
        (0, 200, 0),  # 1
        (255, 200, 0),  # 2
        (0, 160, 255),  # 3
        (255, 60, 60),  # 4
        (190, 0, 255),  # 5
        (0, 230, 230),  # 6
        (255, 120, 0),  # 7
    ],
    dtype=np.uint8,
)


def type_colour(type_id: int | None) -> tuple[int, int, int]:
    if not type_id:
        return (0, 200, 0)
    return tuple(int(c) for c in TYPE_COLOURS[1 + (type_id - 1) % (len(TYPE_COLOURS) - 1)])


def class_name(type_id: int | None, class_names: list[str]) -> str:
    if not type_id or type_id >= len(class_names):
        return UNCLASSIFIED
    return class_names[type_id]


def nucleus_feature(
    nucleus: NucleusRecord,
    corner: tuple[int, int],
    label: int,
    class_names: list[str],
    mpp: float | None,
    *,
    scale: float = 1.0,
    area: int | None = None,
) -> dict:
    """A QuPath detection for a nucleus found in the tile whose level-0 corner is ``corner``.

    A tile segmented at a coarser grid than level 0 (``scale`` level-0 pixels per tile pixel,
    ``corner`` in that grid; see :func:`image_xy`) gives its polygon scaled to level 0, and
    ``area``, the nucleus's level-0 pixels in the label image, stands for its area in the
    tile's pixels: ``mpp`` is level 0's, so the areas in um^2 stay right."""
    ring = np.round(image_xy(nucleus.contour_xy, corner, scale), 2).tolist()
    area = nucleus.area if area is None else int(area)
    measurements = {"Area px^2": area}
    if mpp:
        measurements["Area um^2"] = round(area * mpp * mpp, 3)
    if nucleus.type_prob is not None:
        measurements["Class probability"] = round(nucleus.type_prob, 4)
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "isLocked": False,
            "classification": {"name": class_name(nucleus.type, class_names), "color": list(type_colour(nucleus.type))},
            "measurements": measurements,
            "nucleus_id": label,
        },
    }


def write_feature_collection(lines_path: Path, out_path: Path) -> None:
    """Assemble the JSON-lines features into one GeoJSON FeatureCollection, streaming."""
    with atomic_path(out_path) as tmp, open(tmp, "w") as out, open(lines_path) as lines:
        out.write('{"type": "FeatureCollection", "features": [\n')
        first = True
        for line in lines:
            if line.strip():
                out.write(("" if first else ",\n") + line.rstrip("\n"))
                first = False
        out.write("\n]}\n")
