"""Per-instance tables of an instance map, computed with one sort of the pixels.

Instance ids are arbitrary non-negative integers (0 = background, ids need not be
contiguous), so everything here first maps them to row indices 0..n-1 of a table and
then uses ``np.bincount`` instead of one boolean mask per instance.
Coordinates follow numpy: pixel ``[row, col]`` has its centre at ``x = col, y = row``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmdfed.errors import CmdfedError
from cmdfed.model.targets import check_label_map


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
        values, inverse = np.unique(instance_map.ravel(), return_inverse=True)
        inverse = inverse.astype(np.int64)
        if values.size and values[0] == 0:
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
