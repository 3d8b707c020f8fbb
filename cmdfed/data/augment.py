"""Augmentations that keep labels exact: dihedral transforms, stain jitter, and (optional)
scale jitter and blur.

* Flips and 90° rotations (the 8 symmetries of the square) are applied to the image and
  to every label map together; nuclei have no preferred orientation, so this is free data.
* Stain jitter perturbs the haematoxylin/eosin/DAB concentrations (colour deconvolution with
  the Ruifrok & Johnston matrix, as ``skimage.color.rgb2hed``) by a random scale and shift per
  channel (Tellez et al., 2018). It imitates the stain and scanner variation between
  hospitals, which is what a federated model has to be robust to. Labels are unchanged.
* Scale jitter zooms the tile by a random factor in [1/(1+s), 1+s] about a random point
  (image bilinear, labels nearest so ids stay whole) and cuts or pads it back to its size
  (padding reads as empty white background). It imitates scanners whose um/px differs from
  the nominal one by a few percent, and nuclei that vary in size.
* Blur smooths the image with a Gaussian of random sigma in [0, b] pixels: scans slightly
  out of focus. Labels are unchanged.

Scale jitter and blur are on in ``cmdfed train finetune`` by default (``cmdfed.train.recipe``),
off in pretraining, where they were not measured, and off in federated fine-tuning rounds
unless the run sets ``finetune-scale-jitter`` and ``finetune-blur-sigma``: rounds that continue
a trained segmenter (the demo) scored lower with them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.color import hed2rgb, rgb2hed

BACKGROUND = 240  # what padding reads as: an empty slide's white


def random_dihedral(rng: np.random.Generator, *arrays: np.ndarray | None) -> list[np.ndarray | None]:
    """Apply one random flip/rot90 to every array (HxW or HxWxC) in the same way."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        if a is not None:
            a = np.rot90(a, k, axes=(0, 1))
            if flip:
                a = a[:, ::-1]
            a = np.ascontiguousarray(a)
        out.append(a)
    return out


def stain_jitter(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """Randomly rescale and shift H, E and D optical densities; uint8 RGB in and out."""
    if sigma <= 0:
        return image
    hed = rgb2hed(image)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-sigma, sigma, size=3) * 0.1  # HED values are ~0.1 in magnitude
    rgb = hed2rgb(hed * alpha + beta)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def random_scale(rng: np.random.Generator, jitter: float, image: np.ndarray, *labels: np.ndarray) -> list[np.ndarray]:
    """Zoom the HxWx3 image and HxW label maps alike by a factor in [1/(1+jitter), 1+jitter]
    (log-uniform), keeping their size; ``jitter`` 0 returns them unchanged."""
    if jitter <= 0:
        return [image, *labels]
    height, width = image.shape[:2]
    factor = float(np.exp(rng.uniform(-np.log1p(jitter), np.log1p(jitter))))
    size = max(1, round(height * factor)), max(1, round(width * factor))
    zoomed = [np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))]
    for label in labels:  # int32 ids through PIL's 32-bit integer mode, nearest neighbour
        as_int = Image.fromarray(label.astype(np.int32))
        zoomed.append(np.asarray(as_int.resize(size[::-1], Image.Resampling.NEAREST)).astype(label.dtype))
    # A random window of the original size over the zoomed tile (it may reach past it when zoomed out).
    top = int(rng.integers(min(0, size[0] - height), max(0, size[0] - height) + 1))
    left = int(rng.integers(min(0, size[1] - width), max(0, size[1] - width) + 1))
    return [_window(a, top, left, height, width, BACKGROUND if a.ndim == 3 else 0) for a in zoomed]


def _window(array: np.ndarray, top: int, left: int, height: int, width: int, fill: int) -> np.ndarray:
    out = np.full((height, width, *array.shape[2:]), fill, array.dtype)
    src_y0, src_x0 = max(top, 0), max(left, 0)
    src_y1, src_x1 = min(top + height, array.shape[0]), min(left + width, array.shape[1])
    out[src_y0 - top : src_y1 - top, src_x0 - left : src_x1 - left] = array[src_y0:src_y1, src_x0:src_x1]
    return out


def random_blur(image: np.ndarray, rng: np.random.Generator, max_sigma: float) -> np.ndarray:
    """Gaussian blur of sigma uniform in [0, max_sigma] pixels (per channel); uint8 in and out."""
    if max_sigma <= 0:
        return image
    sigma = rng.uniform(0, max_sigma)
    blurred = gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0))
    return np.clip(blurred + 0.5, 0, 255).astype(np.uint8)
