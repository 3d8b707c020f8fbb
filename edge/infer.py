"""Whole-slide inference (`cmdfed edge infer`): slide -> nuclei, streamed and resumable.

One tile's route from the slide to ``cells.geojson``, seven files:

    1. edge/infer.py                   this job: read grid, plan, batch, keep, write, resume
                                       (its stages pipelined by cmdfed/pipeline.py)
    2. cmdfed/data/slide.py            open_slide, read_level_region; level_for_mpp: the level
                                       to read; tissue_grid: tissue tiles on the model's grid,
                                       the bundle's tile size and overlap
    3. cmdfed/inference/tiling.py      the grid the tiles lie on; resample_image: a tile read
                                       at another resolution resampled to the model's (when the
                                       slide has no level at it); TileGrid.owned: which tile
                                       keeps a nucleus on a seam
       cmdfed/inference/stain.py       macenko: a tile re-stained as the model's training
                                       images, from the slide's stains (estimated once)
    4. edge/backends.py                Backend.run: uint8 tiles -> NP/HV/NC maps
                                       (ONNX Runtime or TensorRT)
    5. cmdfed/inference/postprocess.py postprocess: maps -> instance map (HoVer watershed,
                                       the manifest's WatershedParams) -> records
    6. cmdfed/inference/nuclei.py      nucleus_records: centroid, contour, type;
                                       nucleus_feature: the GeoJSON feature (+0.5 rule, scaled
                                       to level 0); write_feature_collection: cells.geojson

    tissue tiles --batches--> read --> backend --per tile--> postprocess --TileGrid.owned--> kept
        -> their pixels into OUT/labels.ome.zarr level 0 (global ids, on disk; edge/outputs.py)
        -> their GeoJSON features appended to OUT/.work/features.jsonl

Pipeline: reading (and resampling) a batch's tiles, the model, and post-processing (the
watershed and which tile keeps which nucleus) each run on a thread of their own
(``cmdfed.pipeline``), joined by queues of PIPELINE_DEPTH batches, so that the next batch
is read and the previous one post-processed while the model runs; decoders, ONNX Runtime
and most of numpy, scipy and scikit-image's work release the GIL. Writing labels and
features, committing and reporting progress stay in the calling thread, in tile order, so
outputs and resume are as they were without the pipeline. An error in any stage stops the
others and is raised by ``infer_slide`` as it was raised; nothing a stage did is half-written.
The summary's ``timings_s`` are each stage's own time: they overlap, so their sum exceeds
the wall time. Before the tiles, once the slide has opened, the backend (its graph loaded and
checked on the bundle's golden tiles, ``edge.selection``) is made on a thread of its own while
the slide's tissue is found; graphs to be timed are timed after that, alone. The job takes its
output folder only once the backend has passed, so a refused model leaves nothing behind (and
a second job on a busy folder is told so only then).

Colours: a bundle whose model records its training images' stain statistics
(``preprocessing.stain_reference``) sees every tile re-stained as them (Macenko,
``cmdfed.inference.stain``) in the read stage, from one estimate of the slide's own stains,
made once on tissue tiles spread over it at the model's resolution: every tile moves alike, and
tiles of the same tissue keep the same colours. ``stain_normalise=False`` (``--no-stain-
normalise``) feeds tiles as scanned. Both statistics are part of the job's fingerprint.

Resolution (:class:`ReadGrid`): the model sees nuclei at the size it learnt them, the
bundle's ``preprocessing.mpp`` (tile size and overlap are in its pixels too). Tiles lie on
a grid of the model's resolution laid over the slide. They are read from the coarsest
pyramid level at least as fine as the model (``level_for_mpp``): a level within 5 % of it
is read as it is (its pixels are the grid's; for a slide at the model's resolution that is
level 0, and nothing below differs from a plain level-0 run); otherwise the tile's square
is read from that level with a margin and resampled (``resample_image``), which is the case
for a 40x slide whose pyramid has no 20x level (read from level 0, noted in the summary).
Everything is segmented, kept and counted on the grid and written in level-0 terms: each
kept nucleus's grid pixels are nearest-upsampled into the level-0 label image (a level-0
pixel takes the grid pixel its centre falls in), contours are scaled to level-0
coordinates (``nucleus_feature``'s ``scale``) and areas are the nucleus's level-0 pixels,
times level 0's um/px squared. A slide whose resolution is unknown is refused (``--mpp``
gives it) unless the bundle records none either.

Memory holds a few batches of tiles and their maps (those in the pipeline's stages and
queues), whatever the slide size.

Resume: tiles are processed in a fixed order and ``.work/state.json`` (:class:`SlideState`,
whose docstring gives the ordering rule) records how far the job got, so a rerun after an
interruption continues where the last committed batch ended and the result equals an
uninterrupted run. The state also holds a fingerprint (slide name, size and dimensions,
its resolution and the grid read, model version, tile settings, the tile grid's rule
(``cmdfed.inference.tiling.GRID_RULE``), post-processing parameters): an OUT folder belonging
to another job, or to a version of cmdfed with another grid, is refused unless ``restart``
is given.
At the end the label pyramid, ``cells.geojson`` and ``summary.json`` are written; the summary
records where the slide is (``cmdfed.slide_outputs``), so the dashboard finds it again.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmdfed.atomic import exclusive_lock, write_json_atomic
from cmdfed.data.slide import PLAUSIBLE_MPP, SlideReader, level_for_mpp, open_slide, tissue_grid
from cmdfed.errors import CmdfedError
from cmdfed.inference.nuclei import nucleus_feature, write_feature_collection
from cmdfed.inference.postprocess import WatershedParams, postprocess
from cmdfed.inference.stain import HEStains, macenko, sample_positions, source_stains
from cmdfed.inference.tiling import GRID_RULE, TileGrid, needs_resampling, resample_image
from cmdfed.pipeline import pipelined
from cmdfed.progress import Progress, report
from cmdfed.slide_outputs import GEOJSON, LABELS_DIR, SLIDE_FILE, SUMMARY, slide_file_record
from edge import outputs
from edge.deploy import active_bundle
from edge.reports import Reports, reports_to
from edge.selection import Selection, select_backend

WORK_DIR = ".work"
LOCK_FILE = ".lock"  # held while a job writes OUT, so two jobs never interleave in one folder
DEFAULT_MIN_TISSUE = 0.1
BATCH_PIXELS = 8 * 256 * 256  # a default batch: 8 tiles of 256 px, 2 of 512 (the same memory and work a pass)
PIPELINE_DEPTH = 1  # batches each queue between the pipeline's stages holds
# The most batches alive at once (edge.memory's slide cost): each of the three stages works on
# one with PIPELINE_DEPTH queued after it, and the calling thread writes one.
BATCHES_ALIVE = 3 * (PIPELINE_DEPTH + 1) + 1

log = logging.getLogger("cmdfed.edge")


def infer_slide(
    slide: str | Path,
    home: str | Path,
    out_dir: str | Path,
    *,
    backend: str | None = None,
    batch: int | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    restart: bool = False,
    threads: int | None = None,
    trt_source: str = "onnx",
    mpp: float | None = None,
    selection: Selection | None = None,
    retime_variants: bool = False,
    stain_normalise: bool = True,
    telemetry: str | Path | Reports | None = None,
    progress: Progress | None = None,
) -> dict:
    """Segment and classify every nucleus of a slide with the active model; returns the summary.

    ``batch``: tiles per forward pass (default: :func:`default_batch` of the bundle's tile).
    ``mpp``: the slide's micrometres per level-0 pixel, for a file that does not record it
    (or records it wrong); the model reads the slide at its own resolution (module docstring).
    ``selection``: a backend already loaded (the service's), used instead of selecting one for
    the version active now. ``retime_variants``: time the CPU graphs again instead of reusing
    the home's kept choice (:mod:`edge.selection`). ``stain_normalise`` False: tiles are fed as
    scanned even when the model records its training colours (module docstring). ``telemetry``:
    a store (path or URL) or a ``Reports`` (edge.reports) that gets the slide's summary.
    """
    started = time.perf_counter()
    slide_name = Path(slide).name
    reports = reports_to(telemetry)

    def select(quiet: Callable[[], object]) -> Selection:
        if selection is not None:
            return selection
        options = {"force": backend, "threads": threads, "trt_source": trt_source, "retime": retime_variants}
        return select_backend(active_bundle(home), home, quiet=quiet, **options)

    try:
        summary = _run(slide, select, Path(out_dir), batch, min_tissue, restart, mpp, stain_normalise, progress)
    except Exception as exc:
        if reports:
            _record(reports, slide_name, None, time.perf_counter() - started, error=exc)
        raise
    if reports:
        _record(reports, slide_name, summary, time.perf_counter() - started)
    return summary


def default_batch(tile: int) -> int:
    """Tiles per forward pass when none is given: BATCH_PIXELS' worth, 1 to 8 tiles."""
    return max(1, min(8, BATCH_PIXELS // (tile * tile)))


def _run(slide, select, out_dir: Path, batch, min_tissue, restart, mpp, stain_normalise, progress) -> dict:
    """The job. ``select(quiet)`` gives the backend; it runs on a thread of its own while the
    slide's tissue is found, and times CPU graphs (when it must) only once ``quiet()`` returns."""
    if batch is not None and batch < 1:
        raise CmdfedError(f"--batch must be at least 1, got {batch}")
    if mpp is not None and not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        raise CmdfedError(
            f"--mpp {mpp}: a scan's resolution lies in {PLAUSIBLE_MPP[0]}..{PLAUSIBLE_MPP[1]} um/px "
            "(about 0.25 at 40x, 0.5 at 20x)"
        )
    busy = f"another inference job is writing {out_dir}; wait for it or choose another --out"
    with open_slide(slide, mpp=mpp) as reader:
        tissue_found = threading.Event()
        with ThreadPoolExecutor(1, thread_name_prefix="select-backend") as pool:
            selecting = pool.submit(select, tissue_found.wait)
            try:
                reader.tissue  # noqa: B018 - found now, while the backend loads; the job's grid reads it
            finally:
                tissue_found.set()
            selection = selecting.result()
        if batch is None:
            batch = default_batch(selection.backend.model.manifest["preprocessing"]["tile_size"])
        with exclusive_lock(out_dir / LOCK_FILE, busy=busy):
            job = _SlideJob(reader, selection, out_dir, min_tissue, restart, stain_normalise)
            job.run(batch, progress)
            return job.finish()


@dataclass(frozen=True)
class ReadGrid:
    """The grid a slide is segmented on (the model's resolution) and how its tiles are read.

    Grid pixel ``(gx, gy)`` covers level-0 ``[gx * scale, (gx + 1) * scale)`` (and the same
    in y); level-0 pixel ``X`` belongs to grid pixel ``floor((X + 0.5) / scale)``, the one
    its centre falls in (:meth:`level0_span`, :meth:`grid_index`): one rule for labels,
    contours and tile reads. ``scale`` 1 and ``level`` 0: the grid is level 0 itself.
    """

    level: int  # the pyramid level tiles are read from
    scale: float  # level-0 pixels per grid pixel
    resample: bool  # tiles are resampled from the level to the grid (else the level's pixels are the grid's)
    width: int  # the slide in grid pixels
    height: int
    level_mpp: float | None  # um/px of the level read
    model_mpp: float | None
    note: str | None = None  # how the slide is read, when it is not at the model's resolution

    @classmethod
    def for_slide(cls, reader: SlideReader, model_mpp: float | None) -> ReadGrid:
        width, height = reader.dimensions
        slide_mpp = reader.mpp if math.isfinite(reader.mpp) else None
        if not model_mpp:  # a bundle that does not say: level 0 as it is (a warning says so)
            return cls(0, 1.0, False, width, height, slide_mpp, None)
        if slide_mpp is None:
            raise CmdfedError(
                f"the resolution of {reader.path.name} is unknown (its file records no micrometres per pixel) and the "
                f"model reads slides at {model_mpp:g} um/px: give the slide's resolution with --mpp (mpp in a "
                "SegmentSlide request): about 0.25 at 40x, 0.5 at 20x"
            )
        level = level_for_mpp(reader, model_mpp)
        level_mpp = reader.level_mpps[level]
        down = reader.level_downsamples[level]
        if not needs_resampling(level_mpp, model_mpp):
            lw, lh = reader.level_dimensions[level]
            return cls(level, down, False, lw, lh, level_mpp, model_mpp)
        scale = model_mpp / slide_mpp
        how = "enlarged" if level_mpp > model_mpp else "resampled"
        note = (
            f"{reader.path.name} has no pyramid level at the model's {model_mpp:g} um/px: tiles are read from "
            f"level {level} ({level_mpp:.4g} um/px) and {how} to it"
        )
        return cls(
            level, scale, True, max(1, round(width / scale)), max(1, round(height / scale)), level_mpp, model_mpp, note
        )

    def level0_span(self, start: int, stop: int) -> tuple[int, int]:
        """The level-0 pixels [a, b) whose centres lie in grid pixels [start, stop)."""
        return math.ceil(start * self.scale - 0.5), math.ceil(stop * self.scale - 0.5)

    def grid_index(self, level0: np.ndarray, start: int, size: int) -> np.ndarray:
        """For level-0 pixel positions, the grid pixel each belongs to, counted from ``start``
        and clipped to ``[0, size)`` (against rounding at the ends)."""
        return np.clip(np.floor((level0 + 0.5) / self.scale).astype(np.int64) - start, 0, size - 1)

    def read_tile(self, reader: SlideReader, gx: int, gy: int, tile: int) -> np.ndarray:
        """The tile at grid corner (gx, gy), uint8 (tile, tile, 3), white outside the slide."""
        if not self.resample:
            return reader.read_level_region(gx, gy, self.level, tile, tile)
        per = self.scale / reader.level_downsamples[self.level]  # level pixels per grid pixel
        lw, lh = reader.level_dimensions[self.level]
        cols, rows = min(tile, self.width - gx), min(tile, self.height - gy)  # the tile's grid pixels on the slide
        x0, y0 = gx * per, gy * per
        x1, y1 = min((gx + cols) * per, lw), min((gy + rows) * per, lh)
        # The bilinear filter reaches ``per`` level pixels around each grid pixel when
        # shrinking (one when enlarging): a margin of them is read so the tile resamples as
        # the whole slide would (seams see the same pixels from both sides), and nothing
        # beyond the slide is, so its edge is filtered as a whole-slide resize filters it.
        margin = math.ceil(max(per, 1.0)) + 1
        rx, ry = max(math.floor(x0) - margin, 0), max(math.floor(y0) - margin, 0)
        rw, rh = min(math.ceil(x1) + margin, lw) - rx, min(math.ceil(y1) + margin, lh) - ry
        region = reader.read_level_region(rx, ry, self.level, rw, rh)
        out = np.full((tile, tile, 3), 255, np.uint8)  # beyond the slide: white, as level-0 tiles read it
        out[:rows, :cols] = resample_image(region, (rows, cols), box=(x0 - rx, y0 - ry, x1 - rx, y1 - ry))
        return out

    def describe(self) -> dict:
        return {
            "model_mpp": self.model_mpp,
            "level": self.level,
            "level_mpp": self.level_mpp,
            "resampled": self.resample,
            "level0_px_per_model_px": self.scale,
            "grid": [self.width, self.height],
            "note": self.note,
        }


def _no_time_yet() -> dict[str, float]:
    return {"read": 0.0, "model": 0.0, "postprocess": 0.0, "write": 0.0}


@dataclass
class SlideState:
    """How far a slide job got: ``.work/state.json``, replaced atomically after every batch.

    The ordering rule that makes a resumed job equal an uninterrupted one:

    1. Before a batch writes anything, ``in_flight`` records its tile range and is saved
       (:meth:`begin_batch`).
    2. The batch writes label pixels (ids from ``next_id`` on) and appends its features.
    3. The label chunks it touched and the features file are flushed and fsynced; only then
       are ``tiles_done`` and ``features_bytes`` advanced, ``in_flight`` cleared and the state
       saved (:meth:`commit_batch`). A saved state never counts work that is not on disk.

    On resume the features file is cut back to ``features_bytes`` and, when ``in_flight`` is
    set, label ids from ``next_id`` on are cleared in those tiles (the batch is redone).
    ``next_id``, the counts, ``area_px`` and ``timings_s`` are advanced while a batch runs and
    saved with it, so at a commit they agree with ``tiles_done``.
    """

    fingerprint: dict[str, Any]
    tiles_done: int = 0
    next_id: int = 1  # the label the next kept nucleus gets
    features_bytes: int = 0  # length of .work/features.jsonl at the last commit
    counts: dict[str, int] = field(default_factory=dict)  # kept nuclei by class name
    cut_by_tile_edges: int = 0  # objects dropped because a tile edge cut them (too large for the overlap)
    seam_duplicates: int = 0
    in_flight: list[int] | None = None  # [start, stop) of the tiles of a batch not yet committed
    area_px: int = 0
    timings_s: dict[str, float] = field(default_factory=_no_time_yet)
    backends: list[str] = field(default_factory=list)
    sessions: int = 1

    @classmethod
    def load(cls, path: Path) -> SlideState:
        try:
            saved = json.loads(path.read_text())
            saved.pop("touching_tile_edges", None)  # a count jobs before 2026-12 kept; now cut_by_tile_edges
            return cls(**saved)
        except (OSError, ValueError, TypeError) as exc:
            raise CmdfedError(f"{path} is damaged ({exc}); pass --restart to start the slide again") from exc

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    def begin_batch(self, path: Path, start: int, stop: int) -> None:
        self.in_flight = [start, stop]  # labels are written before the commit
        self.save(path)

    def commit_batch(self, path: Path, n_tiles: int, features_bytes: int) -> None:
        """Record a batch whose labels and features are already on disk (fsynced)."""
        self.features_bytes = features_bytes
        self.tiles_done += n_tiles
        self.in_flight = None
        self.save(path)


@dataclass
class _Batch:
    """Consecutive tiles on their way through the pipeline: each stage fills in its part and
    lets go of the one before (images, then maps)."""

    start: int  # index of its first tile in the job's order
    corners: list[tuple[int, int]]
    images: np.ndarray | None = None
    maps: dict[str, np.ndarray] | None = None
    # (corner, instance map, kept nuclei, objects dropped as cut by the tile's edges)
    tiles: list[tuple[tuple[int, int], np.ndarray, list, int]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # each stage's time on it, added to the state when written


class _SlideJob:
    def __init__(
        self,
        reader,
        selection: Selection,
        out_dir: Path,
        min_tissue: float,
        restart: bool,
        stain_normalise: bool = True,
    ):
        self.reader, self.selection, self.out_dir = reader, selection, out_dir
        manifest = selection.backend.model.manifest
        self.manifest = manifest
        self.class_names = manifest["model"]["class_names"]
        pre = manifest["preprocessing"]
        self.tile, self.overlap = pre["tile_size"], pre["overlap"]
        self.params = WatershedParams.from_manifest(manifest)
        self.slide_width, self.slide_height = reader.dimensions  # level 0, where outputs are written
        self.mpp = reader.mpp if math.isfinite(reader.mpp) else None
        self.read = ReadGrid.for_slide(reader, pre.get("mpp"))
        if self.read.note:
            log.info("%s", self.read.note)
        self.width, self.height = self.read.width, self.read.height  # the grid's: tiles, ownership, cells
        found, _ = tissue_grid(reader, (self.width, self.height), self.read.scale, self.tile, self.overlap, min_tissue)
        if not found:
            raise CmdfedError(
                f"no tissue found in {reader.path.name} at --min-tissue {min_tissue}; lower it or check the slide"
            )
        self.corners = [(x, y) for x, y, _ in found]  # grid pixels
        self.grid = TileGrid(self.tile, self.overlap, self.width, self.height, tuple(self.corners))
        self.stain_reference = HEStains.from_manifest(manifest) if stain_normalise else None
        self.stain_source = self._slide_stain() if self.stain_reference is not None else None
        self.work = out_dir / WORK_DIR
        self.state_path = self.work / "state.json"
        self.features_path = self.work / "features.jsonl"
        fingerprint = {
            "slide": reader.path.name,
            "slide_bytes": reader.path.stat().st_size,
            "dimensions": [self.slide_width, self.slide_height],
            "mpp": self.mpp,
            "read": [self.read.level, self.read.scale, self.read.resample],
            "model_version": manifest["model"]["version"],
            "tile": self.tile,
            "overlap": self.overlap,
            "grid": GRID_RULE,  # a job of an earlier grid (other tiles, other owners) is not continued
            "min_tissue": min_tissue,
            "postprocess": self.params.to_dict(),
            "stain": self._stain_record(),
        }
        self.state = self._start_or_resume(fingerprint, restart)

    def _slide_stain(self) -> HEStains | None:
        """The slide's stains, estimated on tissue tiles spread over it (None: too little stain)."""
        picks = sample_positions(len(self.corners), self.tile)
        return source_stains([self.read.read_tile(self.reader, *self.corners[i], self.tile) for i in picks])

    def _stain_record(self) -> dict | None:
        """How tiles are coloured before the model: None when fed as scanned."""
        if self.stain_reference is None or self.stain_source is None:
            return None
        return {"reference": self.stain_reference.to_dict(), "slide": self.stain_source.to_dict()}

    # -- job state ---------------------------------------------------------------------

    def _start_or_resume(self, fingerprint: dict, restart: bool) -> SlideState:
        if restart:
            for name in (WORK_DIR, LABELS_DIR):
                shutil.rmtree(self.out_dir / name, ignore_errors=True)
            for name in (GEOJSON, SUMMARY):
                (self.out_dir / name).unlink(missing_ok=True)
        if self.state_path.is_file():
            state = SlideState.load(self.state_path)
            if state.fingerprint != fingerprint:
                raise CmdfedError(
                    f"{self.out_dir} holds results of another slide, model or settings (or of a cmdfed version "
                    "with another tile grid); choose another --out or pass --restart to discard them"
                )
            state.sessions += 1
            return state
        if (self.out_dir / LABELS_DIR).exists() or (self.out_dir / SUMMARY).exists():
            raise CmdfedError(
                f"{self.out_dir} already holds outputs of an unknown run; choose another --out or pass --restart"
            )
        self.work.mkdir(parents=True, exist_ok=True)
        outputs.create_label_zarr(self.out_dir / LABELS_DIR, self.slide_width, self.slide_height)
        self.features_path.write_bytes(b"")
        state = SlideState(fingerprint)
        state.save(self.state_path)
        return state

    # -- tiles -------------------------------------------------------------------------

    def run(self, batch: int, progress: Progress | None) -> None:
        backend = self.selection.backend
        if backend.name not in self.state.backends:
            self.state.backends.append(backend.name)
        labels = outputs.open_label_level0(self.out_dir / LABELS_DIR)
        self._clear_interrupted_batch(labels)
        total = len(self.corners)
        batches = (
            _Batch(start, self.corners[start : start + batch]) for start in range(self.state.tiles_done, total, batch)
        )
        stages = [
            ("read", self._read_batch),
            ("model", self._predict_batch),
            ("post-processing", self._postprocess_batch),
        ]
        with open(self.features_path, "r+b") as features:
            features.truncate(self.state.features_bytes)
            features.seek(self.state.features_bytes)
            report(progress, self.state.tiles_done, total, "tiles")
            with pipelined(batches, stages, depth=PIPELINE_DEPTH) as processed:
                for ready in processed:
                    self._write_batch(ready, labels, features)
                    report(progress, self.state.tiles_done, total, "tiles")

    # The stages before writing (each on a thread of its own) touch neither the outputs nor
    # the state: only the calling thread writes and commits, so the resume rule holds as it did.

    def _read_batch(self, batch: _Batch) -> _Batch:
        started = time.perf_counter()
        tiles = [self.read.read_tile(self.reader, x, y, self.tile) for x, y in batch.corners]
        if self.stain_source is not None:
            tiles = [macenko(tile, self.stain_source, self.stain_reference) for tile in tiles]
        batch.images = np.stack(tiles)
        batch.seconds["read"] = time.perf_counter() - started
        return batch

    def _predict_batch(self, batch: _Batch) -> _Batch:
        started = time.perf_counter()
        batch.maps = self.selection.backend.run(batch.images)
        batch.images = None  # held no longer than needed: memory stays a few batches whatever the slide
        batch.seconds["model"] = time.perf_counter() - started
        return batch

    def _postprocess_batch(self, batch: _Batch) -> _Batch:
        started = time.perf_counter()
        batch.tiles = []
        for k, corner in enumerate(batch.corners):
            result = postprocess(
                batch.maps["np"][k],
                batch.maps["hv"][k],
                batch.maps["nc"][k] if "nc" in batch.maps else None,
                self.params,
            )
            owned = [n for n in self.grid.owned(corner, result.nuclei) if self._inside_slide(corner, n)]
            # An outline that reaches a tile edge inside the slide is cut there: the object is larger
            # than the overlap lets a tile see whole (cmdfed.inference.tiling), so it is no nucleus's
            # outline. Dropped and counted, not drawn with a straight side.
            kept = [n for n in owned if not self.grid.touches_inner_edge(corner, n)]
            batch.tiles.append((corner, result.instance_map, kept, len(owned) - len(kept)))
        batch.maps = None
        batch.seconds["postprocess"] = time.perf_counter() - started
        return batch

    def _write_batch(self, batch: _Batch, labels, features) -> None:
        """Write a post-processed batch's kept nuclei and commit it (the SlideState rule)."""
        self.state.begin_batch(self.state_path, batch.start, batch.start + len(batch.corners))
        started = time.perf_counter()
        for row in _rows_of(batch.tiles):
            # One read and one write of the label chunks per row of tiles, not per tile: a tile
            # (512 px by default) lies inside 1024 px chunks, each decompressed and recompressed when written to.
            rects = [self._level0_rect(corner) for corner, *_ in row]
            x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
            x1, y1 = max(r[2] for r in rects), max(r[3] for r in rects)
            block = labels[y0:y1, x0:x1] if any(kept for _, _, kept, _ in row) else None
            written = False
            for (corner, instance_map, kept, cut), (tx0, ty0, tx1, ty1) in zip(row, rects, strict=True):
                self.state.cut_by_tile_edges += cut
                region = block[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] if kept else None
                written |= self._write_tile(corner, instance_map, kept, region, features)
            if written:
                labels[y0:y1, x0:x1] = block
        timings = self.state.timings_s
        for stage, seconds in batch.seconds.items():
            timings[stage] += seconds
        timings["write"] += time.perf_counter() - started
        outputs.sync_label_chunks(self.out_dir / LABELS_DIR, [self._level0_square(c) for c in batch.corners])
        self._commit(features, len(batch.corners))

    def _write_tile(self, corner, instance_map: np.ndarray, kept: list, region, features) -> bool:
        """Label the tile's kept nuclei in ``region`` (its level-0 rectangle of the label image,
        None when nothing is kept) and write their features; whether any was labelled."""
        state = self.state
        x0, y0, x1, y1 = self._level0_rect(corner)
        if kept:  # the tile's instances on level 0's pixels (the same array at the model's resolution)
            gx, gy = corner
            rows = self.read.grid_index(np.arange(y0, y1), gy, self.tile)
            cols = self.read.grid_index(np.arange(x0, x1), gx, self.tile)
            instances = instance_map[rows[:, None], cols[None, :]]
        lines = []
        for nucleus in kept:
            bx0, by0, bx1, by1 = self._level0_box(corner, nucleus.bbox_xyxy, (x0, y0, x1, y1))
            mine = instances[by0:by1, bx0:bx1] == nucleus.id
            there = region[by0:by1, bx0:bx1]
            area = np.count_nonzero(mine)
            if not area:
                # Smaller than a level-0 pixel (a grid finer than level 0): not in the label image, so not kept.
                continue
            if np.count_nonzero(there[mine]) * 2 > area:
                state.seam_duplicates += 1
                continue  # a neighbouring tile already kept this nucleus (see cmdfed.inference.tiling)
            label = state.next_id
            state.next_id += 1
            there[mine & (there == 0)] = label
            feature = nucleus_feature(
                nucleus, corner, label, self.class_names, self.mpp, scale=self.read.scale, area=area
            )
            lines.append(_feature_line(feature))
            name = feature["properties"]["classification"]["name"]
            state.counts[name] = state.counts.get(name, 0) + 1
        if lines:
            features.write("".join(lines).encode())
        state.area_px += self.grid.nominal_cell_area(corner)
        return bool(lines)

    def _level0_rect(self, corner) -> tuple[int, int, int, int]:
        """The level-0 pixels (x0, y0, x1, y1) of the tile at grid ``corner``, within the slide."""
        gx, gy = corner
        x0, x1 = self.read.level0_span(gx, gx + self.tile)
        y0, y1 = self.read.level0_span(gy, gy + self.tile)
        return max(x0, 0), max(y0, 0), min(x1, self.slide_width), min(y1, self.slide_height)

    def _level0_box(self, corner, bbox, rect) -> tuple[int, int, int, int]:
        """A tile-pixel box (x0, y0, x1, y1) as level-0 pixels relative to the tile's ``rect``."""
        gx, gy = corner
        bx0, by0, bx1, by1 = bbox
        x0, x1 = self.read.level0_span(gx + bx0, gx + bx1)
        y0, y1 = self.read.level0_span(gy + by0, gy + by1)
        rx0, ry0, rx1, ry1 = rect
        return (
            min(max(x0, rx0), rx1) - rx0,
            min(max(y0, ry0), ry1) - ry0,
            min(max(x1, rx0), rx1) - rx0,
            min(max(y1, ry0), ry1) - ry0,
        )

    def _level0_square(self, corner) -> tuple[int, int, int]:
        """(x, y, side) of a level-0 square covering the tile, for syncing its label chunks."""
        gx, gy = corner
        x0, x1 = self.read.level0_span(gx, gx + self.tile)
        y0, y1 = self.read.level0_span(gy, gy + self.tile)
        return x0, y0, max(x1 - x0, y1 - y0)

    def _inside_slide(self, corner, nucleus) -> bool:
        """Along a side of the slide shorter than a tile, the one tile reaches past the slide and
        is padded with white; anything reaching into the padding is an artefact of it (or a
        nucleus the scan cut), not kept."""
        x0, y0 = corner
        _, _, x1, y1 = nucleus.bbox_xyxy
        return x0 + x1 <= self.width and y0 + y1 <= self.height

    def _commit(self, features, n_tiles: int) -> None:
        features.flush()
        os.fsync(features.fileno())
        self.state.commit_batch(self.state_path, n_tiles, features.tell())

    def _clear_interrupted_batch(self, labels) -> None:
        """Labels a batch wrote before an interruption stopped it short of its commit: ids from the
        committed ``next_id`` on, in that batch's tiles. The batch is redone, so they are removed
        first (else the redo would take its own nuclei for ones a neighbour already kept)."""
        if not self.state.in_flight:
            return
        start, stop = self.state.in_flight
        for corner in self.corners[start:stop]:
            x0, y0, x1, y1 = self._level0_rect(corner)
            region = labels[y0:y1, x0:x1]
            stale = region >= self.state.next_id
            if stale.any():
                region[stale] = 0
                labels[y0:y1, x0:x1] = region
        self.state.in_flight = None

    # -- outputs -----------------------------------------------------------------------

    def finish(self) -> dict:
        levels = outputs.finish_label_zarr(self.out_dir / LABELS_DIR, self.mpp)
        write_feature_collection(self.features_path, self.out_dir / GEOJSON)
        state = self.state
        area_px = round(state.area_px * self.read.scale**2)  # grid pixels counted, level-0 pixels reported
        area_mm2 = area_px * self.mpp**2 / 1e6 if self.mpp else None
        n_cells = sum(state.counts.values())
        summary = {
            "slide": self.reader.path.name,
            SLIDE_FILE: slide_file_record(self.reader.path, self.out_dir),
            "dimensions": [self.slide_width, self.slide_height],
            "mpp": self.mpp,
            "resolution": self.read.describe(),
            "stain_normalisation": self._stain_record(),
            "model_version": self.manifest["model"]["version"],
            "backend": self.selection.report(),
            "backends_used": state.backends,
            "tiles": len(self.corners),
            "tile_size": self.tile,
            "overlap": self.overlap,
            "n_cells": n_cells,
            "counts_by_type": dict(sorted(state.counts.items())),
            "area_analysed_px": area_px,
            "area_analysed_mm2": area_mm2,
            "cells_per_mm2": n_cells / area_mm2 if area_mm2 else None,
            "objects_cut_by_tile_edges_dropped": state.cut_by_tile_edges,
            "seam_duplicates_dropped": state.seam_duplicates,
            "timings_s": {k: round(v, 3) for k, v in state.timings_s.items()},
            "sessions": state.sessions,
            "warnings": self._warnings(),
            "outputs": {"labels": LABELS_DIR, "label_levels": levels, "geojson": GEOJSON},
        }
        write_json_atomic(self.out_dir / SUMMARY, summary)
        return summary

    def _warnings(self) -> list[str]:
        """What may make the results less than they should be (how the slide was read, when it
        was resampled, is ``resolution.note``: that is expected, not a warning)."""
        found = []
        if not self.mpp:
            found.append("the slide's resolution (mpp) is unknown: areas are in pixels only")
        if self.stain_reference is not None and self.stain_source is None:
            found.append(
                "the slide's tissue tiles hold too little stain to measure its colours: tiles were fed as scanned, "
                "not normalised to the model's training colours"
            )
        if not self.read.model_mpp:
            found.append(
                "the bundle does not record the model's resolution, so the slide was read at level 0 as it "
                "is; export it with --mpp so slides at other resolutions are resampled to it"
            )
        elif self.read.resample and self.read.level_mpp > self.read.model_mpp:
            found.append(
                f"the slide ({self.mpp:.4g} um/px) is coarser than the model's {self.read.model_mpp:g} um/px: "
                "tiles were enlarged, small nuclei may be missed"
            )
        return found


def _rows_of(tiles: list) -> list[list]:
    """A batch's post-processed tiles ``(corner, ...)``, in grid order, as runs of one grid row each."""
    return [list(row) for _, row in itertools.groupby(tiles, key=lambda tile: tile[0][1])]


def _feature_line(feature: dict) -> str:
    return json.dumps(feature, separators=(",", ":")) + "\n"


def _record(
    reports: Reports, slide_name: str, summary: dict | None, duration: float, error: BaseException | None = None
) -> None:
    """Report the slide to the telemetry; a telemetry failure never fails (or hides) the slide's own result."""
    try:
        _report_inference(reports, slide_name, summary, duration, error)
    except Exception as exc:  # noqa: BLE001 - telemetry never fails the slide (logged)
        log.warning(
            "could not record %s in the telemetry (%s: %s); the slide's outputs are not affected",
            slide_name,
            type(exc).__name__,
            exc,
        )


def _report_inference(
    reports: Reports, slide_name: str, summary: dict | None, duration: float, error: BaseException | None
) -> None:
    reports.record_inference(
        model_version=summary["model_version"] if summary else None,
        slide_name=slide_name,
        n_cells=summary["n_cells"] if summary else None,
        counts_by_type=summary["counts_by_type"] if summary else {},
        area_mm2=summary["area_analysed_mm2"] if summary else None,
        duration_s=duration,
        backend=summary["backend"]["backend"] if summary else None,
        error=None if error is None else f"{type(error).__name__}: {error}",
    )
