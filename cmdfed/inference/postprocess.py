"""Nuclei instances, types and per-nucleus records from CMD's NP, HV and NC outputs.

Instance separation is HoVer-Net's marker-controlled watershed (Graham et al. 2019,
section III-C; ``__proc_np_hv`` in vqdang/hover_net ``models/hovernet/post_proc.py``),
with the same OpenCV, SciPy-equivalent and scikit-image operations:

1. Foreground: NP probability >= ``foreground_threshold``; connected blobs
   (4-connectivity) smaller than ``min_object_size`` pixels are dropped.
2. The H and V maps are each min-max scaled to [0, 1] over the whole tile and
   differentiated along their own axis with OpenCV's Sobel filter of size
   ``sobel_kernel_size`` (binomial smoothing across, binomial derivative along; a
   reflect-101 border). Inside a nucleus the H map rises steadily from -1
   to +1; where two nuclei touch it falls from +1 to -1, so after min-max scaling the
   derivative and taking ``1 - d``, touching boundaries are near 1 and nucleus
   interiors near 0. The gradient map is the larger of the two, set to 0 off the
   foreground.
3. Energy: ``(1 - gradient)`` on the foreground, blurred by OpenCV's 3x3 Gaussian
   ([1, 2, 1] / 4 in each direction) and negated, so nucleus interiors are basins.
4. Markers: foreground pixels whose gradient is below ``marker_gradient_threshold``,
   holes filled (background 4-connected, as ``scipy.ndimage.binary_fill_holes``), opened
   with OpenCV's ``marker_opening_size`` ellipse (erosion never eats from outside the
   tile: OpenCV's default morphology border), labelled
   (4-connectivity), components smaller than ``min_object_size`` dropped.
5. ``skimage.segmentation.watershed`` of the energy from the markers, restricted to
   the foreground. Foreground blobs that received no marker are left out, as in
   HoVer-Net. Output ids are 1..n.

Types and records: :func:`cmdfed.inference.nuclei.nucleus_records` (each instance takes
the majority of the per-pixel NC argmax inside it, as HoVer-Net's ``process`` does; its
coordinates convention is described there).

Settings travel as a plain dict (:meth:`WatershedParams.to_dict` / :meth:`from_dict`): in a
bundle's manifest, in the whole-slide job's fingerprint and in evaluation summaries.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage.segmentation import watershed

from cmdfed.errors import CmdfedError
from cmdfed.inference.nuclei import NucleusRecord, nucleus_records

# Micrometres per pixel HoVer-Net's post-processing settings were tuned at (40x).
REFERENCE_MPP = 0.25


@dataclass(frozen=True)
class WatershedParams:
    """Post-processing settings; the defaults are HoVer-Net's.

    ``foreground_threshold``: NP probability at or above which a pixel is nucleus (0.5).
    ``min_object_size``: foreground blobs and markers with fewer pixels are dropped (10).
    ``sobel_kernel_size``: odd Sobel aperture, 3..31, for the HV gradients (21). It sets
    how far apart two boundaries must be to stay distinct; HoVer-Net tuned 21 at 40x.
    ``marker_gradient_threshold``: pixels whose scaled HV gradient is at or above this
    are boundary, not marker (0.4).
    ``marker_opening_size``: diameter of the elliptical opening that cleans markers (5).

    These defaults were tuned at 40x (about 0.25 um/px). At 20x nuclei are half as wide
    and the opening erases the markers of small ones: on CPM-15 image01 (20x) with
    perfect NP/HV targets, PQ is 0.68 with the defaults and 0.89 with
    ``sobel_kernel_size=11, marker_opening_size=3``; on image08 (40x) the defaults give
    0.97. :meth:`for_mpp` scales the spatial settings to a resolution, which gives exactly
    those 20x values; evaluation, `cmdfed predict --mpp` and `cmdfed edge export --mpp` use it.
    """

    foreground_threshold: float = 0.5
    min_object_size: int = 10
    sobel_kernel_size: int = 21
    marker_gradient_threshold: float = 0.4
    marker_opening_size: int = 5

    @classmethod
    def for_mpp(cls, mpp: float | None, **overrides) -> WatershedParams:
        """HoVer-Net's settings scaled from their 40x (``REFERENCE_MPP``) to ``mpp`` micrometres
        per pixel: lengths (Sobel aperture, kept odd; opening diameter) by 0.25 / mpp, the
        minimum size, an area, by its square. Unknown ``mpp`` (None or NaN): the defaults.
        ``overrides`` replace single values."""
        if mpp is None or not math.isfinite(mpp) or mpp <= 0:
            return cls(**overrides)
        scale = REFERENCE_MPP / mpp
        scaled = {
            "min_object_size": max(1, int(cls.min_object_size * scale**2 + 0.5)),
            "sobel_kernel_size": min(31, max(3, 2 * int(cls.sobel_kernel_size * scale / 2) + 1)),
            "marker_opening_size": max(1, int(cls.marker_opening_size * scale + 0.5)),
        }
        return cls(**{**scaled, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WatershedParams:
        """The settings a :meth:`to_dict` wrote; names it does not know are an error, not ignored."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise CmdfedError(
                f"unknown post-processing setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**values)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> WatershedParams:
        """The settings an edge bundle's manifest was exported with."""
        return cls.from_dict(manifest["postprocessing"]["params"])

    def __post_init__(self) -> None:
        if not 0.0 < self.foreground_threshold <= 1.0:
            raise CmdfedError("foreground_threshold must be in (0, 1]; HoVer-Net uses 0.5")
        if self.min_object_size < 0:
            raise CmdfedError("min_object_size must be >= 0 pixels; HoVer-Net uses 10")
        if self.sobel_kernel_size % 2 == 0 or not 3 <= self.sobel_kernel_size <= 31:
            raise CmdfedError("sobel_kernel_size must be odd and in 3..31; HoVer-Net uses 21")
        if not 0.0 < self.marker_gradient_threshold < 1.0:
            raise CmdfedError("marker_gradient_threshold must be in (0, 1); HoVer-Net uses 0.4")
        if self.marker_opening_size < 1:
            raise CmdfedError("marker_opening_size must be >= 1 pixel; HoVer-Net uses 5")


@dataclass(frozen=True)
class PostprocessResult:
    """Instance map (int32, ids 1..n), per-pixel type map (None without NC), records."""

    instance_map: np.ndarray
    type_map: np.ndarray | None
    nuclei: list[NucleusRecord]


def hover_watershed(np_prob: np.ndarray, hv: np.ndarray, params: WatershedParams = WatershedParams()) -> np.ndarray:
    """Instance map (int32, ids 1..n) from NP probability (H, W) and HV maps (2, H, W)."""
    np_prob = np.asarray(np_prob, dtype=np.float32)
    hv = np.asarray(hv, dtype=np.float32)
    if np_prob.ndim != 2 or hv.shape != (2, *np_prob.shape):
        raise CmdfedError(
            f"expected NP probability (H, W) and HV maps (2, H, W), got {np_prob.shape} "
            f"and {hv.shape}; take the nucleus channel of NP and keep HV channel-first"
        )
    foreground = _large_components(np_prob >= params.foreground_threshold, params.min_object_size) > 0
    if not foreground.any():
        return np.zeros(np_prob.shape, dtype=np.int32)

    # OpenCV's default border, BORDER_REFLECT_101, for the Sobel filters and the blur, as HoVer-Net.
    size = params.sobel_kernel_size
    gradient_h = cv2.Sobel(_min_max_scale(hv[0]), cv2.CV_64F, 1, 0, ksize=size)
    gradient_v = cv2.Sobel(_min_max_scale(hv[1]), cv2.CV_64F, 0, 1, ksize=size)
    gradient = np.maximum(1.0 - _min_max_scale(gradient_h), 1.0 - _min_max_scale(gradient_v))
    gradient[~foreground] = 0.0
    energy = -cv2.GaussianBlur((1.0 - gradient) * foreground, (3, 3), 0)

    markers = _filled_holes(foreground & (gradient < params.marker_gradient_threshold))
    ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (params.marker_opening_size,) * 2)
    markers = cv2.morphologyEx(markers.view(np.uint8), cv2.MORPH_OPEN, ellipse)
    markers = _large_components(markers, params.min_object_size)
    # Every marker lies in the mask and keeps its id, so the instances are numbered 1..n already.
    return watershed(energy, markers=markers, mask=foreground).astype(np.int32, copy=False)


def _large_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """4-connected components of ``mask`` with at least ``min_size`` pixels, numbered 1..n (int32)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    kept = stats[:, cv2.CC_STAT_AREA] >= min_size
    kept[0] = False  # background
    new_ids = np.zeros(count, dtype=np.int32)
    new_ids[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
    return new_ids[labels]


def _filled_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the border filled; background
    is 4-connected, as in ``scipy.ndimage.binary_fill_holes``, which HoVer-Net calls here."""
    framed = np.pad(~mask, 1, constant_values=True).view(np.uint8)
    labels = cv2.connectedComponents(framed, connectivity=4)[1]
    return labels[1:-1, 1:-1] != labels[0, 0]  # the frame joins every region that reaches the border


def _min_max_scale(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant map becomes all 0, as cv2.normalize(NORM_MINMAX) does."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    if high - low <= np.finfo(np.float64).eps:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def postprocess(
    np_prob: np.ndarray,
    hv: np.ndarray,
    nc: np.ndarray | None = None,
    params: WatershedParams = WatershedParams(),
) -> PostprocessResult:
    """Instances, the per-pixel type map (each instance painted with its type) and records."""
    instance_map = hover_watershed(np_prob, hv, params)
    nuclei = nucleus_records(instance_map, nc)
    type_map = None
    if nc is not None:
        type_of_id = np.zeros(len(nuclei) + 1, dtype=np.int32)
        type_of_id[1:] = [nucleus.type for nucleus in nuclei]
        type_map = type_of_id[instance_map]
    return PostprocessResult(instance_map, type_map, nuclei)


# -- settings chosen per model ---------------------------------------------------------------

# `cmdfed train tune` (cmdfed/evaluate/tune.py) writes the watershed settings it chose for a
# checkpoint beside its weights; predict, evaluate and edge export read them from here.
TUNED_FILE = "postprocess.json"
# A resolution within this relative distance of the tuned one counts as the same.
MPP_TOLERANCE = 0.1


def tuned_postprocess(checkpoint: Path) -> tuple[WatershedParams, float] | None:
    """The settings ``cmdfed train tune`` chose for this checkpoint folder and the resolution
    they hold at; None when it was not tuned."""
    path = Path(checkpoint) / TUNED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return WatershedParams.from_dict(record["params"]), float(record["mpp"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CmdfedError(f"{path} is damaged ({exc}); delete it and run cmdfed train tune again") from exc


def postprocess_for(checkpoint: Path, mpp: float | None) -> tuple[WatershedParams, str]:
    """The post-processing for images at ``mpp`` (None: unknown) and where it came from:
    the tuned settings when the checkpoint has them (refused at another resolution), else
    HoVer-Net's scaled to ``mpp``."""
    tuned = tuned_postprocess(checkpoint)
    if tuned is None:
        return WatershedParams.for_mpp(mpp), "scaled" if mpp else "hovernet-40x"
    params, tuned_mpp = tuned
    if mpp is not None and abs(mpp - tuned_mpp) > MPP_TOLERANCE * tuned_mpp:
        raise CmdfedError(
            f"{checkpoint} was tuned for {tuned_mpp} um/px but these images are {mpp} um/px: give images at the "
            f"tuned resolution, or tune it on a validation store at {mpp} um/px (cmdfed train tune)"
        )
    return params, "tuned"
