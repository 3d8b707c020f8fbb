"""The workstation's background reporter against a real ingest server on 127.0.0.1: reports
reach the server without the caller waiting, are kept (bounded) while it is down, refuses them
or cannot store them, and are sent when it is back; they never carry a folder, never follow a
redirect, and over TLS go only to a server the federation CA signed."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

import cmdfed.telemetry.remote.ingest
import cmdfed.telemetry.store
from cmdfed.errors import CmdfedError
from cmdfed.federation.processes import free_port
from cmdfed.telemetry import TelemetryStore
from cmdfed.telemetry.remote.ingest import IngestServer
from cmdfed.telemetry.remote.reporter import RemoteReporter
from cmdfed.telemetry.remote.tokens import WorkstationTokens, write_token_file
from server.certs import write_certificates

BEAT = {"backend": "onnxruntime-cpu", "gpu": None, "model_version": "v1", "p50_ms": None, "p95_ms": None, "errors": {}}


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cmdfed.telemetry" and r.levelno >= logging.WARNING]


def test_reports_reach_the_server_without_their_folders(ingest):
    reporter = RemoteReporter(ingest.address, ingest.token)
    reporter.heartbeat(**BEAT, tiles_per_s=3.0)
    reporter.record_inference(
        slide_name="/mnt/scans/patient-7/case-1.svs",
        model_version="v1",
        n_cells=None,
        counts_by_type={},
        area_mm2=None,
        duration_s=0.5,
        backend=None,
        error="cannot read slide /mnt/scans/patient-7/case-1.svs: truncated",
    )
    reporter.close()
    assert reporter.pending == 0
    [beat] = ingest.heartbeats()
    assert beat["workstation"] == "scanner-1" and beat["tiles_per_s"] == 3.0
    [event] = ingest.inference_events()
    assert event["slide_name"] == "case-1.svs" and event["error"] == "cannot read slide case-1.svs: truncated"
    assert "patient-7" not in ingest.db.read_bytes().decode("latin-1")


def test_while_the_server_is_down_reports_are_kept_then_sent_in_order(ingest, caplog):
    port = free_port()
    reporter = RemoteReporter(f"127.0.0.1:{port}", ingest.token, retry_max_s=0.5)
    started = time.perf_counter()
    for k in range(3):
        reporter.heartbeat(**BEAT, tiles_per_s=float(k))
    assert time.perf_counter() - started < 0.5  # the caller never waits on the network
    wait_until(lambda: any("cannot send telemetry" in m and "Connection refused" in m for m in warnings(caplog)))
    assert reporter.pending == 3
    taken = time.time()
    assert ingest.heartbeats() == []
    server = IngestServer(ingest.db, ingest.tokens.path, port=port).start()  # the server comes up
    try:
        wait_until(lambda: reporter.pending == 0)
        reporter.close()
    finally:
        server.stop(grace=1)
    beats = ingest.heartbeats()
    assert [b["tiles_per_s"] for b in beats] == [0.0, 1.0, 2.0]
    assert all(b["at"] < taken for b in beats)  # each keeps the time it was taken, not when it arrived


def test_a_full_queue_drops_the_oldest_with_one_warning(ingest, caplog):
    port = free_port()
    reporter = RemoteReporter(f"127.0.0.1:{port}", ingest.token, capacity=3, retry_max_s=0.5)
    for k in range(6):
        reporter.heartbeat(**BEAT, tiles_per_s=float(k))
    assert reporter.pending == 3
    assert sum("queue full" in m for m in warnings(caplog)) == 1
    server = IngestServer(ingest.db, ingest.tokens.path, port=port).start()
    try:
        wait_until(lambda: reporter.pending == 0)
        reporter.close()
    finally:
        server.stop(grace=1)
    assert [b["tiles_per_s"] for b in ingest.heartbeats()] == [3.0, 4.0, 5.0]


def test_a_refused_token_keeps_the_reports_and_says_so(ingest, caplog):
    reporter = RemoteReporter(ingest.address, "not-the-token", retry_max_s=0.5)
    reporter.heartbeat(**BEAT, tiles_per_s=1.0)
    wait_until(lambda: any("HTTP 401" in m and "add-workstation" in m for m in warnings(caplog)))
    assert reporter.pending == 1
    reporter.close(timeout=0.5)
    assert ingest.heartbeats() == []
    assert any("1 telemetry reports could not be sent" in m for m in warnings(caplog))


def test_an_invalid_report_is_dropped_and_does_not_block_the_rest(ingest, caplog):
    reporter = RemoteReporter(ingest.address, ingest.token)
    reporter.heartbeat(**{**BEAT, "backend": ""}, tiles_per_s=None)
    wait_until(lambda: reporter.pending == 0)
    reporter.heartbeat(**BEAT, tiles_per_s=2.0)
    reporter.close()
    assert [b["tiles_per_s"] for b in ingest.heartbeats()] == [2.0]
    assert any("refused 1 reports as invalid" in m for m in warnings(caplog))


def test_a_store_that_cannot_write_keeps_the_reports_until_it_can(ingest, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cmdfed.telemetry.store, "BUSY_TIMEOUT_S", 0.2)
    server = IngestServer(tmp_path / "busy.db", ingest.tokens.path, port=0).start()
    holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the server answers 503
        reporter = RemoteReporter(f"127.0.0.1:{server.port}", ingest.token, retry_max_s=0.5)
        reporter.heartbeat(**BEAT, tiles_per_s=1.0)
        wait_until(lambda: any("HTTP 503" in m for m in warnings(caplog)))
        assert reporter.pending == 1
        holder.execute("ROLLBACK")
        wait_until(lambda: reporter.pending == 0)
        reporter.close()
        assert holder.execute("SELECT workstation, tiles_per_s FROM heartbeats").fetchall() == [("scanner-1", 1.0)]
    finally:
        holder.close()
        server.stop(grace=1)


def test_batches_too_large_for_the_server_are_sent_in_smaller_ones(ingest, monkeypatch, caplog):
    monkeypatch.setattr(cmdfed.telemetry.remote.ingest, "MAX_BODY_BYTES", 400)  # as a proxy's limit might be
    reporter = RemoteReporter(ingest.address, ingest.token, retry_max_s=0.5)
    for k in range(10):
        reporter.heartbeat(**BEAT, tiles_per_s=float(k))
    reporter.close(timeout=30)
    assert [b["tiles_per_s"] for b in ingest.heartbeats()] == [float(k) for k in range(10)]
    assert any("sending at most" in m for m in warnings(caplog))


def test_over_tls_a_server_the_ca_did_not_sign_gets_nothing(ingest, tmp_path, caplog):
    write_certificates(tmp_path / "certs", ["127.0.0.1"])
    write_certificates(tmp_path / "other", ["127.0.0.1"])
    tls = (tmp_path / "certs" / "server.crt", tmp_path / "certs" / "server.key")
    server = IngestServer(tmp_path / "tls.db", ingest.tokens.path, port=0, tls=tls).start()
    try:
        address = f"127.0.0.1:{server.port}"
        untrusting = RemoteReporter(
            address, ingest.token, ca=(tmp_path / "other" / "ca.crt").read_bytes(), retry_max_s=0.5
        )
        untrusting.heartbeat(**BEAT, tiles_per_s=1.0)
        wait_until(lambda: any("CERTIFICATE_VERIFY_FAILED" in m for m in warnings(caplog)))
        untrusting.close(timeout=0.5)
        trusting = RemoteReporter(address, ingest.token, ca=(tmp_path / "certs" / "ca.crt").read_bytes())
        trusting.heartbeat(**BEAT, tiles_per_s=2.0)
        trusting.close()
        with TelemetryStore.open(tmp_path / "tls.db", readonly=True) as store:
            assert [b["tiles_per_s"] for b in store.heartbeats(latest_only=False)] == [2.0]
    finally:
        server.stop(grace=1)


class _Redirecting(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_POST(self):
        self.seen.append(f"{self.path} {self.headers.get('Authorization')}")
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(307)
        self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_redirect_is_not_followed_and_the_reports_are_kept(ingest, caplog):
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        reporter = RemoteReporter(f"127.0.0.1:{http.server_port}", ingest.token, retry_max_s=0.5)
        reporter.heartbeat(**BEAT, tiles_per_s=1.0)
        wait_until(lambda: any("HTTP 307" in m for m in warnings(caplog)))
        reporter.close(timeout=0.5)
    finally:
        http.shutdown()
        http.server_close()
    assert reporter.pending == 1 and _Redirecting.seen and all(s.startswith("/v1/reports ") for s in _Redirecting.seen)


def test_a_field_the_protocol_lacks_is_a_type_error_for_the_caller(ingest):
    reporter = RemoteReporter(ingest.address, ingest.token)
    with pytest.raises(TypeError, match="no field workstation"):
        reporter.heartbeat(**BEAT, tiles_per_s=1.0, workstation="scanner-9")
    reporter.close()
    assert reporter.pending == 0 and ingest.heartbeats() == []


def test_close_gives_up_on_an_unreachable_server_within_its_timeout():
    reporter = RemoteReporter(f"127.0.0.1:{free_port()}", "token")
    reporter.heartbeat(**BEAT, tiles_per_s=1.0)
    started = time.monotonic()
    reporter.close(timeout=1.0)
    assert time.monotonic() - started < 5 and reporter.pending == 1


def test_from_files_checks_address_token_and_ca(tmp_path):
    token = tmp_path / "token"
    write_token_file(token, WorkstationTokens(tmp_path / "w.json").add("a"))
    assert os.stat(token).st_mode & 0o777 == 0o600
    with pytest.raises(CmdfedError, match="--report-insecure"):
        RemoteReporter.from_files("10.1.2.3:9093", token)
    with pytest.raises(CmdfedError, match="host:port"):
        RemoteReporter.from_files("localhost", token)
    with pytest.raises(CmdfedError, match="add-workstation NAME --token-out"):
        RemoteReporter.from_files("127.0.0.1:9093", tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CmdfedError, match="does not hold a telemetry token"):
        RemoteReporter.from_files("127.0.0.1:9093", tmp_path / "empty")
    (tmp_path / "ca.crt").write_text("not a certificate")
    with pytest.raises(CmdfedError, match="not a PEM certificate"):
        RemoteReporter.from_files("10.1.2.3:9093", token, tmp_path / "ca.crt")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    with pytest.raises(CmdfedError, match="CA certificate is not usable"):
        RemoteReporter.from_files("10.1.2.3:9093", token, tmp_path / "ca.crt")
    with pytest.raises(CmdfedError, match="printable ASCII"):
        RemoteReporter("127.0.0.1:9093", "two words")
