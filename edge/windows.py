"""Tiles larger than the model's in model-sized pieces, so a request's memory does not grow with
the square of its side (`cmdfed edge serve`'s SegmentTiles).

    uint8 tile (H, W, 3) --padded with white to the network's multiple-->
        windows of the bundle's tile size on ``cmdfed.inference.tiling``'s grid, as whole-slide
        inference cuts a slide, at most ``batch`` per backend call
        --maps of each window, weighted by a ramp that falls towards the window's edge-->
        summed into tile-sized maps, divided by the summed weights (in place)
    --> NP/HV/NC maps of the whole tile, then post-processed once (no seams to stitch)

This is the blending of ``cmdfed.inference.predict_image_maps`` (what `cmdfed predict` does with
PyTorch) over an edge backend, with the bundle's tile size and overlap as the window and its
margin. Memory: one batch of windows in the backend (the same shape whatever the tile's size),
plus the tile's maps, ``(1 + 2 + classes + 1) * 4`` bytes per pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from cmdfed.inference.tiling import grid_starts

Run = Callable[[np.ndarray], dict[str, np.ndarray]]


def padded_side(n: int, multiple: int, min_side: int) -> int:
    """The side a tile side of ``n`` pixels is padded to for the network."""
    return max(min_side, math.ceil(n / multiple) * multiple)


def pad_white(image: np.ndarray, multiple: int, min_side: int) -> np.ndarray:
    """``image`` padded with white on the right and bottom to sides the network accepts."""
    h, w = image.shape[:2]
    height, width = padded_side(h, multiple, min_side), padded_side(w, multiple, min_side)
    if (height, width) == (h, w):
        return image
    padded = np.full((height, width, 3), 255, np.uint8)
    padded[:h, :w] = image
    return padded


def window_weight(height: int, width: int, margin: int) -> np.ndarray:
    """float32 (height, width): 1 inside, falling linearly over ``margin`` pixels to each edge."""

    def ramp(size: int) -> np.ndarray:
        r = np.minimum(np.arange(size) + 1, np.arange(size)[::-1] + 1).astype(np.float32)
        return np.clip(r / max(margin, 1), 1e-3, 1.0)

    return np.outer(ramp(height), ramp(width))


def window_corners(
    height: int, width: int, window: int, overlap: int, multiple: int
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The windows' size (height, width) over a padded tile and their (y, x) corners on the grid."""
    wh, ww = min(window, height), min(window, width)
    shared = window - max(window - overlap, multiple)  # windows at least the network's multiple apart
    return (wh, ww), [(y, x) for y in grid_starts(height, wh, shared) for x in grid_starts(width, ww, shared)]


def cheapest_window(height: int, width: int, window: int, overlap: int, multiple: int) -> int:
    """``window`` (the bundle's tile), or half of it where the windows of half the side compute
    fewer pixels for a padded tile of ``height`` x ``width``: a 1024 px tile takes 25 windows of
    256 px (1.6 Mpx) against 9 of 512 px (2.4 Mpx). Half must stay a multiple of the network's
    and wider than the overlap; a tie keeps ``window``."""

    def computed(side: int) -> int:
        (wh, ww), corners = window_corners(height, width, side, overlap, multiple)
        return len(corners) * wh * ww

    half = window // 2
    if half % multiple or half <= overlap:
        return window
    return min((window, half), key=computed)


def windowed_maps(
    run: Run, image: np.ndarray, *, window: int, overlap: int, multiple: int, min_side: int, batch: int
) -> dict[str, np.ndarray]:
    """The backend's maps for one uint8 RGB tile of any size, computed ``window`` pixels at a time
    (``run``: a backend's ``run``); cropped back to the tile."""
    h, w = image.shape[:2]
    padded = pad_white(image, multiple, min_side)
    height, width = padded.shape[:2]
    (wh, ww), corners = window_corners(height, width, window, overlap, multiple)
    weight = window_weight(wh, ww, overlap)
    sums: dict[str, np.ndarray] = {}
    total = np.zeros((height, width), np.float32)
    for start in range(0, len(corners), batch):
        chunk = corners[start : start + batch]
        maps = run(np.stack([padded[y : y + wh, x : x + ww] for y, x in chunk]))
        for k, (y, x) in enumerate(chunk):
            for name, value in maps.items():
                if name not in sums:
                    sums[name] = np.zeros(value.shape[1:-2] + (height, width), np.float32)
                sums[name][..., y : y + wh, x : x + ww] += value[k] * weight
            total[y : y + wh, x : x + ww] += weight
        del maps
    for value in sums.values():
        value /= total
    return {name: value[..., :h, :w] for name, value in sums.items()}
