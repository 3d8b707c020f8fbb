"""Whole-slide inference end to end on small generated slides (real ONNX Runtime, real files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from PIL import Image

from cmdfed.errors import CmdfedError
from cmdfed.telemetry import TelemetryStore
from edge.infer import _SlideJob, infer_slide

from .conftest import synthetic_slide_image


def _features(out_dir):
    return json.loads((out_dir / "cells.geojson").read_text())["features"]


def test_slide_gives_geojson_ome_zarr_and_summary(home, slide_tiff, tmp_path):
    out_dir = tmp_path / "out"
    summary = infer_slide(slide_tiff, home, out_dir, batch=4, telemetry=tmp_path / "t.db")
    collection = json.loads((out_dir / "cells.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert features and summary["n_cells"] == len(features) == sum(summary["counts_by_type"].values())
    names = {"epithelial", "lymphocyte", "stromal", "Nucleus"}
    for feature in features:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] in names
        assert len(props["classification"]["color"]) == 3 and props["measurements"]["Area um^2"] > 0
        xs, ys = np.array(ring).T
        assert 0 <= xs.min() and xs.max() <= summary["dimensions"][0] and ys.max() <= summary["dimensions"][1]

    group = zarr.open_group(str(out_dir / "labels.ome.zarr" / "labels" / "nuclei"), mode="r")
    multiscales = group.attrs["multiscales"][0]
    assert multiscales["version"] == "0.4" and [a["name"] for a in multiscales["axes"]] == ["y", "x"]
    assert multiscales["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
    assert zarr.open_group(str(out_dir / "labels.ome.zarr" / "labels"), mode="r").attrs["labels"] == ["nuclei"]
    level0 = group["0"][:]
    assert level0.shape == tuple(reversed(summary["dimensions"]))
    assert set(np.unique(level0[level0 > 0]).tolist()) == {f["properties"]["nucleus_id"] for f in features}

    assert summary["backend"]["backend"] == "onnxruntime-cpu" and summary["model_version"].startswith("ft-")
    width, height = summary["dimensions"]
    assert 0 < summary["area_analysed_mm2"] <= width * height * 0.5**2 / 1e6  # tissue tiles only, within the slide
    [event] = TelemetryStore.open(tmp_path / "t.db").inference_events()
    assert event["slide_name"] == "case-001.tif" and event["n_cells"] == len(features)


def test_resume_after_interruption_equals_an_uninterrupted_run(home, slide_tiff, tmp_path):
    whole = tmp_path / "whole"
    infer_slide(slide_tiff, home, whole, batch=2)

    def interrupt_after_two_batches(done, total, what):
        if done >= 4 and done < total:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        infer_slide(slide_tiff, home, resumed, batch=2, progress=interrupt_after_two_batches)
    assert not (resumed / "summary.json").exists()
    summary = infer_slide(slide_tiff, home, resumed, batch=2)
    assert summary["sessions"] == 2
    assert _features(resumed) == _features(whole)
    labels = [zarr.open_array(str(d / "labels.ome.zarr/labels/nuclei/0"), mode="r")[:] for d in (whole, resumed)]
    assert np.array_equal(*labels)


def test_a_crash_between_writing_labels_and_committing_the_batch_is_redone_cleanly(home, slide_tiff, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    infer_slide(slide_tiff, home, whole, batch=2)
    commit, calls = _SlideJob._commit, []

    def crash_at_third_commit(job, features, n_tiles):
        calls.append(n_tiles)
        if len(calls) == 3:  # batch 3's labels and features are written, its commit never happens
            raise KeyboardInterrupt
        commit(job, features, n_tiles)

    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        patch.setattr(_SlideJob, "_commit", crash_at_third_commit)
        with pytest.raises(KeyboardInterrupt):
            infer_slide(slide_tiff, home, crashed, batch=2)
    summary = infer_slide(slide_tiff, home, crashed, batch=2)
    assert summary["sessions"] == 2 and summary["n_cells"] == json.loads((whole / "summary.json").read_text())["n_cells"]
    assert _features(crashed) == _features(whole)
    labels = [zarr.open_array(str(d / "labels.ome.zarr/labels/nuclei/0"), mode="r")[:] for d in (whole, crashed)]
    assert np.array_equal(*labels)


def test_labels_of_a_finished_batch_are_on_disk_before_it_is_recorded_done(home, slide_tiff, tmp_path, monkeypatch):
    import os
    import time

    synced_at, fsync = {}, os.fsync  # real path -> when it was last fsynced

    def recording_fsync(fd):
        fsync(fd)
        synced_at[os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))] = time.time_ns()

    commit, checked = _SlideJob._commit, []

    def commit_after_checking_the_labels(job, features, n_tiles):
        level0 = tmp_path / "out" / "labels.ome.zarr" / "labels" / "nuclei" / "0"
        for chunk in (p for p in level0.rglob("*") if p.is_file() and not p.name.startswith(".")):
            assert synced_at.get(os.path.realpath(chunk), -1) >= chunk.stat().st_mtime_ns, f"{chunk} not synced"
            checked.append(chunk)
        commit(job, features, n_tiles)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(_SlideJob, "_commit", commit_after_checking_the_labels)
    infer_slide(slide_tiff, home, tmp_path / "out", batch=2)
    assert checked  # label chunks existed at some commit


def test_a_second_job_on_the_same_out_folder_is_refused(home, slide_tiff, tmp_path):
    import fcntl

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with open(out_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CmdfedError, match="another inference job is writing"):
            infer_slide(slide_tiff, home, out_dir)
    assert infer_slide(slide_tiff, home, out_dir)["n_cells"] > 0


def test_a_telemetry_failure_does_not_fail_the_slide(home, slide_tiff, tmp_path, caplog):
    unusable = tmp_path / "not-a-database"
    unusable.mkdir()
    summary = infer_slide(slide_tiff, home, tmp_path / "out", telemetry=unusable)
    assert summary["n_cells"] > 0 and (tmp_path / "out" / "summary.json").is_file()
    assert "could not record case-001.tif in the telemetry" in caplog.text


def test_plain_image_works_and_other_jobs_outputs_are_protected(home, tmp_path):
    png = tmp_path / "region.png"
    Image.fromarray(synthetic_slide_image(1, 2, seed=4)).save(png)
    summary = infer_slide(png, home, tmp_path / "out")
    assert summary["mpp"] is None and summary["area_analysed_mm2"] is None and summary["warnings"]
    other = tmp_path / "other.png"
    Image.fromarray(synthetic_slide_image(1, 2, seed=5)).save(other)
    with pytest.raises(CmdfedError, match="another slide"):
        infer_slide(other, home, tmp_path / "out")
    assert infer_slide(other, home, tmp_path / "out", restart=True)["slide"] == "other.png"


def test_corrupt_or_unknown_slide_is_one_clear_error(home, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(CmdfedError, match="cannot read slide"):
        infer_slide(broken, home, tmp_path / "out")
    with pytest.raises(CmdfedError, match="does not exist"):
        infer_slide(tmp_path / "missing.tif", home, tmp_path / "out")
