"""Training targets for the HoVer-Net style heads of CMD: NP, HV and NC.

Given an instance map (``H x W`` integers, 0 = background, any other value = one
nucleus; ids need not be contiguous) and optionally a per-pixel type map, this module
builds the three targets of Graham et al. 2019, "HoVer-Net: Simultaneous segmentation
and classification of nuclei in multi-tissue histology images":

NP (nuclear pixels)
    1 inside any nucleus, 0 elsewhere.

HV (horizontal and vertical distance maps), channel 0 = horizontal (x), 1 = vertical (y)
    For each nucleus, every pixel's column (x) and row (y) offset from the nucleus's
    centre of mass, the centre rounded to the nearest pixel so that the centre pixel
    is exactly 0. Each side is scaled separately into [-1, 1]: negative offsets are
    divided by the largest negative distance, positive ones by the largest positive
    distance, so the leftmost pixel of a nucleus is -1 and the rightmost +1 however
    lopsided the nucleus is. Background is 0. The sharp jump from +1 to -1 where two
    nuclei touch is what post-processing turns into separating boundaries.

    Difference from HoVer-Net's reference code: it numbers pixels from 1 (``np.arange(1,
    w + 1) - centre``), which puts the zero one pixel left of / above the centre of
    mass. Here pixels are numbered from 0, so the zero is on the centre pixel and a
    symmetric nucleus gets a symmetric map. HoVer-Net also skips nuclei smaller than
    30 pixels after cropping its training patches; nothing is skipped here, cropping
    is the data pipeline's business.

NC (nuclear class)
    The type map inside nuclei and 0 (background) outside, so NC and NP agree on
    which pixels are background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cmdfed.errors import CmdfedError


@dataclass(frozen=True)
class HoverTargets:
    """Targets for one tile.

    ``nuclear_pixels``: (H, W) int64, 1 = nucleus.
    ``hv``: (2, H, W) float32, channel 0 horizontal, channel 1 vertical, in [-1, 1].
    ``nuclear_types``: (H, W) int64 type per pixel (0 = background), or None when no
    type map was given.
    """

    nuclear_pixels: np.ndarray
    hv: np.ndarray
    nuclear_types: np.ndarray | None


def check_label_map(labels: np.ndarray, name: str) -> None:
    """Raise CmdfedError unless ``labels`` is a 2-D map of non-negative integers (or bools)."""
    if labels.ndim != 2:
        raise CmdfedError(f"{name} must be a 2-D (H, W) array, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise CmdfedError(
            f"{name} must hold integers, got dtype {labels.dtype}; "
            "convert it with .astype(np.int32) if the values are whole numbers"
        )
    if labels.size and labels.min() < 0:
        raise CmdfedError(f"{name} has negative values; use 0 for background and >0 ids")


def horizontal_vertical_map(instance_map: np.ndarray) -> np.ndarray:
    """The (2, H, W) float32 HV target of ``instance_map`` (see the module docstring)."""
    check_label_map(instance_map, "instance_map")
    hv = np.zeros((2, *instance_map.shape), dtype=np.float32)
    # Sequential labels let find_objects work on a short list even for ids like 10**9.
    _, sequential = np.unique(instance_map, return_inverse=True)
    sequential = sequential.reshape(instance_map.shape)
    if instance_map.size and instance_map.min() > 0:
        sequential += 1  # no background: every unique value is a nucleus
    for label, box in enumerate(ndimage.find_objects(sequential), start=1):
        if box is None:
            continue
        rows, cols = np.nonzero(sequential[box] == label)
        rows += box[0].start
        cols += box[1].start
        hv[0, rows, cols] = _scaled_offsets(cols)
        hv[1, rows, cols] = _scaled_offsets(rows)
    return hv


def _scaled_offsets(coordinates: np.ndarray) -> np.ndarray:
    """Offsets from the rounded mean, each sign scaled by its own largest magnitude."""
    centre = np.floor(coordinates.mean() + 0.5)
    offsets = (coordinates - centre).astype(np.float32)
    negative = offsets < 0
    positive = offsets > 0
    if negative.any():
        offsets[negative] /= -offsets[negative].min()
    if positive.any():
        offsets[positive] /= offsets[positive].max()
    return offsets


def make_targets(instance_map: np.ndarray, type_map: np.ndarray | None = None) -> HoverTargets:
    """NP, HV and (when ``type_map`` is given) NC targets for one tile."""
    check_label_map(instance_map, "instance_map")
    nuclear_pixels = (instance_map > 0).astype(np.int64)
    nuclear_types = None
    if type_map is not None:
        check_label_map(type_map, "type_map")
        if type_map.shape != instance_map.shape:
            raise CmdfedError(
                f"type_map has shape {type_map.shape} but instance_map has "
                f"{instance_map.shape}; both must describe the same tile"
            )
        nuclear_types = np.where(nuclear_pixels > 0, type_map, 0).astype(np.int64)
    return HoverTargets(nuclear_pixels, horizontal_vertical_map(instance_map), nuclear_types)
