"""A seeded telemetry store and inference output folder for the dashboard tests.

Everything goes through ``TelemetryStore``'s writers; the writers that stamp the current time
themselves (heartbeats, inference events ...) are given a past time by patching the clock.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from cmdfed.slide_outputs import SLIDE_FILE, slide_file_record
from cmdfed.telemetry import TelemetryStore

NOW = time.time()  # reset when the store is seeded: the app judges staleness by the real clock
HOUR = 3600.0
SITES = ("hosp-a", "hosp-b", "hosp-c")
RUN_A, RUN_B = "run-a", "run-b"


@contextmanager
def clock(at: float):
    with mock.patch("cmdfed.telemetry.store.time.time", return_value=at):
        yield


def _seed_run_a(store: TelemetryStore) -> None:
    start = NOW - 2 * HOUR
    store.start_run(
        RUN_A,
        name="fedavg-pathology",
        config={"strategy": "fedavg"},
        strategy="fedavg",
        phases=["pretrain", "finetune"],
        started_at=start,
    )
    global_metrics = {
        1: {"train_loss": 0.9, "eval_dice": 0.61, "eval_aji": 0.41, "eval_pq": 0.35},
        2: {"train_loss": 0.7, "eval_dice": 0.72, "eval_aji": 0.52, "eval_pq": 0.46},
        3: {"train_loss": 0.5, "eval_dice": 0.81, "eval_aji": 0.63, "eval_pq": 0.57},
    }
    statuses = {2: {"hosp-c": "failed"}, 3: {"hosp-b": "declined_budget"}}
    epsilon = {"hosp-a": 2.0, "hosp-b": 4.0, "hosp-c": 1.0}
    for rnd, metrics in global_metrics.items():
        phase = "pretrain" if rnd == 1 else "finetune"
        began = start + (rnd - 1) * 600
        failed = sum(s == "failed" for s in statuses.get(rnd, {}).values())
        store.record_round(
            RUN_A,
            phase=phase,
            round=rnd,
            started_at=began,
            finished_at=began + 100 * rnd,
            n_sites=3,
            n_failed=failed,
            bytes_sent=1_000_000,
            bytes_received=500_000,
            metrics=metrics,
        )
        for i, site in enumerate(SITES):
            status = statuses.get(rnd, {}).get(site, "trained")
            trained = status == "trained"
            store.record_site_round(
                RUN_A,
                phase=phase,
                round=rnd,
                site=site,
                status=status,
                n_examples=100 if trained else 0,
                metrics={"loss": round(1.0 - 0.1 * rnd - 0.01 * i, 3)} if trained else {},
                duration_s=30.0 if trained else None,
                error="CmdfedError: out of memory" if status == "failed" else None,
            )
            if trained:
                store.record_privacy(
                    RUN_A,
                    phase=phase,
                    round=rnd,
                    site=site,
                    epsilon=epsilon[site] * rnd,
                    delta=1e-5,
                    noise_multiplier=1.1,
                    max_grad_norm=1.0,
                    budget_epsilon=8.0,
                )
    store.finish_run(RUN_A, status="completed", finished_at=start + 1900)


def _seed_run_b(store: TelemetryStore) -> None:
    start = NOW - HOUR
    store.start_run(
        RUN_B,
        name="fedprox-small",
        config={},
        strategy="fedprox",
        phases=["finetune"],
        started_at=start,
    )
    store.record_round(
        RUN_B,
        phase="finetune",
        round=1,
        started_at=start,
        finished_at=start + 50,
        n_sites=2,
        n_failed=0,
        bytes_sent=200_000,
        bytes_received=100_000,
        metrics={"eval_dice": 0.5},
    )
    for site in SITES[:2]:
        store.record_site_round(
            RUN_B,
            phase="finetune",
            round=1,
            site=site,
            status="trained",
            n_examples=10,
            metrics={"loss": 0.8},
            duration_s=5.0,
        )


def seed(store: TelemetryStore) -> None:
    _seed_run_a(store)
    _seed_run_b(store)
    with clock(NOW - HOUR):
        store.record_model_version(
            "cmd-b-r1",
            run_id=RUN_B,
            round=1,
            metrics={"eval_dice": 0.5},
            checkpoint_sha256="b" * 64,
        )
        store.record_bundle("cmd-b-r1", sha256="2" * 64, signed=False, path="/bundles/cmd-b-r1.tar")
    with clock(NOW - 30 * 60):
        store.record_model_version(
            "cmd-a-r3",
            run_id=RUN_A,
            round=3,
            metrics={"eval_dice": 0.81},
            checkpoint_sha256="a" * 64,
        )
        store.record_bundle("cmd-a-r3", sha256="1" * 64, signed=True, path="/bundles/cmd-a-r3.tar")
        store.record_deployment(
            "ws-1", version="cmd-a-r3", backend="onnxruntime-cuda", gpu="RTX A4000", status="active"
        )
        store.record_deployment("ws-2", version="cmd-b-r1", backend="onnxruntime-cpu", gpu=None, status="active")
    with clock(NOW - HOUR):  # ws-2 went silent an hour ago: stale
        store.heartbeat(
            "ws-2",
            backend="onnxruntime-cpu",
            gpu=None,
            model_version="cmd-b-r1",
            tiles_per_s=3.5,
            p50_ms=250.0,
            p95_ms=400.0,
            errors={"slide_unreadable": 1},
        )
    with clock(NOW - 10):
        store.heartbeat(
            "ws-1",
            backend="onnxruntime-cuda",
            gpu="RTX A4000",
            model_version="cmd-a-r3",
            tiles_per_s=42.5,
            p50_ms=12.0,
            p95_ms=30.0,
            errors={"oom": 1, "timeout": 2},
        )
    with clock(NOW - 20 * 60):
        store.record_inference(
            "ws-1",
            model_version="cmd-a-r3",
            slide_name="/scans/case-1.svs",
            n_cells=1200,
            counts_by_type={"Neoplastic": 800, "Inflammatory": 400},
            area_mm2=2.5,
            duration_s=95.0,
            backend="onnxruntime-cuda",
        )
        store.record_inference(
            "ws-1",
            model_version="cmd-a-r3",
            slide_name="case-2.svs",
            n_cells=None,
            counts_by_type={},
            area_mm2=None,
            duration_s=1.0,
            backend=None,
            error="CmdfedError: cannot read slide /scans/secret/case-2.svs",
        )


@pytest.fixture(scope="session")
def now(telemetry_db) -> float:
    """The time the seeded store's data is relative to."""
    return NOW


@pytest.fixture(scope="session")
def telemetry_db(tmp_path_factory) -> Path:
    global NOW
    NOW = time.time()  # not the collection time: a long suite before these tests would age every heartbeat
    path = tmp_path_factory.mktemp("dashboard") / "telemetry.db"
    with TelemetryStore.open(path, create=True) as store:
        seed(store)
    return path


def _feature(ring: list[list[float]], name: str, colour: list[int], nucleus_id: int) -> dict:
    """A nucleus as `cmdfed.inference.nuclei.nucleus_feature` writes it."""
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "isLocked": False,
            "classification": {"name": name, "color": colour},
            "measurements": {"Area px^2": 16},
            "nucleus_id": nucleus_id,
        },
    }


def _square(x: float, y: float, side: float = 4) -> list[list[float]]:
    return [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]


@pytest.fixture(scope="session")
def outputs_root(tmp_path_factory) -> Path:
    """OUTPUTS/case-1/ with cells.geojson (3 Neoplastic, 1 Inflammatory) and summary.json, the
    slide OUTPUTS/case-1.png next to it, and OUTPUTS/unfinished/ holding only a summary."""
    root = tmp_path_factory.mktemp("outputs")
    folder = root / "case-1"
    folder.mkdir()
    features = [
        _feature(_square(10.5, 10.5), "Neoplastic", [255, 0, 0], 1),
        _feature(_square(30.5, 12.5), "Neoplastic", [255, 0, 0], 2),
        _feature(_square(50.5, 40.5), "Neoplastic", [255, 0, 0], 3),
        _feature(_square(20.5, 50.5), "Inflammatory", [0, 255, 0], 4),
    ]
    (folder / "cells.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    summary = {
        "slide": "case-1.png",
        "dimensions": [64, 64],
        "mpp": 0.5,
        "model_version": "cmd-a-r3",
        "tiles": 1,
        "n_cells": 4,
        "counts_by_type": {"Inflammatory": 1, "Neoplastic": 3},
        "area_analysed_mm2": 0.001,
        "cells_per_mm2": 4000.0,
        "outputs": {"labels": "labels.ome.zarr", "label_levels": 1, "geojson": "cells.geojson"},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "case-1.png")
    unfinished = root / "unfinished"
    unfinished.mkdir()
    (unfinished / "summary.json").write_text(json.dumps({**summary, "slide": "other.svs"}))
    return root


def make_project(project: Path, outputs_root: Path) -> Path:
    """PROJECT/slides/case-1.png and PROJECT/results/case-1/ (the case-1 outputs of
    ``outputs_root``), whose summary records where the slide is as `cmdfed edge infer` records it
    (``slide_file_record``): nothing lies next to the output folder, only the record leads to the
    slide."""
    (project / "slides").mkdir(parents=True)
    slide = shutil.copy(outputs_root / "case-1.png", project / "slides" / "case-1.png")
    folder = shutil.copytree(outputs_root / "case-1", project / "results" / "case-1")
    summary = json.loads((folder / "summary.json").read_text())
    summary[SLIDE_FILE] = slide_file_record(slide, folder)
    (folder / "summary.json").write_text(json.dumps(summary))
    return project


@pytest.fixture(scope="session")
def slide_project(tmp_path_factory, outputs_root) -> Path:
    return make_project(tmp_path_factory.mktemp("project"), outputs_root)
