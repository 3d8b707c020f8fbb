"""Pictures people look at: nuclei outlines over the tissue, coloured by type."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries

from cmdfed.inference.nuclei import type_colour


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
