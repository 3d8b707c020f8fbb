"""Whole-slide inference (`cmdfed edge infer`): slide -> nuclei, streamed and resumable.

One tile's route from the slide to ``cells.geojson``, six files:

    1. edge/infer.py                   this job: plan, batch, keep, write, resume
    2. cmdfed/data/slide.py            open_slide, read_region; plan_tiles: tissue tiles
                                       at level 0, the bundle's tile size and overlap
    3. edge/backends.py                Backend.run: uint8 tiles -> NP/HV/NC maps
                                       (ONNX Runtime or TensorRT)
    4. cmdfed/inference/postprocess.py postprocess: maps -> instance map (HoVer watershed,
                                       the manifest's WatershedParams) -> records
    5. cmdfed/inference/nuclei.py      nucleus_records: centroid, contour, type;
                                       nucleus_feature: the GeoJSON feature (+0.5 rule);
                                       write_feature_collection: cells.geojson
    6. cmdfed/inference/tiling.py      the grid plan_tiles lays out; TileGrid.owned:
                                       which tile keeps a nucleus on a seam

    tissue tiles --batches--> backend --per tile--> postprocess --TileGrid.owned--> kept
        -> their pixels into OUT/labels.ome.zarr level 0 (global ids, on disk; edge/outputs.py)
        -> their GeoJSON features appended to OUT/.work/features.jsonl

Memory holds one batch of tiles and their maps, whatever the slide size.

Resume: tiles are processed in a fixed order and ``.work/state.json`` (:class:`SlideState`,
whose docstring gives the ordering rule) records how far the job got, so a rerun after an
interruption continues where the last committed batch ended and the result equals an
uninterrupted run. The state also holds a fingerprint (slide name, size and dimensions,
model version, tile settings, post-processing parameters): an OUT folder belonging to
another job is refused unless ``restart`` is given. At the end the label pyramid,
``cells.geojson`` and ``summary.json`` are written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmdfed.atomic import exclusive_lock, write_json_atomic
from cmdfed.data.slide import open_slide, plan_tiles
from cmdfed.errors import CmdfedError
from cmdfed.inference.nuclei import nucleus_feature, write_feature_collection
from cmdfed.inference.postprocess import WatershedParams, postprocess
from cmdfed.inference.tiling import TileGrid
from cmdfed.progress import Progress, report
from cmdfed.slide_outputs import GEOJSON, LABELS_DIR, SUMMARY
from edge import outputs
from edge.selection import Selection, select_backend
from edge.deploy import active_bundle
from edge.reports import Reports, reports_to

WORK_DIR = ".work"
LOCK_FILE = ".lock"  # held while a job writes OUT, so two jobs never interleave in one folder
DEFAULT_MIN_TISSUE = 0.1
MPP_MISMATCH = 1.25  # warn when slide and model resolutions differ by more than this factor

log = logging.getLogger("cmdfed.edge")


def infer_slide(
    slide: str | Path,
    home: str | Path,
    out_dir: str | Path,
    *,
    backend: str | None = None,
    batch: int = 8,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    restart: bool = False,
    threads: int | None = None,
    trt_source: str = "onnx",
    selection: Selection | None = None,
    telemetry: str | Path | Reports | None = None,
    progress: Progress | None = None,
) -> dict:
    """Segment and classify every nucleus of a slide with the active model; returns the summary.

    ``selection``: a backend already loaded (the service's), used instead of selecting one for
    the version active now. ``telemetry``: a store (path or URL) or a ``Reports``
    (edge.reports) that gets the slide's summary.
    """
    started = time.perf_counter()
    slide_name = Path(slide).name
    reports = reports_to(telemetry)
    try:
        if selection is None:
            selection = select_backend(active_bundle(home), home, force=backend, threads=threads, trt_source=trt_source)
        summary = _run(slide, selection, Path(out_dir), batch, min_tissue, restart, progress)
    except Exception as exc:
        if reports:
            _record(reports, slide_name, None, time.perf_counter() - started, error=exc)
        raise
    if reports:
        _record(reports, slide_name, summary, time.perf_counter() - started)
    return summary


def _run(slide, selection: Selection, out_dir: Path, batch, min_tissue, restart, progress) -> dict:
    if batch < 1:
        raise CmdfedError(f"--batch must be at least 1, got {batch}")
    busy = f"another inference job is writing {out_dir}; wait for it or choose another --out"
    with open_slide(slide) as reader, exclusive_lock(out_dir / LOCK_FILE, busy=busy):
        job = _SlideJob(reader, selection, out_dir, min_tissue, restart)
        job.run(batch, progress)
        return job.finish()


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
    touching_tile_edges: int = 0
    seam_duplicates: int = 0
    in_flight: list[int] | None = None  # [start, stop) of the tiles of a batch not yet committed
    area_px: int = 0
    timings_s: dict[str, float] = field(default_factory=_no_time_yet)
    backends: list[str] = field(default_factory=list)
    sessions: int = 1

    @classmethod
    def load(cls, path: Path) -> "SlideState":
        try:
            return cls(**json.loads(path.read_text()))
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


class _SlideJob:
    def __init__(self, reader, selection: Selection, out_dir: Path, min_tissue: float, restart: bool):
        self.reader, self.selection, self.out_dir = reader, selection, out_dir
        manifest = selection.backend.model.manifest
        self.manifest = manifest
        self.class_names = manifest["model"]["class_names"]
        pre = manifest["preprocessing"]
        self.tile, self.overlap = pre["tile_size"], pre["overlap"]
        self.params = WatershedParams.from_manifest(manifest)
        self.width, self.height = reader.dimensions
        self.mpp = reader.mpp if math.isfinite(reader.mpp) else None
        plan = plan_tiles(reader, self.tile, 0, self.overlap, min_tissue)
        if not plan.corners:
            raise CmdfedError(f"no tissue found in {reader.path.name} at --min-tissue {min_tissue}; lower it or check the slide")
        self.corners = [(x, y) for x, y, _ in plan.corners]
        self.grid = TileGrid(self.tile, self.overlap, tuple(self.corners))
        self.work = out_dir / WORK_DIR
        self.state_path = self.work / "state.json"
        self.features_path = self.work / "features.jsonl"
        fingerprint = {
            "slide": reader.path.name,
            "slide_bytes": reader.path.stat().st_size,
            "dimensions": [self.width, self.height],
            "model_version": manifest["model"]["version"],
            "tile": self.tile,
            "overlap": self.overlap,
            "min_tissue": min_tissue,
            "postprocess": self.params.to_dict(),
        }
        self.state = self._start_or_resume(fingerprint, restart)

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
                    f"{self.out_dir} holds results of another slide, model or settings; choose another --out "
                    "or pass --restart to discard them"
                )
            state.sessions += 1
            return state
        if (self.out_dir / LABELS_DIR).exists() or (self.out_dir / SUMMARY).exists():
            raise CmdfedError(f"{self.out_dir} already holds outputs of an unknown run; choose another --out or pass --restart")
        self.work.mkdir(parents=True, exist_ok=True)
        outputs.create_label_zarr(self.out_dir / LABELS_DIR, self.width, self.height)
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
        with open(self.features_path, "r+b") as features:
            features.truncate(self.state.features_bytes)
            features.seek(self.state.features_bytes)
            report(progress, self.state.tiles_done, total, "tiles")
            while self.state.tiles_done < total:
                start = self.state.tiles_done
                corners = self.corners[start : start + batch]
                self.state.begin_batch(self.state_path, start, start + len(corners))
                timings = self.state.timings_s
                t0 = time.perf_counter()
                images = np.stack([self.reader.read_region(x, y, 0, self.tile, self.tile) for x, y in corners])
                t1 = time.perf_counter()
                maps = backend.run(images)
                timings["read"] += t1 - t0
                timings["model"] += time.perf_counter() - t1
                for k, corner in enumerate(corners):
                    self._process_tile(corner, {name: value[k] for name, value in maps.items()}, labels, features)
                outputs.sync_label_chunks(self.out_dir / LABELS_DIR, [(x, y, self.tile) for x, y in corners])
                self._commit(features, len(corners))
                report(progress, self.state.tiles_done, total, "tiles")

    def _process_tile(self, corner, maps: dict, labels, features) -> None:
        state, timings = self.state, self.state.timings_s
        t0 = time.perf_counter()
        result = postprocess(maps["np"], maps["hv"], maps.get("nc"), self.params)
        kept = [n for n in self.grid.owned(corner, result.nuclei) if self._inside_slide(corner, n)]
        t1 = time.perf_counter()
        x0, y0 = corner
        h, w = min(self.tile, self.height - y0), min(self.tile, self.width - x0)
        region = labels[y0 : y0 + h, x0 : x0 + w] if kept else None
        lines = []
        for nucleus in kept:
            bx0, by0, bx1, by1 = nucleus.bbox_xyxy
            mine = result.instance_map[by0:by1, bx0:bx1] == nucleus.id
            there = region[by0:by1, bx0:bx1]
            if np.count_nonzero(there[mine]) * 2 > np.count_nonzero(mine):
                state.seam_duplicates += 1
                continue  # a neighbouring tile already kept this nucleus (see cmdfed.inference.tiling)
            label = state.next_id
            state.next_id += 1
            there[mine & (there == 0)] = label
            feature = nucleus_feature(nucleus, corner, label, self.class_names, self.mpp)
            lines.append(_feature_line(feature))
            name = feature["properties"]["classification"]["name"]
            state.counts[name] = state.counts.get(name, 0) + 1
            if self.grid.touches_inner_edge(corner, nucleus, self.width, self.height):
                state.touching_tile_edges += 1
        if lines:
            labels[y0 : y0 + h, x0 : x0 + w] = region
            features.write("".join(lines).encode())
        state.area_px += self.grid.nominal_cell_area(corner, self.width, self.height)
        timings["postprocess"] += t1 - t0
        timings["write"] += time.perf_counter() - t1

    def _inside_slide(self, corner, nucleus) -> bool:
        """Tiles at the slide's right and bottom edges are padded with white; anything reaching
        into the padding is an artefact of it (or a nucleus the scan cut), not kept."""
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
        for x0, y0 in self.corners[start:stop]:
            region = labels[y0 : y0 + self.tile, x0 : x0 + self.tile]
            stale = region >= self.state.next_id
            if stale.any():
                region[stale] = 0
                labels[y0 : y0 + self.tile, x0 : x0 + self.tile] = region
        self.state.in_flight = None

    # -- outputs -----------------------------------------------------------------------

    def finish(self) -> dict:
        levels = outputs.finish_label_zarr(self.out_dir / LABELS_DIR, self.mpp)
        write_feature_collection(self.features_path, self.out_dir / GEOJSON)
        state = self.state
        area_mm2 = state.area_px * self.mpp**2 / 1e6 if self.mpp else None
        n_cells = sum(state.counts.values())
        summary = {
            "slide": self.reader.path.name,
            "dimensions": [self.width, self.height],
            "mpp": self.mpp,
            "model_version": self.manifest["model"]["version"],
            "backend": self.selection.report(),
            "backends_used": state.backends,
            "tiles": len(self.corners),
            "tile_size": self.tile,
            "overlap": self.overlap,
            "n_cells": n_cells,
            "counts_by_type": dict(sorted(state.counts.items())),
            "area_analysed_px": state.area_px,
            "area_analysed_mm2": area_mm2,
            "cells_per_mm2": n_cells / area_mm2 if area_mm2 else None,
            "nuclei_touching_tile_edges": state.touching_tile_edges,
            "seam_duplicates_dropped": state.seam_duplicates,
            "timings_s": {k: round(v, 3) for k, v in state.timings_s.items()},
            "sessions": state.sessions,
            "warnings": self._warnings(),
            "outputs": {"labels": LABELS_DIR, "label_levels": levels, "geojson": GEOJSON},
        }
        write_json_atomic(self.out_dir / SUMMARY, summary)
        return summary

    def _warnings(self) -> list[str]:
        model_mpp = self.manifest["preprocessing"].get("mpp")
        if self.mpp and model_mpp and not 1 / MPP_MISMATCH <= self.mpp / model_mpp <= MPP_MISMATCH:
            return [f"slide resolution {self.mpp:.3f} um/px differs from the model's {model_mpp:.3f} um/px"]
        if not self.mpp:
            return ["the slide's resolution (mpp) is unknown: areas are in pixels only"]
        return []


def _feature_line(feature: dict) -> str:
    return json.dumps(feature, separators=(",", ":")) + "\n"


def _record(reports: Reports, slide_name: str, summary: dict | None, duration: float, error: BaseException | None = None) -> None:
    """Report the slide to the telemetry; a telemetry failure never fails (or hides) the slide's own result."""
    try:
        _report_inference(reports, slide_name, summary, duration, error)
    except Exception as exc:
        log.warning("could not record %s in the telemetry (%s: %s); the slide's outputs are not affected",
                    slide_name, type(exc).__name__, exc)


def _report_inference(reports: Reports, slide_name: str, summary: dict | None, duration: float, error: BaseException | None) -> None:
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
