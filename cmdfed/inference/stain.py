"""Stain normalisation: an image's H&E stains moved to those of a model's training images.

Macenko et al. (2009), "A method for normalizing histology slides for quantitative analysis".
In optical density (OD = -ln((RGB + 1) / Io), Io = 240, the light through glass), each pixel is
a mix of two stains: ``OD = V @ c`` with ``V`` the hematoxylin and eosin vectors (unit OD per
RGB channel, 3 x 2) and ``c`` their concentrations. An image's stains are estimated from its
stained pixels (every channel's OD at least beta = 0.15; lighter ones are glass): ``V`` spans
the plane of their two main OD directions, its two edges taken at the 1st and 99th percentile
of the angle within it (alpha = 1), hematoxylin the one redder in OD; and each stain's 99th
percentile concentration. Normalising unmixes the image by its own stains, scales each
concentration by reference / own 99th percentile, and mixes again with the reference's vectors.

The arithmetic follows the reference implementation (github.com/mitkovetta/staining-
normalization, as ported in schaugf/HEnorm_python and torchstain's numpy Macenko). It is
written here, not taken from torchstain, because a slide needs its stains estimated once, on
tiles spread over its tissue, and then applied to every tile alike (tiles normalised each by
their own estimate would meet at seams in different colours); torchstain estimates them inside
each ``normalize`` call (this module's result on the CPM-15 benchmark equals torchstain's
numpy Macenko fitted to the same images, to 3 decimals of PQ; measured once, not a dependency:
its wheel installs a top-level ``tests`` package).

Why: a model that learnt nuclei from few images learnt their staining too. On CPM-15 08-10 a
model trained on 01-07 scores higher PQ on images moved to 01-07's stains
(``benchmarks/stain_normalisation``). Reinhard's LAB statistics were measured first and set
aside: their result depended on which pixels were counted as stain, and an image re-coloured
and normalised did not come back to the original's colours (Macenko: within 6 of 255 levels
on average; Reinhard: 30). Nothing is fitted to the images being normalised: the reference
comes from the training images (a checkpoint's ``stain_reference``), the source stains from the
image itself (for a whole slide, from tiles spread over its tissue).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from cmdfed.errors import CmdfedError

LIGHT = 240.0  # Io: the intensity of light through glass (Macenko's)
MIN_OD = 0.15  # beta: a pixel with any channel's OD below this is glass, not stain
ANGLE_PERCENTILE = 1.0  # alpha: the stain vectors' angles, robust to outliers
MAX_PERCENTILE = 99.0  # a stain's "maximum" concentration
# Fewer stained pixels (a 32 x 32 patch) are too few to estimate two stains: the image is left as it is.
MIN_STAINED_PIXELS = 1024
# Pixels sampled to estimate many tiles' stains: the estimate of a few million pixels does not move with more.
STAIN_SAMPLE_PIXELS = 2 << 20
# The key under which a checkpoint's config and a bundle manifest's preprocessing hold the reference.
REFERENCE_KEY = "stain_reference"


@dataclass(frozen=True)
class HEStains:
    """An image's hematoxylin and eosin: each stain's OD vector (R, G, B; unit length) and its
    99th-percentile concentration."""

    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    max_concentrations: tuple[float, float]
    pixels: int = 0  # how many stained pixels they were estimated on

    @property
    def vectors(self) -> np.ndarray:
        return np.array([self.hematoxylin, self.eosin], np.float64).T  # 3 x 2

    @classmethod
    def of(cls, images: Sequence[np.ndarray]) -> HEStains:
        """The stains of uint8 RGB ``images`` taken together; CmdfedError when they hold too little stain."""
        stains = source_stains(images)
        if stains is None:
            raise CmdfedError(
                "too little stain to estimate H&E on: the image is background (or blank), or smaller than "
                f"{MIN_STAINED_PIXELS} stained pixels"
            )
        return stains

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "macenko",
            "hematoxylin": [round(v, 6) for v in self.hematoxylin],
            "eosin": [round(v, 6) for v in self.eosin],
            "max_concentrations": [round(v, 6) for v in self.max_concentrations],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> HEStains:
        """The stains a config or manifest recorded (``to_dict``); ``where`` names it in errors."""
        try:
            if data["method"] != "macenko":
                raise ValueError(f"method {data['method']!r} is not macenko")
            h, e, top = (tuple(float(v) for v in data[k]) for k in ("hematoxylin", "eosin", "max_concentrations"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CmdfedError(
                f"{where}: {REFERENCE_KEY} is damaged ({exc!r}); expected method macenko, hematoxylin, eosin and "
                "max_concentrations"
            ) from exc
        if len(h) != 3 or len(e) != 3 or len(top) != 2 or min(top) <= 0 or not np.isfinite([*h, *e, *top]).all():
            raise CmdfedError(f"{where}: {REFERENCE_KEY} must hold two RGB stain vectors and two positive maxima")
        return cls(h, e, top)  # type: ignore[arg-type]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> HEStains | None:
        """The reference an edge bundle was exported with (None: its model has none, or it predates them)."""
        record = manifest["preprocessing"].get(REFERENCE_KEY)
        return None if record is None else cls.from_dict(record, "the bundle manifest's preprocessing")


# The optical density of each uint8 level: a table, so an image's OD is a lookup, not a log per pixel.
_DENSITY = (-np.log((np.arange(256) + 1.0) / LIGHT)).astype(np.float32)
_DENSITY_LUT = np.repeat(_DENSITY[None, :, None], 3, axis=2)  # the same for each channel, as cv2.LUT takes it


def sample_positions(count: int, tile_side: int) -> np.ndarray:
    """Which of ``count`` tiles of ``tile_side`` px to estimate their stains on: at most
    STAIN_SAMPLE_PIXELS worth (at least one), spread evenly over them."""
    if count <= 0:
        return np.zeros(0, int)
    picks = min(count, max(1, STAIN_SAMPLE_PIXELS // tile_side**2))
    return np.linspace(0, count - 1, picks).round().astype(int)


def _optical_density(image: np.ndarray) -> np.ndarray:
    """(H * W, 3) float32 OD of a uint8 RGB image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CmdfedError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return _DENSITY[image.reshape(-1, 3)]


def source_stains(images: Sequence[np.ndarray]) -> HEStains | None:
    """The stains of ``images`` taken together (module docstring); None when they hold fewer than
    MIN_STAINED_PIXELS stained pixels."""
    density = np.concatenate([_optical_density(image) for image in images]) if images else np.zeros((0, 3))
    stained = density[(density >= MIN_OD).all(axis=1)]
    if len(stained) < MIN_STAINED_PIXELS:
        return None
    _, eigenvectors = np.linalg.eigh(np.cov(stained.T.astype(np.float64)))
    plane = eigenvectors[:, 1:3]  # the two largest
    projected = stained @ plane.astype(np.float32)
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angle, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    # Hematoxylin absorbs more red than eosin does: the vector with the larger red OD comes first.
    hematoxylin, eosin = (first, second) if first[0] > second[0] else (second, first)
    unmix = np.linalg.pinv(np.stack([hematoxylin, eosin], axis=1)).astype(np.float32)  # OD -> concentrations
    top = np.percentile(density @ unmix.T, MAX_PERCENTILE, axis=0)
    if not (top > 0).all():
        return None  # one stain absent (or a degenerate estimate): nothing to scale by
    return HEStains(tuple(hematoxylin.tolist()), tuple(eosin.tolist()), tuple(top.tolist()), len(stained))


def macenko(image: np.ndarray, source: HEStains, reference: HEStains) -> np.ndarray:
    """uint8 RGB ``image``, stained as ``source``, re-stained as ``reference``.

    Unmixing by the source's stains, scaling each concentration and mixing with the reference's
    are all linear in OD: one 3 x 3 matrix per source, applied to every pixel (OpenCV's table
    lookup, per-pixel transform and exp, a few ms for a 512 px tile)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CmdfedError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    scale = np.asarray(reference.max_concentrations) / np.asarray(source.max_concentrations)
    restain = (reference.vectors * scale) @ np.linalg.pinv(source.vectors)
    # log of the output: ln(Io) - restain @ OD, as one affine transform per pixel
    affine = np.hstack([-restain, np.full((3, 1), np.log(LIGHT))]).astype(np.float32)
    density = cv2.LUT(image, _DENSITY_LUT)
    return cv2.convertScaleAbs(cv2.exp(cv2.transform(density, affine)))


def restained_together(images: Sequence[np.ndarray], reference: HEStains | None) -> list[np.ndarray]:
    """``images`` re-stained as ``reference`` by one estimate of their stains taken together; as
    they are without a reference, or when they hold too little stain to estimate (glass, blanks)."""
    source = None if reference is None else source_stains(images)
    return list(images) if source is None else [macenko(image, source, reference) for image in images]


def normalised(image: np.ndarray, reference: HEStains | None) -> np.ndarray:
    """``image`` re-stained as ``reference`` by its own stains (:func:`restained_together`)."""
    return restained_together([image], reference)[0]
