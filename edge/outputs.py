"""Whole-slide inference's instance labels as OME-Zarr (its GeoJSON features are
``cmdfed.inference.nuclei``'s).

NGFF 0.4 on Zarr format 2 (the version napari-ome-zarr, ome-zarr-py and most
viewers read today), written with zarr 3's v2 support: ``labels.ome.zarr/labels/nuclei``
is a multiscales label image (uint32 ids equal to the GeoJSON ``nucleus_id``; axes y, x
with the slide's micrometres per pixel when known) and ``labels/.zattrs`` lists it. The
root holds no image (the slide is the image); open ``labels.ome.zarr/labels/nuclei`` in
napari. Level 0 is written tile by tile; lower levels are made at the end by taking every
second pixel (labels must not be averaged), block by block.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import zarr

LABEL_NAME = "nuclei"
CHUNK = 1024


def create_label_zarr(path: Path, width: int, height: int) -> zarr.Array:
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    labels = root.require_group("labels")
    labels.attrs["labels"] = [LABEL_NAME]
    group = labels.require_group(LABEL_NAME)
    return _create_level(group, "0", (height, width))


def open_label_level0(path: Path) -> zarr.Array:
    return zarr.open_array(str(path / "labels" / LABEL_NAME / "0"), mode="r+", zarr_format=2)


def sync_label_chunks(path: Path, squares: list[tuple[int, int, int]]) -> None:
    """fsync level 0's chunk files under the (x, y, side) squares, and their folders, so a
    batch recorded as done survives a power cut with its labels (not only its features)."""
    level0 = path / "labels" / LABEL_NAME / "0"
    keys = {
        (cy, cx)
        for x, y, side in squares
        for cy in range(y // CHUNK, (y + side - 1) // CHUNK + 1)
        for cx in range(x // CHUNK, (x + side - 1) // CHUNK + 1)
    }
    folders = set()
    for cy, cx in sorted(keys):
        chunk = level0 / str(cy) / str(cx)
        if chunk.is_file():  # a chunk never written holds only the fill value
            _fsync(chunk, os.O_RDONLY)
            folders.add(chunk.parent)
    for folder in sorted(folders) + ([level0] if folders else []):
        _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_level(group: zarr.Group, name: str, shape: tuple[int, int]) -> zarr.Array:
    chunks = (min(CHUNK, shape[0]), min(CHUNK, shape[1]))
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype="uint32",
        fill_value=0,
        overwrite=True,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )


def finish_label_zarr(path: Path, mpp: float | None, min_side: int = CHUNK) -> int:
    """Build the pyramid below level 0 and write the NGFF metadata; returns the number of levels."""
    group = zarr.open_group(str(path / "labels" / LABEL_NAME), mode="r+", zarr_format=2)
    previous = group["0"]
    levels = 1
    for old in [k for k in group.array_keys() if k != "0"]:
        shutil.rmtree(path / "labels" / LABEL_NAME / old, ignore_errors=True)
    while max(previous.shape) > min_side:
        shape = (math.ceil(previous.shape[0] / 2), math.ceil(previous.shape[1] / 2))
        level = _create_level(group, str(levels), shape)
        step = 2 * CHUNK
        for y in range(0, previous.shape[0], step):
            for x in range(0, previous.shape[1], step):
                block = previous[y : y + step, x : x + step][::2, ::2]
                level[y // 2 : y // 2 + block.shape[0], x // 2 : x // 2 + block.shape[1]] = block
        previous, levels = level, levels + 1
    group.attrs.update(_ngff_label_attrs(levels, mpp))
    return levels


def _ngff_label_attrs(levels: int, mpp: float | None) -> dict:
    unit = {"unit": "micrometer"} if mpp else {}
    pixel = mpp or 1.0
    return {
        "multiscales": [
            {
                "version": "0.4",
                "name": LABEL_NAME,
                "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
                "datasets": [
                    {
                        "path": str(i),
                        "coordinateTransformations": [{"type": "scale", "scale": [pixel * 2**i, pixel * 2**i]}],
                    }
                    for i in range(levels)
                ],
                "type": "nearest (every second pixel)",
            }
        ],
        "image-label": {"version": "0.4", "source": {"image": "../../"}},
    }
