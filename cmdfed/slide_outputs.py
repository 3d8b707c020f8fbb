"""The folder a whole-slide inference writes: what ``cmdfed edge infer`` leaves and the
dashboard's slide viewer reads (see ``edge.infer``; the GeoJSON features are written by
``cmdfed.inference.nuclei``, the labels by ``edge.outputs``).

    OUT/summary.json       counts per type, area analysed, model version, backend, timings,
                           and where the slide was (``slide_file``, below)
    OUT/cells.geojson      QuPath FeatureCollection: one polygon per nucleus, typed
    OUT/labels.ome.zarr    instance labels, NGFF 0.4 (napari)

The slide's place is recorded as QuPath records a project's images: its absolute path, and
its path relative to OUT, which still leads to it when the folder holding both is moved or
mounted elsewhere (another machine, the dashboard's). With it go the slide's size and
``quick_sha256``, so a viewer can tell the slide from another file at the same place before
drawing nuclei over it. Outputs of older versions have no record.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SUMMARY = "summary.json"
GEOJSON = "cells.geojson"
LABELS_DIR = "labels.ome.zarr"
SLIDE_FILE = "slide_file"  # the summary's record of the slide's place

# A slide is known again by the sha256 of its first and last MiB (the whole file when it is no
# larger than both), as OpenSlide's quickhash hashes a part of it: the header and the tile
# index (at either end of a TIFF) differ between scans, and hashing a multi-GB slide whole
# each time a viewer opens it would take seconds to minutes.
QUICK_HASH_PART = 1 << 20


def quick_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file's first and last ``QUICK_HASH_PART`` bytes (all of it when smaller)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= 2 * QUICK_HASH_PART:
            digest.update(f.read())
        else:
            digest.update(f.read(QUICK_HASH_PART))
            f.seek(size - QUICK_HASH_PART)
            digest.update(f.read(QUICK_HASH_PART))
    return digest.hexdigest()


def slide_file_record(slide: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Where ``slide`` is and how to know it again, for the summary written in ``out_dir``.

    Paths are taken as given (made absolute, not through links): the place the user named is
    the one a viewer should look in again."""
    slide_path = os.path.abspath(slide)
    return {
        "absolute_path": slide_path,
        "relative_path": Path(os.path.relpath(slide_path, os.path.abspath(out_dir))).as_posix(),
        "bytes": os.path.getsize(slide_path),
        "quick_sha256": quick_sha256(slide_path),
    }


def slide_file_mismatch(path: str | os.PathLike, record: dict) -> str | None:
    """None when the file at ``path`` is the slide ``record`` describes; else how it differs."""
    size = os.path.getsize(path)
    if size != record["bytes"]:
        return f"{size} bytes, the slide had {record['bytes']}"
    if quick_sha256(path) != record["quick_sha256"]:
        return "same size, different content"
    return None
