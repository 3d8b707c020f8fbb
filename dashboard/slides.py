"""Inference output folders (written by ``cmdfed edge infer``) for the slide viewer.

A folder holds ``summary.json`` (slide name, dimensions, counts by type ...), ``cells.geojson``
(a QuPath FeatureCollection: one Polygon per nucleus in level-0 pixels, its type in
``properties.classification`` with a name and an RGB colour) and ``labels.ome.zarr``; see
:mod:`cmdfed.inference.nuclei` (the features), :mod:`edge.outputs` (the labels) and
:mod:`edge.infer`. The viewer draws the outlines over the slide when it finds the slide
(:func:`locate_slide`: where the summary recorded it) or is given it, else over a blank canvas.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from cmdfed.data.slide import open_slide
from cmdfed.errors import CmdfedError
from cmdfed.slide_outputs import GEOJSON, SLIDE_FILE, SUMMARY, slide_file_mismatch

#: Longest side of a rendered view, in screen pixels.
VIEW_SIDE = 1024
#: A region read from the slide at once is at most this many pixels.
MAX_READ_PIXELS = 16 * 1024 * 1024
#: A view whose region holds more than this many MAX_READ_PIXELS even at the coarsest level (a
#: slide without a pyramid) is refused: reading it band by band would take too long for a page.
MAX_BANDED_READS = 16
BLANK = (255, 255, 255)


@dataclass
class Nucleus:
    ring: np.ndarray  # (n, 2) level-0 x, y
    type_name: str
    colour: tuple[int, int, int]


@dataclass
class SlideOutput:
    folder: Path
    summary: dict
    nuclei: list[Nucleus]

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of the slide's level 0, from the summary or else the nuclei."""
        if self.summary.get("dimensions"):
            width, height = self.summary["dimensions"]
            return int(width), int(height)
        if not self.nuclei:
            return (1, 1)
        corner = np.max([n.ring.max(axis=0) for n in self.nuclei], axis=0)
        return math.ceil(corner[0]), math.ceil(corner[1])


def inside(root: str | Path, path: str | Path, what: str) -> Path:
    """``path`` (relative paths are taken under ``root``) resolved, links included, when it lies
    in ``root``; else one ``CmdfedError`` saying how to widen the root. The viewer sends what it
    reads to the browser, so it reads nothing outside the folder it was given."""
    root = Path(root).resolve()
    path = Path(path)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not resolved.is_relative_to(root):
        raise CmdfedError(
            f"{path} is outside {root}, the only folder this dashboard shows files from: start "
            f"`cmdfed dashboard --files-root DIR` with a folder that holds this {what}"
        )
    return resolved


def is_inside(root: str | Path, path: str | Path) -> bool:
    try:
        inside(root, path, "file")
    except CmdfedError:
        return False
    return True


def output_folders(root: str | Path | None) -> list[Path]:
    """Folders at or below ``root`` (two levels deep) holding a summary or a GeoJSON."""
    if not root:
        return []
    root = Path(root)
    if not root.is_dir():
        return []
    candidates = [root, *root.glob("*"), *root.glob("*/*")]
    return sorted(p for p in candidates if p.is_dir() and ((p / SUMMARY).is_file() or (p / GEOJSON).is_file()))


def load_output(folder: str | Path) -> SlideOutput:
    """Read a folder's summary and nuclei; a clear ``CmdfedError`` when it is not an output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CmdfedError(f"{folder} is not a folder: give an output folder of `cmdfed edge infer --out`")
    geojson = folder / GEOJSON
    if not geojson.is_file():
        raise CmdfedError(
            f"{folder} has no {GEOJSON}: `cmdfed edge infer SLIDE --out {folder}` writes it when a slide finishes "
            "(an interrupted run resumes when started again)"
        )
    summary = {}
    if (folder / SUMMARY).is_file():
        summary = _read_json(folder / SUMMARY)
    collection = _read_json(geojson)
    if collection.get("type") != "FeatureCollection":
        raise CmdfedError(f"{geojson} is not a GeoJSON FeatureCollection")
    return SlideOutput(folder, summary, [n for n in map(_nucleus, collection.get("features", [])) if n])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CmdfedError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CmdfedError(f"{path} does not hold a JSON object")
    return data


def _nucleus(feature: dict) -> Nucleus | None:
    geometry = feature.get("geometry") or {}
    if geometry.get("type") != "Polygon" or not geometry.get("coordinates"):
        return None
    classification = (feature.get("properties") or {}).get("classification") or {}
    colour = tuple(int(c) for c in classification.get("color", (0, 200, 0)))[:3]
    return Nucleus(
        np.asarray(geometry["coordinates"][0], dtype=float),
        classification.get("name", "Nucleus"),
        colour,
    )


def counts_by_type(output: SlideOutput) -> pd.DataFrame:
    """Nuclei per type in the GeoJSON, most frequent first, with each type's colour."""
    frame = pd.DataFrame(
        [(n.type_name, "#{:02x}{:02x}{:02x}".format(*n.colour)) for n in output.nuclei],
        columns=["type", "colour"],
    )
    if frame.empty:
        return pd.DataFrame(columns=["type", "count", "colour"])
    counts = frame.groupby("type").agg(count=("type", "size"), colour=("colour", "first")).reset_index()
    return counts.sort_values(["count", "type"], ascending=[False, True], ignore_index=True)


@dataclass(frozen=True)
class SlideLookup:
    """The output's slide as the viewer found it: ``path`` (inside the files root) or None, and
    ``message``: how it was found, or why it was not and what to do."""

    path: Path | None
    message: str


def locate_slide(output: SlideOutput, files_root: str | Path) -> SlideLookup:
    """Find the output's slide inside ``files_root``, as QuPath finds a project's images: where
    the summary recorded it (relative to the output folder, then absolute; see
    :mod:`cmdfed.slide_outputs`), else by its name next to the output folder or in it (outputs
    of older versions record no place). A file is taken only when it is the recorded slide (same
    size and quick hash). Of a file outside the root only its existence is looked at, and no
    path outside the root is named: the messages go to the browser."""
    name = output.summary.get("slide")
    typing = "type its path below to show it behind the nuclei"
    if not name:
        return SlideLookup(None, f"The summary names no slide: {typing}.")
    root = Path(files_root).resolve()
    record = _slide_record(output.summary)
    recorded = "where this output recorded it"
    by_name = "by its name next to the output folder"
    places = [(output.folder.parent / name, by_name), (output.folder / name, by_name)]
    if record:
        places[:0] = [
            (output.folder / record["relative_path"], recorded),
            (Path(record["absolute_path"]), recorded),
        ]
    outside, replaced = False, None
    for place, where in places:
        if not is_inside(root, place):
            outside = outside or _is_file(place)
            continue
        path = inside(root, place, "slide")
        if not _is_file(path):
            continue
        differs = _mismatch(path, record) if record else None
        if differs:
            replaced = replaced or (path, differs)
            continue
        if record:
            check = "same size and quick hash as recorded"
        else:
            check = "this output records no slide to check it against"
        return SlideLookup(path, f"Slide found {where}: `{path.relative_to(root)}` ({check}).")
    if replaced:
        path, differs = replaced
        return SlideLookup(
            None,
            f"`{path.relative_to(root)}` is not the slide this output was made from ({differs}); {typing}.",
        )
    if outside:
        return SlideLookup(
            None,
            f"{name} lies outside {root}, the only folder this dashboard shows files from: start "
            f"`cmdfed dashboard --files-root DIR` with a folder that holds it, or {typing}.",
        )
    if record:
        why = "is no longer where this output recorded it, nor next to the output folder"
        return SlideLookup(None, f"{name} {why} (moved or deleted): {typing}.")
    if SLIDE_FILE in output.summary:
        why = f"This output's record of where {name} was is damaged"
    else:
        why = f"This output does not record where {name} was (an older cmdfed wrote it)"
    return SlideLookup(None, f"{why} and no {name} lies next to its folder: {typing}.")


def typed_slide_mismatch(output: SlideOutput, path: Path) -> str | None:
    """How the file ``path`` differs from the slide the output recorded; None when it does not
    or nothing was recorded."""
    record = _slide_record(output.summary)
    return _mismatch(path, record) if record and _is_file(path) else None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a folder on the way that this process may not enter
        return False


def _mismatch(path: Path, record: dict) -> str | None:
    try:
        return slide_file_mismatch(path, record)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _slide_record(summary: dict) -> dict | None:
    """The summary's record of the slide's place; None for outputs of older versions and for a
    damaged record (it can neither find nor check anything)."""
    record = summary.get(SLIDE_FILE)
    fields = {"absolute_path": str, "relative_path": str, "bytes": int, "quick_sha256": str}
    if not isinstance(record, dict):
        return None
    return record if all(isinstance(record.get(k), kind) for k, kind in fields.items()) else None


def render(
    output: SlideOutput,
    region: tuple[int, int, int, int] | None = None,
    slide_path: str | Path | None = None,
    side: int = VIEW_SIDE,
) -> tuple[Image.Image, str]:
    """The region (x0, y0, x1, y1 in level-0 pixels; whole slide when None) with nuclei outlines
    in their type's colour, and a note on the background (slide or blank canvas and why)."""
    width, height = output.dimensions
    x0, y0, x1, y1 = region or (0, 0, width, height)
    scale = max(x1 - x0, y1 - y0) / side  # level-0 pixels per view pixel
    size = (max(1, round((x1 - x0) / scale)), max(1, round((y1 - y0) / scale)))
    image, note = _background(slide_path, (x0, y0, x1, y1), size, scale)
    draw = ImageDraw.Draw(image)
    for nucleus in output.nuclei:
        ring = nucleus.ring
        if ring[:, 0].max() < x0 or ring[:, 0].min() > x1 or ring[:, 1].max() < y0 or ring[:, 1].min() > y1:
            continue
        points = [((x - x0) / scale, (y - y0) / scale) for x, y in ring]
        draw.line(points + points[:1], fill=nucleus.colour, width=2 if scale < 1 else 1)
    return image, note


def _background(slide_path, region, size, scale) -> tuple[Image.Image, str]:
    if not slide_path:
        return Image.new("RGB", size, BLANK), "slide not found: outlines over a blank canvas"
    try:
        with open_slide(slide_path) as reader:
            image, level = _read_view(reader, region, size, scale)
    except CmdfedError as exc:
        return Image.new("RGB", size, BLANK), f"slide unreadable ({exc}): outlines over a blank canvas"
    return image, f"over {Path(slide_path).name} (level {level})"


def _read_view(reader, region, size, scale) -> tuple[Image.Image, int]:
    """The region resized to ``size``, read at the finest pyramid level not finer than the view
    whose read stays within MAX_READ_PIXELS; when even the coarsest level is larger (a whole-slide
    view of a big slide), that level is read in bands of rows, each resized to its part of the view."""
    x0, y0, x1, y1 = region
    downsamples = reader.level_downsamples
    levels = sorted(range(len(downsamples)), key=lambda i: downsamples[i])
    finest = max(
        (i for i in levels if downsamples[i] <= max(scale, 1.0) + 1e-6), key=downsamples.__getitem__, default=levels[0]
    )
    for level in levels[levels.index(finest) :]:
        w, h = math.ceil((x1 - x0) / downsamples[level]), math.ceil((y1 - y0) / downsamples[level])
        if w * h <= MAX_READ_PIXELS:
            pixels = reader.read_region(x0, y0, level, w, h)
            return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR), level
    level = levels[-1]
    if w * h > MAX_BANDED_READS * MAX_READ_PIXELS:
        raise CmdfedError(
            f"the slide's coarsest level ({level}) holds {w * h / 1e6:.0f} Mpx for this region, too many "
            "to read for one view; zoom in further"
        )
    downsample = downsamples[level]
    rows = max(1, MAX_READ_PIXELS // w)
    ratio = size[1] / h  # level rows -> view rows
    bands = []
    for top in range(0, h, rows):
        n = min(rows, h - top)
        target = round((top + n) * ratio) - round(top * ratio)
        if target <= 0:
            continue
        pixels = reader.read_region(x0, y0 + round(top * downsample), level, w, n)
        bands.append(np.asarray(Image.fromarray(pixels).resize((size[0], target), Image.Resampling.BILINEAR)))
    return Image.fromarray(np.concatenate(bands, axis=0)), level
