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

Whole-slide inference (``edge.infer``) resamples tile by tile: each tile is cut from a region
read with a margin and resized with an exact (fractional) source box
(:func:`resample_image`'s ``box``), so a tile's pixels are those a resize of the whole slide
would give, and neighbouring tiles agree on the pixels they share.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cmdfed.inference.nuclei import nucleus_records
from cmdfed.inference.postprocess import PostprocessResult

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
