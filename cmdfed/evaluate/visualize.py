"""Pictures people look at: nuclei outlines over the tissue, coloured by type."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries

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


def draw_outlines(image: np.ndarray, instances: np.ndarray, types: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``image`` (uint8 RGB) with each nucleus's inner boundary painted in its type's colour."""
    out = image.copy()
    edges = find_boundaries(instances, mode="inner") & (instances > 0)
    if types is None:
        out[edges] = type_colour(None)
    else:
        palette = np.array([type_colour(t) for t in range(int(types.max(initial=0)) + 1)], np.uint8)
        out[edges] = palette[types[edges]]
    return out
