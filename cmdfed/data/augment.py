"""Augmentations that keep labels exact: dihedral transforms and stain jitter.

* Flips and 90° rotations (the 8 symmetries of the square) are applied to the image and
  to every label map together; nuclei have no preferred orientation, so this is free data.
* Stain jitter perturbs the haematoxylin/eosin/DAB concentrations (colour deconvolution with
  the Ruifrok & Johnston matrix, as ``skimage.color.rgb2hed``) by a random scale and shift per
  channel (Tellez et al., 2018). It imitates the stain and scanner variation between
  hospitals, which is what a federated model has to be robust to. Labels are unchanged.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed2rgb, rgb2hed


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
