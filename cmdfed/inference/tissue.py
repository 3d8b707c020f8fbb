"""Where the tissue is: a boolean mask of stained tissue against glass, on a thumbnail.

The HSV saturation of stained tissue is high and that of glass is near zero, so Otsu's
threshold on saturation separates them for H&E without tuning (the approach of e.g. CLAM and
HistoQC). Very dark pixels (pen marks, scanner debris) are dropped; small holes are closed and
specks removed. Slides use it to choose their tiles (``cmdfed.data.slide``) and INT8
calibration to keep tiles with tissue (``edge.quantize``).
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage import filters, morphology


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail (Otsu on saturation; see module docstring).

    Saturation and value are HSV's (as ``skimage.color.rgb2hsv``, without the hue it would also
    compute); the closing and the speck removal run in OpenCV, with skimage's disk and
    ``remove_small_objects``' 4-connectivity: the same mask, ~10x faster on a 2048 px thumbnail."""
    high = thumbnail.max(axis=-1)
    low = thumbnail.min(axis=-1)
    saturation = np.divide(high - low, high, out=np.zeros(high.shape), where=high > 0)
    if np.ptp(saturation) < 1e-3:
        return np.zeros(saturation.shape, bool)
    threshold = max(filters.threshold_otsu(saturation), 0.05)
    mask = (saturation > threshold) & (high / 255 > 0.15)
    side = max(1, min(mask.shape) // 200)
    # OpenCV's default border (outside never counts) equals scipy's reflection for a symmetric disk.
    closed = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, morphology.disk(side).astype(np.uint8))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=4)
    large = stats[:, cv2.CC_STAT_AREA] > max(16, mask.size // 20000)
    large[0] = False  # the background
    return large[labels]
