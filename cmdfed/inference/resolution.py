"""Reading images at the model's resolution.

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
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAME_RESOLUTION = 0.05


def needs_resampling(image_mpp: float | None, model_mpp: float | None) -> bool:
    if not image_mpp or not model_mpp or not math.isfinite(image_mpp) or not math.isfinite(model_mpp):
        return False
    return abs(image_mpp / model_mpp - 1.0) > SAME_RESOLUTION


def resampled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def resample_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """uint8 RGB (H, W, 3) resized to ``shape`` (rows, cols), bilinear with PIL's antialiasing."""
    return np.array(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An id map resized to ``shape`` by nearest neighbour (pixel centres mapped, ids kept whole)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float maps resized bilinearly to ``shape``."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    return F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False)[0].numpy()
