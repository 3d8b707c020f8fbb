"""The bundle's INT8 variant: exported with its gate recorded in the manifest, chosen at load
only when its gate passed and it is the faster graph here, fp32 otherwise with the reason said;
a calibration set without tissue is refused before any work."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cmdfed.errors import CmdfedError
from edge.cli import commands
from edge.deploy import active_bundle, status
from edge.export import export_bundle
from edge.quantize import INT8_FILE
from edge.selection import select_backend

from .conftest import OVERLAP, TILE


def test_int8_variant_and_its_gate_are_in_the_manifest(int8_home):
    bundle = active_bundle(int8_home)
    manifest = json.loads((bundle / "manifest.json").read_text())
    variant = manifest["variants"]["int8"]
    gate = variant["gate"]
    assert variant["onnx"] == INT8_FILE and INT8_FILE in manifest["files"]
    assert gate["passed"] and gate["reason"] is None
    assert set(gate["pq_fp32"]) == set(gate["pq_int8"]) == {"08", "09", "10", "mean"}
    assert gate["pq_drop"] == pytest.approx(gate["pq_fp32"]["mean"] - gate["pq_int8"]["mean"])
    assert 0 < gate["golden_max_abs_diff"] <= gate["tolerance"]
    assert status(int8_home)["variants"]["int8"]["passed"]


def test_the_faster_gated_graph_runs_and_the_choice_is_reported(int8_home):
    selection = select_backend(active_bundle(int8_home), int8_home, force="onnxruntime-cpu", threads=1)
    variants = selection.report()["variants"]
    assert set(variants) == {"fp32", "int8"}
    fastest = min(variants, key=lambda v: variants[v]["ms_per_tile"])
    assert selection.backend.precision == fastest and variants[fastest]["used"]
    assert selection.report()["precision"] == fastest
    tiles = np.random.default_rng(0).integers(0, 256, (2, TILE, TILE, 3), dtype=np.uint8)
    assert selection.backend.run(tiles)["np"].shape == (2, TILE, TILE)


def test_int8_that_failed_its_gate_is_not_used_and_the_reason_is_logged(int8_failing_home, caplog):
    gate = json.loads((active_bundle(int8_failing_home) / "manifest.json").read_text())["variants"]["int8"]["gate"]
    assert not gate["passed"] and "golden outputs differ" in gate["reason"]
    with caplog.at_level(logging.INFO, logger="cmdfed.edge"):
        selection = select_backend(active_bundle(int8_failing_home), int8_failing_home, threads=1)
    assert selection.backend.name == "onnxruntime-cpu" and selection.backend.precision == "fp32"
    assert selection.report()["variants_timed_at"] is None  # one graph passed: nothing to time or keep
    int8 = selection.report()["variants"]["int8"]
    assert (
        not int8["used"] and "failed its gate at export" in int8["reason"] and "golden outputs differ" in int8["reason"]
    )
    assert any(
        "int8 variant not used" in r.getMessage() and "golden outputs differ" in r.getMessage() for r in caplog.records
    )


def test_calibration_without_tissue_is_refused_before_any_work(checkpoint, tmp_path):
    glass = [np.full((300, 300, 3), 245, np.uint8), np.zeros((200, 400, 3), np.uint8)]
    with pytest.raises(CmdfedError, match="calibration set has no tissue.*give RGB H&E images with tissue"):
        export_bundle(checkpoint, tmp_path / "b", tile=TILE, overlap=OVERLAP, mpp=0.5, calibration=glass)
    assert not any(tmp_path.iterdir())  # nothing was started
    folder = tmp_path / "calibration"
    folder.mkdir()
    Image.fromarray(glass[0]).save(folder / "blank.png")
    result = CliRunner().invoke(
        commands,
        [
            "export",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "b"),
            "--tile",
            str(TILE),
            "--overlap",
            str(OVERLAP),
            "--calibration",
            str(folder),
        ],
    )
    assert result.exit_code != 0 and "calibration set has no tissue" in str(result.exception or result.output)
