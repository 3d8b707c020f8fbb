"""`cmdfed edge serve --report-to`: heartbeats and slide summaries go to a real telemetry server
on 127.0.0.1 (TLS with `cmdfed certs init` certificates), recorded under the workstation's
token name, and serving never waits on it."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from cmdfed.federation.processes import free_port
from cmdfed.telemetry import TelemetryStore
from cmdfed.telemetry.remote.ingest import IngestServer
from cmdfed.telemetry.remote.reporter import RemoteReporter
from cmdfed.telemetry.remote.tokens import WorkstationTokens, write_token_file
from edge.protos import cmdfed_edge_pb2 as pb
from edge.protos import cmdfed_edge_pb2_grpc as pb_grpc
from edge.reports import StoreReports, open_reports
from edge.service import EdgeService
from server.certs import write_certificates

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workstation(tmp_path) -> tuple[Path, Path]:
    """(the server's tokens file, the workstation's token file) for workstation scanner-3."""
    tokens = WorkstationTokens(tmp_path / "workstations.json")
    write_token_file(tmp_path / "scanner-3.token", tokens.add("scanner-3"))
    return tokens.path, tmp_path / "scanner-3.token"


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def recorded(db: Path) -> tuple[list[dict], list[dict]]:
    with TelemetryStore.open(db, readonly=True) as store:
        return store.heartbeats(latest_only=False), store.inference_events()


def test_heartbeats_and_slide_summaries_reach_the_telemetry_server_over_tls(home, workstation, slide_tiff, tmp_path):
    tokens, token_file = workstation
    write_certificates(tmp_path / "certs", ["127.0.0.1"])
    tls = (tmp_path / "certs" / "server.crt", tmp_path / "certs" / "server.key")
    server = IngestServer(tmp_path / "server.db", tokens, port=0, tls=tls).start()
    try:
        reporter = RemoteReporter.from_files(f"127.0.0.1:{server.port}", token_file, tmp_path / "certs" / "ca.crt")
        service = EdgeService(home, port=0, telemetry=reporter).start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                request = pb.SegmentSlideRequest(path=str(slide_tiff), out_dir=str(tmp_path / "out"), batch=4)
                *_, final = pb_grpc.EdgeSegmentationStub(channel).SegmentSlide(request, timeout=300)
            wait_until(lambda: recorded(tmp_path / "server.db")[1])
        finally:
            service.stop(grace=1)
        beats, [event] = recorded(tmp_path / "server.db")
    finally:
        server.stop(grace=1)
    assert len(beats) == 2  # one when serving started, one after stopping, flushed before stop returned
    assert {b["workstation"] for b in beats} == {"scanner-3"} and beats[0]["model_version"] == service.version
    assert event["workstation"] == "scanner-3" and event["slide_name"] == slide_tiff.name
    assert event["n_cells"] == final.summary.n_cells and event["counts_by_type"] == dict(final.summary.counts_by_type)


def test_serving_does_not_wait_for_a_telemetry_server_that_is_down(home, workstation, tmp_path, caplog):
    tokens, token_file = workstation
    port = free_port()
    reporter = RemoteReporter(f"127.0.0.1:{port}", token_file.read_text().strip(), retry_max_s=0.5)
    service = EdgeService(home, port=0, telemetry=reporter, heartbeat_s=0.2).start()
    try:
        image = np.full((64, 64, 3), 200, np.uint8)
        with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            tile = pb.Tile(rgb=image.tobytes(), height=64, width=64)
            response = pb_grpc.EdgeSegmentationStub(channel).SegmentTiles(
                pb.SegmentTilesRequest(tiles=[tile]), timeout=30
            )
        assert len(response.results) == 1
        wait_until(
            lambda: any(
                "cannot send telemetry" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            )
        )
        assert reporter.pending >= 1
        server = IngestServer(tmp_path / "late.db", tokens, port=port).start()  # the server comes back
        try:
            wait_until(lambda: len(recorded(tmp_path / "late.db")[0]) >= 2)
        finally:
            server.stop(grace=1)
    finally:
        service.stop(grace=1)
    beats, _ = recorded(tmp_path / "late.db")
    assert {b["workstation"] for b in beats} == {"scanner-3"}


def test_report_options_are_checked(workstation, tmp_path):
    _, token_file = workstation
    with pytest.raises(CmdfedError, match="not both"):
        open_reports(str(tmp_path / "t.db"), "127.0.0.1:9093", token_file, None, False)
    with pytest.raises(CmdfedError, match="--report-to needs --report-token"):
        open_reports(None, "127.0.0.1:9093", None, None, False)
    with pytest.raises(CmdfedError, match="go with --report-to"):
        open_reports(None, None, token_file, None, False)
    with pytest.raises(CmdfedError, match="--report-insecure"):
        open_reports(None, "192.0.2.7:9093", token_file, None, False)
    assert isinstance(open_reports(str(tmp_path / "t.db"), None, None, None, False), StoreReports)
    assert open_reports(None, None, None, None, False) is None


@pytest.mark.slow
def test_cli_serve_reports_to_the_server_until_sigterm(home, workstation, tmp_path):
    tokens, token_file = workstation
    server = IngestServer(tmp_path / "server.db", tokens, port=0).start()
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
        "--report-to",
        f"127.0.0.1:{server.port}",
        "--report-token",
        str(token_file),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        started = None
        while started is None:
            line = process.stdout.readline()
            assert line, "the service exited before serving"
            started = re.search(r"serving model .* on port (\d+)", line)
        os.kill(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output
        beats, _ = recorded(tmp_path / "server.db")
    finally:
        if process.poll() is None:
            process.kill()
        server.stop(grace=1)
    assert [b["workstation"] for b in beats] == ["scanner-3", "scanner-3"]
    assert "could not be sent" not in output


@pytest.mark.slow
def test_cli_infer_reports_the_slide_summary_to_the_server_before_it_exits(home, workstation, slide_tiff, tmp_path):
    tokens, token_file = workstation
    server = IngestServer(tmp_path / "server.db", tokens, port=0).start()
    command = [
        sys.executable,
        "-m",
        "cmdfed",
        "edge",
        "infer",
        str(slide_tiff),
        "--home",
        str(home),
        "--out",
        str(tmp_path / "out"),
        "--batch",
        "4",
        "--json",
        "--report-to",
        f"127.0.0.1:{server.port}",
        "--report-token",
        str(token_file),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
        _, events = recorded(tmp_path / "server.db")  # no waiting: the command flushed its report before exiting
    finally:
        server.stop(grace=1)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert [(e["workstation"], e["slide_name"], e["n_cells"]) for e in events] == [
        ("scanner-3", slide_tiff.name, summary["n_cells"])
    ]
