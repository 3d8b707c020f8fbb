"""`cmdfed edge export` post-processing options: checked, recorded in the manifest, used by
infer and serve."""

from __future__ import annotations

import json
from dataclasses import asdict

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from cmdfed.data.synth import synth_tiles
from cmdfed.errors import CmdfedError
from cmdfed.inference.postprocess import WatershedParams
from edge.cli import commands
from edge.deploy import deploy
from edge.infer import infer_slide
from edge.protos import cmdfed_edge_pb2 as pb
from edge.protos import cmdfed_edge_pb2_grpc as pb_grpc
from edge.service import EdgeService

from .conftest import OVERLAP, TILE, synthetic_slide_image


def export(*args: str):
    """`cmdfed edge export ARGS` in this process (a CmdfedError is result.exception)."""
    return CliRunner().invoke(commands, ["export", *args])


@pytest.mark.parametrize(
    "option, value, reason",
    [
        ("--foreground-threshold", "0", "in (0, 1]"),
        ("--min-object-size", "-1", ">= 0"),
        ("--sobel-kernel-size", "4", "odd and in 3..31"),
        ("--marker-gradient-threshold", "1", "in (0, 1)"),
        ("--marker-opening-size", "0", ">= 1"),
        ("--mpp", "0.025", "scan resolution"),
    ],
)
def test_post_processing_options_are_checked_before_any_work(tmp_path, option, value, reason):
    result = export("--checkpoint", str(tmp_path / "no-run"), "--out", str(tmp_path / "bundle"), option, value)
    assert isinstance(result.exception, CmdfedError), result.output
    message = str(result.exception)
    assert message.startswith(f"{option} ") and reason in message
    assert list(tmp_path.iterdir()) == []


def test_post_processing_defaults_follow_the_model_resolution(checkpoint):
    from edge.cli import watershed_params
    from edge.export import trained_mpp

    assert trained_mpp(checkpoint) == 0.5  # fine-tuned on a 0.5 um/px store, recorded in its config

    assert watershed_params(WatershedParams.for_mpp(None)) == WatershedParams()  # unknown resolution: 40x settings
    at_20x = watershed_params(WatershedParams.for_mpp(0.5), marker_opening_size=4)
    assert (at_20x.sobel_kernel_size, at_20x.min_object_size, at_20x.marker_opening_size) == (11, 3, 4)


def test_export_takes_the_settings_tune_chose(checkpoint, tmp_path):
    """`cmdfed train tune` wrote postprocess.json beside the weights: the bundle carries it, and
    an option given on the command line still wins for its one value."""
    import shutil

    from cmdfed.inference.postprocess import TUNED_FILE

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    folder = run / (run / "latest").read_text().strip()
    tuned = {**asdict(WatershedParams.for_mpp(0.5)), "marker_gradient_threshold": 0.3, "foreground_threshold": 0.6}
    (folder / TUNED_FILE).write_text(json.dumps({"params": tuned, "mpp": 0.5}))
    result = export(
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "bundle"),
        "--tile",
        str(TILE),
        "--overlap",
        str(OVERLAP),
        "--min-object-size",
        "4",
        "--no-int8",
        "--no-bf16",
    )
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["postprocessing"]["params"]
    assert params == {**tuned, "min_object_size": 4}
    refused = export("--checkpoint", str(run), "--out", str(tmp_path / "b2"), "--mpp", "0.25", "--no-int8", "--no-bf16")
    assert refused.exit_code != 0 and "tuned for 0.5 um/px" in str(refused.exception or refused.output)


@pytest.mark.slow
def test_exported_post_processing_is_recorded_and_used_by_infer_and_serve(checkpoint, slide_tiff, tmp_path):
    result = export(
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path / "bundle"),
        "--tile",
        str(TILE),
        "--overlap",
        str(OVERLAP),
        "--foreground-threshold",
        "1.0",
        "--min-object-size",
        "4",
        "--marker-opening-size",
        "3",
        "--no-int8",
        "--no-bf16",
    )
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["postprocessing"]["params"]
    changed = {"foreground_threshold": 1.0, "min_object_size": 4, "marker_opening_size": 3}
    assert params == {**asdict(WatershedParams.for_mpp(0.5)), **changed}  # no --mpp: the checkpoint's 0.5 um/px

    deploy(tmp_path / "bundle", tmp_path / "home")
    # No pixel of this model reaches probability 1.0, so with the bundle's threshold nothing is a nucleus.
    summary = infer_slide(slide_tiff, tmp_path / "home", tmp_path / "out")
    assert summary["tiles"] > 0 and summary["n_cells"] == 0
    service = EdgeService(tmp_path / "home", port=0).start()
    try:
        image = next(iter(synth_tiles(1, tile_size=TILE, seed=3))).image
        tile = pb.Tile(rgb=np.ascontiguousarray(image).tobytes(), height=TILE, width=TILE)
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            response = pb_grpc.EdgeSegmentationStub(channel).SegmentTiles(
                pb.SegmentTilesRequest(tiles=[tile]), timeout=60
            )
    finally:
        service.stop(grace=1)
    assert response.results[0].nuclei == [] and not np.frombuffer(response.results[0].instances, "<u2").any()


def test_infer_takes_the_resolution_a_slide_file_does_not_record(home, tmp_path):
    from PIL import Image

    png = tmp_path / "region.png"
    Image.fromarray(synthetic_slide_image(1, 1, seed=7)).save(png)
    infer = ["infer", str(png), "--home", str(home), "--out", str(tmp_path / "out"), "--json"]
    refused = CliRunner().invoke(commands, infer)
    assert isinstance(refused.exception, CmdfedError) and "give the slide's resolution with --mpp" in str(
        refused.exception
    )
    result = CliRunner().invoke(commands, [*infer, "--mpp", "0.5"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["mpp"] == 0.5
