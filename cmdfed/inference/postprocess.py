"""Nuclei instances, types and per-nucleus records from CMD's NP, HV and NC outputs.

Instance separation is HoVer-Net's marker-controlled watershed (Graham et al. 2019,
section III-C; ``__proc_np_hv`` in vqdang/hover_net ``models/hovernet/post_proc.py``),
re-implemented without OpenCV:

1. Foreground: NP probability >= ``foreground_threshold``; connected blobs
   (4-connectivity) smaller than ``min_object_size`` pixels are dropped.
2. The H and V maps are each min-max scaled to [0, 1] over the whole tile and
   differentiated along their own axis with an OpenCV-style Sobel filter of size
   ``sobel_kernel_size`` (binomial smoothing across, binomial derivative along; the
   reflect-101 border OpenCV uses). Inside a nucleus the H map rises steadily from -1
   to +1; where two nuclei touch it falls from +1 to -1, so after min-max scaling the
   derivative and taking ``1 - d``, touching boundaries are near 1 and nucleus
   interiors near 0. The gradient map is the larger of the two, set to 0 off the
   foreground.
3. Energy: ``(1 - gradient)`` on the foreground, blurred by OpenCV's 3x3 Gaussian
   ([1, 2, 1] / 4 in each direction) and negated, so nucleus interiors are basins.
4. Markers: foreground pixels whose gradient is below ``marker_gradient_threshold``,
   holes filled, opened with OpenCV's ``marker_opening_size`` ellipse, labelled
   (4-connectivity), components smaller than ``min_object_size`` dropped.
5. ``skimage.segmentation.watershed`` of the energy from the markers, restricted to
   the foreground. Foreground blobs that received no marker are left out, as in
   HoVer-Net. Output ids are renumbered 1..n.

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

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed

from cmdfed.errors import CmdfedError
from cmdfed.inference.nuclei import LabelIndex, NucleusRecord, nucleus_records

# Micrometres per pixel HoVer-Net's post-processing settings were tuned at (40x).
REFERENCE_MPP = 0.25
# OpenCV's GaussianBlur with ksize 3 and sigma 0 uses this fixed kernel.
_GAUSSIAN_3 = np.array([0.25, 0.5, 0.25])


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


def remove_small_instances(instance_map: np.ndarray, min_size: int) -> np.ndarray:
    """A copy of ``instance_map`` with instances of fewer than ``min_size`` pixels set to 0.

    Works on label maps with any ids; label a binary mask first (``ndimage.label``).
    """
    labels = LabelIndex.of(instance_map)
    too_small = np.append(labels.areas < min_size, False)  # index -1 is background
    cleaned = instance_map.copy()
    cleaned[too_small[labels.pixel_rows].reshape(instance_map.shape)] = 0
    return cleaned


def hover_watershed(np_prob: np.ndarray, hv: np.ndarray, params: WatershedParams = WatershedParams()) -> np.ndarray:
    """Instance map (int32, ids 1..n) from NP probability (H, W) and HV maps (2, H, W)."""
    np_prob = np.asarray(np_prob, dtype=np.float32)
    hv = np.asarray(hv, dtype=np.float32)
    if np_prob.ndim != 2 or hv.shape != (2, *np_prob.shape):
        raise CmdfedError(
            f"expected NP probability (H, W) and HV maps (2, H, W), got {np_prob.shape} "
            f"and {hv.shape}; take the nucleus channel of NP and keep HV channel-first"
        )
    blobs = ndimage.label(np_prob >= params.foreground_threshold)[0]
    foreground = remove_small_instances(blobs, params.min_object_size) > 0
    if not foreground.any():
        return np.zeros(np_prob.shape, dtype=np.int32)

    smooth, derive = _sobel_kernels(params.sobel_kernel_size)
    gradient_h = _sobel(_min_max_scale(hv[0]), derive_axis=1, smooth=smooth, derive=derive)
    gradient_v = _sobel(_min_max_scale(hv[1]), derive_axis=0, smooth=smooth, derive=derive)
    gradient = np.maximum(1.0 - _min_max_scale(gradient_h), 1.0 - _min_max_scale(gradient_v))
    gradient[~foreground] = 0.0

    energy = (1.0 - gradient) * foreground
    energy = -ndimage.correlate1d(
        ndimage.correlate1d(energy, _GAUSSIAN_3, axis=0, mode="mirror"),
        _GAUSSIAN_3,
        axis=1,
        mode="mirror",
    )

    markers = foreground & (gradient < params.marker_gradient_threshold)
    markers = ndimage.binary_fill_holes(markers)
    markers = _open_like_opencv(markers, _opencv_ellipse(params.marker_opening_size))
    markers = remove_small_instances(ndimage.label(markers)[0], params.min_object_size)

    instances = watershed(energy, markers=markers, mask=foreground)
    return relabel_sequential(instances)[0].astype(np.int32)


def _min_max_scale(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant map becomes all 0, as cv2.normalize(NORM_MINMAX) does."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    if high - low <= np.finfo(np.float64).eps:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _sobel_kernels(size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's Sobel kernels of aperture ``size``: binomial smoothing and derivative."""
    smooth = np.array([1.0])
    for _ in range(size - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    derive = np.array([1.0])
    for _ in range(size - 2):
        derive = np.convolve(derive, [1.0, 1.0])
    # Correlation weights: right neighbour minus left neighbour is a positive slope.
    return smooth, np.convolve(derive, [-1.0, 1.0])


def _sobel(image: np.ndarray, derive_axis: int, smooth: np.ndarray, derive: np.ndarray) -> np.ndarray:
    # "mirror" is OpenCV's default BORDER_REFLECT_101.
    derived = ndimage.correlate1d(image, derive, axis=derive_axis, mode="mirror")
    return ndimage.correlate1d(derived, smooth, axis=1 - derive_axis, mode="mirror")


def _opencv_ellipse(size: int) -> np.ndarray:
    """cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)) without OpenCV.

    For size 5 this is a 5x5 square minus the four corner pairs, which differs from
    skimage's ``disk(2)``; matching it keeps marker shapes identical to HoVer-Net's.
    """
    radius = size // 2
    element = np.zeros((size, size), dtype=bool)
    for row in range(size):
        # cvRound rounds half to even, like np.rint.
        half_width = int(np.rint(np.sqrt(radius**2 - (row - radius) ** 2)))
        element[row, radius - half_width : radius + half_width + 1] = True
    return element


def _open_like_opencv(mask: np.ndarray, element: np.ndarray) -> np.ndarray:
    # OpenCV pads erosion with foreground and dilation with background, so objects
    # touching the tile edge are not eaten from outside.
    eroded = ndimage.binary_erosion(mask, structure=element, border_value=1)
    return ndimage.binary_dilation(eroded, structure=element, border_value=0)


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
