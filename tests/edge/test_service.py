"""The edge gRPC service with a real server on loopback, real gRPC clients and real HTTP
scrapes of its metrics (ONNX Runtime CPU, the tiny exported model)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cmdfed.data import cpm15
from cmdfed.data.synth import synth_tiles
from cmdfed.evaluate.metrics import evaluate_instances
from cmdfed.inference.nuclei import nucleus_records
from cmdfed.inference.postprocess import PostprocessResult
from cmdfed.inference.stain import HEStains, macenko
from cmdfed.inference.tiling import resize_labels
from cmdfed.telemetry import TelemetryStore
from edge.protos import cmdfed_edge_pb2 as pb
from edge.protos import cmdfed_edge_pb2_grpc as pb_grpc
from edge.service import EdgeService, tile_result

from .conftest import TILE, synthetic_slide_image, write_pyramid_tiff

MAX_TILES = 4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-telemetry") / "t.db"


@pytest.fixture(scope="module")
def service(home, telemetry):
    service = EdgeService(home, port=0, metrics_port=0, telemetry=telemetry, max_tiles=MAX_TILES, workers=4).start()
    yield service
    service.stop(grace=1)


@pytest.fixture
def stub(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield pb_grpc.EdgeSegmentationStub(channel)


def tile(image: np.ndarray) -> pb.Tile:
    return pb.Tile(rgb=image.tobytes(), height=image.shape[0], width=image.shape[1])


def synthetic_tiles(n: int, size: int = TILE) -> list[np.ndarray]:
    return [np.ascontiguousarray(t.image[:size, :size]) for t in synth_tiles(n, tile_size=TILE, seed=3)]


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service="cmdfed.edge.v1.EdgeSegmentation")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def scrape(service) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the metrics endpoint over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counter(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_health_is_serving_and_model_info_describes_the_model(service, stub, signed_bundle):
    assert health_status(service.port) == health_pb2.HealthCheckResponse.SERVING
    info = stub.ModelInfo(pb.Empty(), timeout=10)
    manifest = json.loads((signed_bundle / "manifest.json").read_text())
    assert info.model_version == manifest["model"]["version"] == service.version
    assert info.backend == "onnxruntime-cpu" and info.device == "cpu" and info.precision == "fp32"
    assert list(info.class_names) == manifest["model"]["class_names"]
    assert info.tile_size == TILE and info.mpp == 0.5
    assert info.limits.side_multiple_of == 32 and info.limits.min_side <= TILE <= info.limits.max_side
    assert info.limits.max_tiles_per_request == MAX_TILES and info.limits.max_message_bytes > 3 * TILE * TILE
    reference = manifest["preprocessing"][
        "stain_reference"
    ]  # the training tiles' stains, which tiles are re-stained as
    assert info.HasField("stain_reference") and list(info.stain_reference.eosin) == reference["eosin"]
    assert list(info.stain_reference.max_concentrations) == reference["max_concentrations"]
    samples = scrape(service)
    assert (
        counter(
            samples,
            "cmdfed_edge_model_info",
            version=service.version,
            backend="onnxruntime-cpu",
            device="cpu",
            precision="fp32",
        )
        == 1
    )


def test_segment_tiles_returns_instance_maps_and_nuclei_for_each_tile(service, stub):
    full, odd = synthetic_tiles(2)
    odd = np.ascontiguousarray(odd[:100, :90])  # not a multiple of 32: padded, results cropped back
    response = stub.SegmentTiles(pb.SegmentTilesRequest(tiles=[tile(full), tile(odd)]), timeout=60)
    assert response.model_version == service.version and response.backend == "onnxruntime-cpu"
    assert [(r.height, r.width) for r in response.results] == [(TILE, TILE), (100, 90)]
    for result in response.results:
        assert result.encoding == pb.UINT16_LE
        instances = np.frombuffer(result.instances, "<u2").reshape(result.height, result.width)
        ids = sorted(n.id for n in result.nuclei)
        assert set(np.unique(instances[instances > 0]).tolist()) == set(ids)
        for nucleus in result.nuclei:
            assert nucleus.area == int((instances == nucleus.id).sum())
            assert nucleus.type_name and len(nucleus.contour) >= 4
            assert 0 <= nucleus.centroid.x < result.width and 0 <= nucleus.centroid.y < result.height
    assert response.results[0].nuclei  # the tuned tiny model finds nucleus-like blobs on a full tile


def _instances(result: pb.TileResult) -> np.ndarray:
    return np.frombuffer(result.instances, "<u2").reshape(result.height, result.width)


def test_tiles_at_another_resolution_are_segmented_at_the_model_s_and_answered_in_their_own_pixels(stub):
    """A 40x tile stated as 0.25 um/px gives the nuclei of the same tissue sent at 20x (the
    model's 0.5 um/px), in the 40x tile's pixels."""
    native, _ = cpm15.load_pair("08", None)
    at_40x = np.ascontiguousarray(native[128:384, 256:512])
    at_20x = np.asarray(Image.fromarray(at_40x).resize((128, 128), Image.Resampling.BILINEAR))
    # As scanned: the 2-step test model, trained on pale synthetic tiles, finds its blobs on H&E's own colours.
    request = pb.SegmentTilesRequest(tiles=[tile(at_40x)], mpp=0.25, as_scanned=True)
    [big] = stub.SegmentTiles(request, timeout=60).results
    request = pb.SegmentTilesRequest(tiles=[tile(at_20x)], mpp=0.5, as_scanned=True)
    [small] = stub.SegmentTiles(request, timeout=60).results
    assert (big.height, big.width) == (256, 256) and (small.height, small.width) == (128, 128)
    instances = _instances(big)
    same = evaluate_instances(resize_labels(_instances(small), (256, 256)), instances)
    assert len(small.nuclei) > 5 and same["pq"] >= 0.9
    assert max(n.centroid.x for n in big.nuclei) > 128  # 40x pixels
    for nucleus in big.nuclei:
        assert nucleus.area == int((instances == nucleus.id).sum())
    for mpp, words in ((300, "mpp 300"), (-1, "mpp -1")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.SegmentTiles(pb.SegmentTilesRequest(tiles=[tile(at_20x)], mpp=mpp), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()


def test_tiles_of_one_tissue_from_two_labs_give_nearly_the_same_nuclei_unless_sent_as_scanned(stub):
    """Tiles are re-stained as the model's training images by the request's own stains: CPM-15
    08's tiles and the same tiles re-stained as image 10, each lab's sent in one request."""
    image = cpm15.load_pair("08", 0.5)[0]
    other = macenko(image, HEStains.of([image]), HEStains.of([cpm15.load_pair("10", 0.5)[0]]))
    corners = [(0, 0), (0, 256), (256, 0), (256, 256)]
    agreement = {}
    for as_scanned in (False, True):
        answers = [
            stub.SegmentTiles(
                pb.SegmentTilesRequest(
                    tiles=[tile(np.ascontiguousarray(lab[y : y + TILE, x : x + TILE])) for y, x in corners],
                    as_scanned=as_scanned,
                ),
                timeout=60,
            ).results
            for lab in (image, other)
        ]
        agreement[as_scanned] = np.mean(
            [evaluate_instances(_instances(a), _instances(b))["pq"] for a, b in zip(*answers)]
        )
    assert agreement[False] > agreement[True] + 0.1, agreement


def test_a_nucleus_centroid_and_contour_follow_the_same_pixel_centre_rule():
    # A 3x3 nucleus at rows 4..6, columns 10..12 covers [10, 13) x [4, 7) in the proto's
    # coordinates (pixel centres at +0.5): its centroid is that square's centre, as is its contour's.
    instances = np.zeros((16, 16), np.int32)
    instances[4:7, 10:13] = 1
    result = tile_result(PostprocessResult(instances, None, nucleus_records(instances)), ["background", "nucleus"])
    (nucleus,) = result.nuclei
    xs, ys = [p.x for p in nucleus.contour], [p.y for p in nucleus.contour]
    assert (min(xs), max(xs), min(ys), max(ys)) == (10.0, 13.0, 4.0, 7.0)
    assert (nucleus.centroid.x, nucleus.centroid.y) == (11.5, 5.5)


def test_segment_slide_streams_progress_then_summary_and_outputs(service, stub, slide_tiff, telemetry, tmp_path):
    request = pb.SegmentSlideRequest(path=str(slide_tiff), out_dir=str(tmp_path / "out"), batch=2)
    messages = list(stub.SegmentSlide(request, timeout=300))
    *progress, final = messages
    assert progress and all(m.stage == "tiles" and m.total == final.total for m in progress)
    assert [m.done for m in progress] == sorted(m.done for m in progress)
    assert final.stage == "done" and final.done == final.total == final.summary.tiles > 0
    summary = json.loads(Path(final.outputs.summary).read_text())
    assert final.summary.n_cells == summary["n_cells"]
    assert dict(final.summary.counts_by_type) == summary["counts_by_type"]
    assert final.summary.model_version == service.version and final.summary.backend == "onnxruntime-cpu"
    for path in (final.outputs.labels, final.outputs.geojson, final.outputs.summary):
        assert Path(path).exists()
    events = TelemetryStore.open(telemetry).inference_events()
    assert any(e["slide_name"] == slide_tiff.name and e["n_cells"] == summary["n_cells"] for e in events)


def test_unknown_and_corrupt_slides_get_clear_errors(stub, tmp_path):
    with pytest.raises(grpc.RpcError) as missing:
        list(stub.SegmentSlide(pb.SegmentSlideRequest(path=str(tmp_path / "missing.svs")), timeout=60))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in missing.value.details()
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(grpc.RpcError) as corrupt:
        list(stub.SegmentSlide(pb.SegmentSlideRequest(path=str(broken), out_dir=str(tmp_path / "o")), timeout=60))
    assert corrupt.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot read slide" in corrupt.value.details()


def test_a_slide_of_unknown_resolution_needs_the_request_to_state_it(stub, tmp_path):
    png = tmp_path / "region.png"  # a PNG records no resolution; the model reads at 0.5 um/px
    Image.fromarray(synthetic_slide_image(1, 1, seed=6)).save(png)
    request = pb.SegmentSlideRequest(path=str(png), out_dir=str(tmp_path / "out"))
    with pytest.raises(grpc.RpcError) as unknown:
        list(stub.SegmentSlide(request, timeout=60))
    assert (
        unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "resolution of region.png is unknown" in unknown.value.details()
    )
    request.mpp = 0.5
    final = list(stub.SegmentSlide(request, timeout=300))[-1]
    assert final.stage == "done" and json.loads(final.summary.summary_json)["mpp"] == 0.5


def malformed_request(k: int) -> tuple[pb.SegmentTilesRequest, str, grpc.StatusCode]:
    """Four kinds of wrong request, in turn: (request, failure reason, expected status)."""
    pixel = pb.Tile(rgb=b"\x80" * 3, height=1, width=1)
    short = pb.Tile(rgb=b"\x00" * 5, height=2, width=2)
    empty = pb.Tile(rgb=b"", height=0, width=64)
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    kinds = [
        (pb.SegmentTilesRequest(), "no_tiles", invalid),
        (pb.SegmentTilesRequest(tiles=[short]), "bad_tile_bytes", invalid),
        (pb.SegmentTilesRequest(tiles=[empty]), "bad_tile_size", invalid),
        (pb.SegmentTilesRequest(tiles=[pixel] * (MAX_TILES + 1)), "too_many_tiles", exhausted),
    ]
    return kinds[k % len(kinds)]


def test_a_thousand_malformed_requests_are_refused_counted_and_harmless(service, stub):
    before = scrape(service)
    sent: Counter[str] = Counter()
    for k in range(1000):
        request, reason, expected = malformed_request(k)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SegmentTiles(request, timeout=10)
        assert refused.value.code() == expected and refused.value.details()
        sent[reason] += 1
    after = scrape(service)
    for reason, n in sent.items():
        delta = counter(after, "cmdfed_edge_failures_total", method="SegmentTiles", reason=reason) - counter(
            before, "cmdfed_edge_failures_total", method="SegmentTiles", reason=reason
        )
        assert delta == n
    assert health_status(service.port) == health_pb2.HealthCheckResponse.SERVING
    [image] = synthetic_tiles(1, size=64)
    assert len(stub.SegmentTiles(pb.SegmentTilesRequest(tiles=[tile(image)]), timeout=60).results) == 1


def test_a_message_above_the_size_limit_is_refused_by_grpc(service, stub):
    limit = stub.ModelInfo(pb.Empty(), timeout=10).limits.max_message_bytes
    huge = pb.Tile(rgb=b"\x00" * (limit + 1), height=1, width=1)
    with pytest.raises(grpc.RpcError) as refused:
        stub.SegmentTiles(pb.SegmentTilesRequest(tiles=[huge]), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health_status(service.port) == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_clients_are_all_served_and_counted(service):
    clients, calls = 4, 5
    images = synthetic_tiles(2, size=64)
    before = counter(scrape(service), "cmdfed_edge_requests_total", method="SegmentTiles", code="OK")
    failures: list[BaseException] = []

    def client() -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = pb_grpc.EdgeSegmentationStub(channel)
                for _ in range(calls):
                    response = stub.SegmentTiles(pb.SegmentTilesRequest(tiles=[tile(i) for i in images]), timeout=120)
                    assert [(r.height, r.width) for r in response.results] == [(64, 64), (64, 64)]
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    after = scrape(service)
    assert counter(after, "cmdfed_edge_requests_total", method="SegmentTiles", code="OK") - before == clients * calls
    assert counter(after, "cmdfed_edge_tiles_total") >= clients * calls * len(images)


def test_slides_run_the_served_model_one_at_a_time(home, slide_tiff, tmp_path):
    import shutil

    own_home = tmp_path / "home"
    shutil.copytree(home, own_home)
    service = EdgeService(own_home, port=0, metrics_port=0, metrics_host="0.0.0.0", workers=4).start()
    try:
        # Another deploy or a rollback changes what is active; this service keeps its model.
        (own_home / "state.json").write_text(json.dumps({"active": "another-version", "history": []}))
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = pb_grpc.EdgeSegmentationStub(channel)
            # A slide of some 40 tiles, one per batch: still running when the second request arrives.
            big = write_pyramid_tiff(tmp_path / "big.tif", synthetic_slide_image(4, 6, seed=7))
            first = stub.SegmentSlide(
                pb.SegmentSlideRequest(path=str(big), out_dir=str(tmp_path / "a"), batch=1), timeout=300
            )
            assert next(first).stage == "tiles"
            with pytest.raises(grpc.RpcError) as busy:
                list(
                    stub.SegmentSlide(
                        pb.SegmentSlideRequest(path=str(slide_tiff), out_dir=str(tmp_path / "b")), timeout=60
                    )
                )
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "another slide" in busy.value.details()
            *_, final = first
            assert final.stage == "done" and final.summary.model_version == service.version
            # Asked the moment the first one's stream ends: not refused as busy.
            again = list(
                stub.SegmentSlide(
                    pb.SegmentSlideRequest(path=str(slide_tiff), out_dir=str(tmp_path / "b")), timeout=300
                )
            )
            assert again[-1].stage == "done" and again[-1].summary.model_version == service.version
        assert counter(scrape(service), "cmdfed_edge_failures_total", method="SegmentSlide", reason="busy") == 1
    finally:
        service.stop(grace=1)


def test_heartbeat_is_recorded_when_serving_starts(service, telemetry):
    [beat] = TelemetryStore.open(telemetry).heartbeats(latest_only=True)
    assert beat["backend"] == "onnxruntime-cpu" and beat["model_version"] == service.version


@pytest.mark.slow
def test_cli_serves_until_sigterm_then_stops_gracefully(home, tmp_path):
    telemetry = tmp_path / "t.db"
    command = [
        sys.executable,
        "-m",
        "cmdfed",
        "edge",
        "serve",
        "--home",
        str(home),
        "--port",
        "0",
        "--telemetry",
        str(telemetry),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        started = None
        while started is None:
            line = process.stdout.readline()
            assert line, "the service exited before serving"
            started = re.search(r"serving model .* on port (\d+)", line)
        port = int(started.group(1))
        assert health_status(port) == health_pb2.HealthCheckResponse.SERVING
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    beats = TelemetryStore.open(telemetry).heartbeats(latest_only=False)
    assert len(beats) == 2  # one when serving starts, one after the graceful stop


def test_generated_code_matches_the_proto(tmp_path):
    from grpc_tools import protoc

    proto = "edge/protos/cmdfed_edge.proto"
    args = ["protoc", f"-I{REPO}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    assert protoc.main([*args, str(REPO / proto)]) == 0
    for name in ("cmdfed_edge_pb2.py", "cmdfed_edge_pb2.pyi", "cmdfed_edge_pb2_grpc.py"):
        generated = (tmp_path / "edge" / "protos" / name).read_text()
        committed = (REPO / "edge" / "protos" / name).read_text()
        assert generated == committed, f"{name} is stale: regenerate it (command in the proto)"
