"""Stain normalisation: an image's colours moved to those of a model's training images.

Reinhard et al. (2001), "Color transfer between images": in CIELAB (OpenCV's 8-bit encoding,
L, a, b each 0..255), each channel of the image is shifted and scaled so that the mean and
standard deviation of its **tissue** pixels become the reference's:

    lab' = (lab - source.mean) / source.std * reference.std + reference.mean

Only tissue pixels are measured (``cmdfed.inference.tissue``): a slide's white background
would otherwise pull its mean towards white and its spread up, and move tissue colours by how
much glass the image shows. Every pixel, background included, is transformed alike.

Why: a model that learnt nuclei from few images learnt their staining too. On CPM-15 08-10 a
model trained on 01-07 scored PQ 0.015-0.09 higher (seven runs) on images moved to 01-07's
colours (``benchmarks/stain_normalisation``), and on a lighter skin slide it stops reading purple
cytoplasm (epidermis) as nucleus. Nothing is fitted to the images being normalised: the
reference comes from the training images, the source from the image itself (for a whole slide,
from its thumbnail's tissue, so that every tile moves alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cmdfed.errors import CmdfedError
from cmdfed.inference.tissue import tissue_mask

MIN_STD = 1.0  # one 8-bit LAB level: a flat channel is shifted, not blown up


@dataclass(frozen=True)
class LabStats:
    """Per-channel mean and standard deviation of tissue pixels in OpenCV's 8-bit CIELAB."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, images: list[np.ndarray]) -> LabStats:
        """The statistics of the tissue pixels of uint8 RGB ``images`` taken together."""
        pixels = [_lab(image)[tissue_mask(image)] for image in images]
        tissue = np.concatenate(pixels) if pixels else np.empty((0, 3), np.float32)
        if not len(tissue):
            raise CmdfedError("no tissue to measure stain colours on: the image is background (or blank)")
        return cls(tuple(tissue.mean(0).tolist()), tuple(tissue.std(0).tolist()))


def _lab(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CmdfedError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)


def reinhard(image: np.ndarray, source: LabStats, reference: LabStats) -> np.ndarray:
    """uint8 RGB ``image`` with colours of ``source`` statistics moved to ``reference``'s."""
    scale = np.maximum(reference.std, MIN_STD) / np.maximum(source.std, MIN_STD)
    moved = (_lab(image) - np.float32(source.mean)) * scale.astype(np.float32) + np.float32(reference.mean)
    return cv2.cvtColor(np.clip(moved + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
