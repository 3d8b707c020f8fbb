"""Whole-slide inference end to end on small generated slides (real ONNX Runtime, real files)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import zarr
from PIL import Image

from cmdfed.data import cpm15
from cmdfed.data.slide import open_slide
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.metrics import evaluate_instances
from cmdfed.inference.stain import HEStains, macenko
from cmdfed.inference.tiling import resize_labels
from cmdfed.model.targets import make_targets
from cmdfed.telemetry import TelemetryStore
from edge import outputs
from edge.deploy import active_bundle
from edge.infer import DEFAULT_MIN_TISSUE, _Batch, _SlideJob, default_batch, infer_slide
from edge.selection import select_backend

from .conftest import synthetic_slide_image


def _features(out_dir):
    return json.loads((out_dir / "cells.geojson").read_text())["features"]


def _labels(out_dir) -> np.ndarray:
    return zarr.open_array(str(out_dir / "labels.ome.zarr/labels/nuclei/0"), mode="r")[:]


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

    # where the slide was, for the dashboard to show it behind the nuclei (tests/dashboard)
    place = summary["slide_file"]
    assert place == json.loads((out_dir / "summary.json").read_text())["slide_file"]
    assert place["absolute_path"] == str(slide_tiff) and not place["relative_path"].startswith("/")
    assert os.path.samefile(out_dir / place["relative_path"], slide_tiff)
    assert place["bytes"] == slide_tiff.stat().st_size
    small_slide_whole = hashlib.sha256(slide_tiff.read_bytes()).hexdigest()
    assert place["quick_sha256"] == small_slide_whole


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


def test_a_job_begun_on_an_earlier_tile_grid_is_not_continued(home, slide_tiff, tmp_path):
    """Another grid rule cuts other tiles and gives seam nuclei other owners: a resumed job would mix two grids."""

    def interrupt_after_the_first_batch(done, total, what):
        if done >= 2:
            raise KeyboardInterrupt

    out_dir = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        infer_slide(slide_tiff, home, out_dir, batch=2, progress=interrupt_after_the_first_batch)
    state_path = out_dir / ".work" / "state.json"
    state = json.loads(state_path.read_text())
    del state["fingerprint"]["grid"]  # as jobs before the one grid rule recorded it
    state_path.write_text(json.dumps(state))
    with pytest.raises(CmdfedError, match=r"another tile grid.*--restart"):
        infer_slide(slide_tiff, home, out_dir, batch=2)
    assert infer_slide(slide_tiff, home, out_dir, batch=2, restart=True)["sessions"] == 1


def test_a_slide_smaller_than_a_tile_is_one_tile_padded_with_white(home, tmp_path):
    png = tmp_path / "small.png"
    Image.fromarray(synthetic_slide_image(1, 1, seed=4)[:100, :120]).save(png)  # tissue in its lower right part
    summary = infer_slide(png, home, tmp_path / "out", mpp=0.5)
    assert summary["tiles"] == 1 and summary["area_analysed_px"] == 100 * 120  # the one tile's cell: the slide
    for feature in _features(tmp_path / "out"):  # nothing reaching into the white padding is kept
        xs, ys = np.array(feature["geometry"]["coordinates"][0]).T
        assert xs.max() <= 120 and ys.max() <= 100


def test_a_crash_between_writing_labels_and_committing_the_batch_is_redone_cleanly(
    home, slide_tiff, tmp_path, monkeypatch
):
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
    assert (
        summary["sessions"] == 2 and summary["n_cells"] == json.loads((whole / "summary.json").read_text())["n_cells"]
    )
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


# -- the pipeline: reading, the model and post-processing on threads of their own ------------


def _pipeline_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("pipeline-")]


@pytest.fixture(scope="module")
def one_tile_batches(home, slide_tiff, tmp_path_factory):
    """The slide segmented uninterrupted, one tile per batch (so the pipeline has many)."""
    out_dir = tmp_path_factory.mktemp("one-tile-batches")
    done = []
    summary = infer_slide(slide_tiff, home, out_dir, batch=1, progress=lambda d, t, what: done.append((d, t)))
    return summary, out_dir, done


def test_the_pipeline_writes_what_its_stages_give_run_one_after_another(home, slide_tiff, one_tile_batches, tmp_path):
    summary, piped, progress = one_tile_batches
    total = summary["tiles"]
    assert total >= 10 and progress == [(done, total) for done in range(total + 1)]  # every batch reported, in order
    in_turn = tmp_path / "in-turn"
    with open_slide(slide_tiff) as reader:  # the same job's stages, each batch through all of them before the next
        job = _SlideJob(reader, select_backend(active_bundle(home), home), in_turn, DEFAULT_MIN_TISSUE, restart=False)
        labels = outputs.open_label_level0(in_turn / "labels.ome.zarr")
        with open(job.features_path, "r+b") as features:
            for start, corner in enumerate(job.corners):
                batch = job._postprocess_batch(job._predict_batch(job._read_batch(_Batch(start, [corner]))))
                job._write_batch(batch, labels, features)
        sequential = job.finish()
    assert (
        summary["n_cells"] == sequential["n_cells"] > 0
        and summary["seam_duplicates_dropped"] == sequential["seam_duplicates_dropped"]
    )
    assert (piped / "cells.geojson").read_bytes() == (in_turn / "cells.geojson").read_bytes()
    assert np.array_equal(_labels(piped), _labels(in_turn))


def test_a_slide_that_breaks_while_its_tiles_are_read_is_one_error_and_resumes(
    home, slide_tiff, one_tile_batches, tmp_path
):
    import os
    import shutil

    slide = shutil.copy(slide_tiff, tmp_path / slide_tiff.name)
    intact = (tmp_path / "case-001.tif").read_bytes()

    def cut_the_file_after_the_first_batch(done, total, what):
        if done == 1:  # the reader is ahead of the writer by a few batches; those after them cannot be read
            os.truncate(slide, 4096)

    out_dir = tmp_path / "out"
    with pytest.raises(CmdfedError, match=r"cannot read the region .* case-001\.tif.* truncated or corrupt") as raised:
        infer_slide(slide, home, out_dir, batch=1, progress=cut_the_file_after_the_first_batch)
    assert "(raised in the pipeline's read stage)" in raised.value.__notes__
    assert not _pipeline_threads()
    assert not (out_dir / "cells.geojson").exists() and not (out_dir / "summary.json").exists()
    (tmp_path / "case-001.tif").write_bytes(intact)
    resumed = infer_slide(slide, home, out_dir, batch=1)
    assert resumed["sessions"] == 2 and _features(out_dir) == _features(one_tile_batches[1])


def test_a_failure_in_post_processing_is_one_error_and_resumes(
    home, slide_tiff, one_tile_batches, tmp_path, monkeypatch
):
    from cmdfed.inference import postprocess

    watershed, calls = postprocess.watershed, []

    def out_of_memory_at_the_fifth_tile(*args, **kwargs):  # scikit-image's watershed, as a full machine fails it
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("Unable to allocate 256 KiB for the watershed's queue")
        return watershed(*args, **kwargs)

    out_dir = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(postprocess, "watershed", out_of_memory_at_the_fifth_tile)
        with pytest.raises(MemoryError, match="watershed's queue") as raised:
            infer_slide(slide_tiff, home, out_dir, batch=1)
    assert "(raised in the pipeline's post-processing stage)" in raised.value.__notes__
    assert not _pipeline_threads()
    assert not (out_dir / "cells.geojson").exists() and not (out_dir / "summary.json").exists()
    state = json.loads((out_dir / ".work" / "state.json").read_text())
    assert (
        state["tiles_done"] < one_tile_batches[0]["tiles"] and state["in_flight"] is None
    )  # whole batches before it only
    resumed = infer_slide(slide_tiff, home, out_dir, batch=1)
    assert resumed["sessions"] == 2 and _features(out_dir) == _features(one_tile_batches[1])
    assert np.array_equal(_labels(out_dir), _labels(one_tile_batches[1]))


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


def test_plain_image_needs_its_resolution_and_other_jobs_outputs_are_protected(home, tmp_path):
    png = tmp_path / "region.png"
    Image.fromarray(synthetic_slide_image(1, 2, seed=4)).save(png)
    # A PNG records no resolution, and the model reads slides at 0.5 um/px.
    with pytest.raises(CmdfedError, match=r"resolution of region.png is unknown.*--mpp"):
        infer_slide(png, home, tmp_path / "out")
    assert not (tmp_path / "out" / "labels.ome.zarr").exists()  # refused before anything is written
    with pytest.raises(CmdfedError, match="--mpp 300"):
        infer_slide(png, home, tmp_path / "out", mpp=300)  # a screen's 72 dpi, not a scan
    summary = infer_slide(png, home, tmp_path / "out", mpp=0.5)
    assert summary["mpp"] == 0.5 and summary["area_analysed_mm2"] > 0 and not summary["warnings"]
    assert summary["resolution"]["resampled"] is False and summary["resolution"]["note"] is None
    other = tmp_path / "other.png"
    Image.fromarray(synthetic_slide_image(1, 2, seed=5)).save(other)
    with pytest.raises(CmdfedError, match="another slide"):
        infer_slide(other, home, tmp_path / "out", mpp=0.5)
    with pytest.raises(CmdfedError, match="another slide"):  # the same image said to be at another resolution
        infer_slide(png, home, tmp_path / "out", mpp=0.25)
    assert infer_slide(other, home, tmp_path / "out", restart=True, mpp=0.5)["slide"] == "other.png"


def test_corrupt_or_unknown_slide_is_one_clear_error(home, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(CmdfedError, match="cannot read slide"):
        infer_slide(broken, home, tmp_path / "out")
    with pytest.raises(CmdfedError, match="does not exist"):
        infer_slide(tmp_path / "missing.tif", home, tmp_path / "out")


# -- slides at another resolution than the model's (the bundle's: 0.5 um/px) ----------------


def pyramid_tiff(path, levels: list[np.ndarray], mpp: float):
    """A tiled pyramid TIFF with these levels (level 0 first) and level 0's um/px in its tags."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0],
            subifds=len(levels) - 1,
            tile=(64, 64),
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(64, 64))
    return path


@pytest.fixture(scope="module")
def cpm15_slides(tmp_path_factory):
    """CPM-15 image 08 as scanned (40x, 0.25 um/px), its pyramid with no 20x level (levels at
    1 and 1/4, as an SVS has), and the same image resized to 20x (0.5 um/px), as slides."""
    folder = tmp_path_factory.mktemp("cpm15-slides")
    native, _ = cpm15.load_pair("08", None)
    at_20x, _ = cpm15.load_pair("08", 0.5)
    return {
        "40x": pyramid_tiff(folder / "08-40x.tif", [native, native[::4, ::4]], 0.25),
        "20x": pyramid_tiff(folder / "08-20x.tif", [at_20x, at_20x[::4, ::4]], 0.5),
        "40x+20x": pyramid_tiff(folder / "08-40x-20x.tif", [native, at_20x, native[::4, ::4]], 0.25),
        "native": native,
    }


@pytest.fixture(scope="module")
def cpm15_runs(home, cpm15_slides, tmp_path_factory):
    """`edge infer` of the 40x and the 20x slide, uninterrupted: (summary, out folder) each."""
    folder = tmp_path_factory.mktemp("cpm15-runs")
    return {
        name: (infer_slide(cpm15_slides[name], home, folder / name, batch=4, min_tissue=0.0), folder / name)
        for name in ("40x", "20x")
    }


def test_a_40x_slide_gives_the_nuclei_of_the_same_slide_at_20x_in_its_own_pixels(cpm15_runs, cpm15_slides):
    """The model (here the conftest's briefly trained one: its nuclei are blobs, not nuclei, but
    the same blobs whatever the slide's resolution) reads the 40x slide resampled to its 0.5
    um/px; the labels, polygons and areas come back in the 40x slide's level-0 pixels."""
    (s40, out40), (s20, out20) = cpm15_runs["40x"], cpm15_runs["20x"]
    native = cpm15_slides["native"]
    height, width = native.shape[:2]
    assert s40["dimensions"] == [width, height] and s40["mpp"] == 0.25
    reading = s40["resolution"]
    assert reading["level"] == 0 and reading["resampled"] and reading["level0_px_per_model_px"] == 2.0
    assert "no pyramid level at the model's 0.5 um/px" in reading["note"] and "level 0" in reading["note"]
    assert not s40["warnings"] and s20["resolution"]["resampled"] is False and s20["resolution"]["note"] is None

    labels40, labels20 = _labels(out40), _labels(out20)
    assert labels40.shape == (height, width)
    same = evaluate_instances(resize_labels(labels20, labels40.shape), labels40)
    assert s20["n_cells"] > 50 and same["pq"] >= 0.9 and same["det_f1"] >= 0.9

    features = _features(out40)
    assert {f["properties"]["nucleus_id"] for f in features} == set(np.unique(labels40[labels40 > 0]).tolist())
    rings = [np.array(f["geometry"]["coordinates"][0]) for f in features]
    assert max(r[:, 0].max() for r in rings) > width / 2 + 10  # 40x pixels, not the model's 20x ones
    for feature, ring in zip(features, rings):  # each polygon lies around its nucleus's label pixels
        ys, xs = np.nonzero(labels40 == feature["properties"]["nucleus_id"])
        assert ring[:, 0].min() <= xs.min() and xs.max() + 1 <= ring[:, 0].max()
        assert ring[:, 1].min() <= ys.min() and ys.max() + 1 <= ring[:, 1].max()
        measured = feature["properties"]["measurements"]
        assert measured["Area px^2"] >= len(xs) and measured["Area um^2"] == round(measured["Area px^2"] * 0.0625, 3)
    area = {
        name: np.median([f["properties"]["measurements"]["Area um^2"] for f in _features(out)])
        for name, (_, out) in cpm15_runs.items()
    }
    assert area["40x"] == pytest.approx(area["20x"], rel=0.1)  # the same nuclei in um^2, 4x the pixels
    assert s40["area_analysed_mm2"] == pytest.approx(s20["area_analysed_mm2"], rel=0.01)
    assert s40["area_analysed_px"] == pytest.approx(4 * s20["area_analysed_px"], rel=0.01)


def test_a_pyramid_level_at_the_model_resolution_is_read_as_it_is(home, cpm15_runs, cpm15_slides, tmp_path):
    summary = infer_slide(cpm15_slides["40x+20x"], home, tmp_path / "out", batch=4, min_tissue=0.0)
    reading = summary["resolution"]
    assert reading["level"] == 1 and reading["level_mpp"] == pytest.approx(0.5) and not reading["resampled"]
    assert reading["note"] is None and summary["dimensions"] == cpm15_runs["40x"][0]["dimensions"]
    labels, labels20 = _labels(tmp_path / "out"), _labels(cpm15_runs["20x"][1])
    assert evaluate_instances(resize_labels(labels20, labels.shape), labels)["pq"] >= 0.9


def test_a_resampled_slide_resumes_to_the_uninterrupted_result(home, cpm15_runs, cpm15_slides, tmp_path, monkeypatch):
    commit, calls = _SlideJob._commit, []

    def crash_at_second_commit(job, features, n_tiles):
        calls.append(n_tiles)
        if len(calls) == 2:  # the batch's level-0 labels are written, its commit never happens
            raise KeyboardInterrupt
        commit(job, features, n_tiles)

    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        patch.setattr(_SlideJob, "_commit", crash_at_second_commit)
        with pytest.raises(KeyboardInterrupt):
            infer_slide(cpm15_slides["40x"], home, crashed, batch=4, min_tissue=0.0)
    summary = infer_slide(cpm15_slides["40x"], home, crashed, batch=4, min_tissue=0.0)
    whole = cpm15_runs["40x"][1]
    assert summary["sessions"] == 2 and _features(crashed) == _features(whole)
    assert np.array_equal(_labels(crashed), _labels(whole))
    with pytest.raises(CmdfedError, match="another slide"):  # the same slide said to be at 20x is another job
        infer_slide(cpm15_slides["40x"], home, crashed, mpp=0.5)


def test_an_object_a_tile_edge_cuts_is_dropped_and_counted_not_drawn(home, slide_tiff, tmp_path):
    """A tile sees a nucleus whole when it is no larger than the overlap; an object reaching the
    edge of the tile that keeps it is larger, cut there with a straight side: not a nucleus outline."""
    with open_slide(slide_tiff) as reader:
        job = _SlideJob(
            reader, select_backend(active_bundle(home), home), tmp_path / "out", DEFAULT_MIN_TISSUE, restart=False
        )
        tile, overlap = job.tile, job.overlap
        corner = next(c for c in job.corners if 0 < c[0] and c[0] + tile < job.width and 0 < c[1])
        truth = np.zeros((tile, tile), np.int32)
        rows, cols = np.mgrid[:tile, :tile]
        truth[np.hypot(rows - tile // 2, cols - tile // 3) <= 6] = 1  # a nucleus, whole in the tile's cell
        # wider than the overlap, its centroid inside the tile's cell, its right end at the tile's right edge
        truth[tile // 2 + 12 : tile // 2 + 24, tile - overlap - 16 :] = 2
        targets = make_targets(truth)
        maps = {"np": targets.nuclear_pixels.astype(np.float32)[None], "hv": targets.hv[None]}
        batch = job._postprocess_batch(_Batch(0, [corner], maps=maps))
        _, _, kept, cut = batch.tiles[0]
        assert cut == 1 and len(kept) == 1 and kept[0].area < 200
        labels = outputs.open_label_level0(job.out_dir / "labels.ome.zarr")
        with open(job.features_path, "r+b") as features:
            job._write_batch(batch, labels, features)
        assert job.state.cut_by_tile_edges == 1 and sum(job.state.counts.values()) == 1


def test_a_default_batch_holds_eight_256_px_tiles_worth_of_pixels():
    assert [default_batch(tile) for tile in (128, 256, 384, 512, 1024)] == [8, 8, 3, 2, 1]


@pytest.fixture(scope="module")
def restained_slides(tmp_path_factory):
    """CPM-15 image 08 at 20x as a slide, and the same tissue re-stained as image 10 (another lab's H&E)."""
    folder = tmp_path_factory.mktemp("restained")
    image = cpm15.load_pair("08", 0.5)[0]
    other = macenko(image, HEStains.of([image]), HEStains.of([cpm15.load_pair("10", 0.5)[0]]))
    return {
        "as scanned": pyramid_tiff(folder / "08.tif", [image, image[::4, ::4]], 0.5),
        "other lab": pyramid_tiff(folder / "08-other-lab.tif", [other, other[::4, ::4]], 0.5),
    }


def test_tiles_are_re_stained_as_the_model_s_training_images_by_the_slide_s_own_stains(
    home, restained_slides, tmp_path
):
    """The bundle records its training tiles' stains; the job estimates the slide's once and
    re-stains every tile: the same tissue from two labs gives nearly the same nuclei."""
    manifest = json.loads((active_bundle(home) / "manifest.json").read_text())
    reference = manifest["preprocessing"]["stain_reference"]
    assert reference["method"] == "macenko"
    runs = {}
    for normalise in (True, False):
        for name, slide in restained_slides.items():
            out = tmp_path / f"{name}-{normalise}"
            summary = infer_slide(slide, home, out, batch=4, min_tissue=0.0, stain_normalise=normalise)
            runs[name, normalise] = _labels(out)
            record = summary["stain_normalisation"]
            if normalise:
                assert record["reference"] == reference and record["slide"]["method"] == "macenko"
            else:
                assert record is None
    agree = {n: evaluate_instances(runs["as scanned", n], runs["other lab", n])["pq"] for n in (True, False)}
    assert agree[True] > agree[False] + 0.2, agree  # measured: 0.64 against 0.17


def test_a_job_is_not_continued_with_the_other_stain_setting(home, restained_slides, tmp_path):
    def interrupt_after_the_first_batch(done, total, what):
        if done >= 2:
            raise KeyboardInterrupt

    slide, out_dir = restained_slides["other lab"], tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        infer_slide(slide, home, out_dir, batch=2, min_tissue=0.0, progress=interrupt_after_the_first_batch)
    with pytest.raises(CmdfedError, match="another slide, model or settings"):
        infer_slide(slide, home, out_dir, batch=2, min_tissue=0.0, stain_normalise=False)
    assert infer_slide(slide, home, out_dir, batch=2, min_tissue=0.0)["sessions"] == 2
