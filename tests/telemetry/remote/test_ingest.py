"""The telemetry ingest server over real HTTP(S) on 127.0.0.1, a real SQLite store and plain
http.client requests: tokens, validation, the body size limit, a store that cannot write, TLS
with `cmdfed certs init` certificates."""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time

import pytest

import cmdfed.telemetry.store
from cmdfed.errors import CmdfedError
from cmdfed.telemetry.remote.ingest import IngestServer
from cmdfed.telemetry.remote.transport import MAX_BODY_BYTES, MAX_REPORTS
from server.certs import write_certificates


def request(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict, http.client.HTTPMessage]:
    """(status, JSON answer, headers) of one request."""
    host, port = address.rsplit(":", 1)
    if context is None:
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
    else:
        connection = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), response.headers
    finally:
        connection.close()


def send(
    address: str,
    reports: list,
    token: str | None = None,
    *,
    schema=1,
    headers: dict | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict]:
    """POST /v1/reports of a batch, with the token as the bearer; (status, JSON answer)."""
    all_headers = {"Content-Type": "application/json"}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    all_headers.update(headers or {})
    body = json.dumps({"schema": schema, "reports": reports}).encode()
    status, answer, _ = request(address, "POST", "/v1/reports", body, all_headers, context)
    return status, answer


def heartbeat(at: float = 1_700_000_000.0, **fields) -> dict:
    return {
        "kind": "heartbeat",
        "at": at,
        "backend": "onnxruntime-cpu",
        "model_version": "v1",
        "tiles_per_s": 12.5,
        "p95_ms": 80.0,
        **fields,
    }


def slide_event(at: float = 1_700_000_100.0, **fields) -> dict:
    return {
        "kind": "inference",
        "at": at,
        "slide_name": "case-1.svs",
        "model_version": "v1",
        "n_cells": 42,
        "counts_by_type": {"lymphocyte": 40, "stromal": 2},
        "duration_s": 3.5,
        "backend": "onnxruntime-cpu",
        **fields,
    }


def test_reports_with_a_known_token_are_recorded_under_its_workstation(ingest):
    sent = [
        heartbeat(errors={"bad_tile_size": 3}, workstation="scanner-9"),  # a name in a report is not read
        slide_event(slide_name="/data/patient-7/case-1.svs"),
    ]
    assert send(ingest.address, sent, ingest.token) == (200, {"recorded": 2, "workstation": "scanner-1"})
    [beat] = ingest.heartbeats()
    assert beat["workstation"] == "scanner-1" and beat["at"] == 1_700_000_000.0
    assert (beat["backend"], beat["tiles_per_s"], beat["p50_ms"], beat["p95_ms"]) == (
        "onnxruntime-cpu",
        12.5,
        None,
        80.0,
    )
    assert beat["gpu"] is None and beat["errors"] == {"bad_tile_size": 3}
    [event] = ingest.inference_events()
    assert (
        event["workstation"] == "scanner-1" and event["slide_name"] == "case-1.svs"
    )  # the server keeps no folders either
    assert event["counts_by_type"] == {"lymphocyte": 40, "stromal": 2} and event["n_cells"] == 42
    assert event["area_mm2"] is None and event["error"] is None and event["at"] == 1_700_000_100.0


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer not-a-token", "Bearer ", "Basic {token}", "{token}"],
    ids=["missing", "wrong", "empty", "basic-scheme", "no-scheme"],
)
def test_a_missing_or_unknown_token_is_refused_and_nothing_is_recorded(ingest, authorization):
    headers = {} if authorization is None else {"Authorization": authorization.format(token=ingest.token)}
    status, answer = send(ingest.address, [heartbeat(), slide_event()], headers=headers)
    assert status == 401 and "add-workstation" in answer["error"]
    assert ingest.heartbeats() == [] and ingest.inference_events() == []


def test_a_refusal_says_which_scheme_to_use(ingest):
    status, _, headers = request(ingest.address, "POST", "/v1/reports", b"{}", {"Content-Type": "application/json"})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"at": 1.0, "backend": "x"}, "neither a heartbeat nor an inference event"),
        (heartbeat(backend=""), "needs its backend"),
        (slide_event(slide_name=None), "needs the slide's name"),
        (heartbeat(at=0.0), "'at' must be the time"),
        (heartbeat(at="yesterday"), "'at' must be the time"),
        (heartbeat(tiles_per_s="fast"), "'tiles_per_s' must be number"),
        (heartbeat(tiles_per_s=True), "'tiles_per_s' must be number"),
        (slide_event(n_cells=4.5), "'n_cells' must be integer"),
        (slide_event(n_cells=2**63), "'n_cells' must be integer"),
        (slide_event(counts_by_type={"lymphocyte": "many"}), "'counts_by_type' must be {name: integer}"),
        (heartbeat(errors=[1]), "'errors' must be {name: integer}"),
        ("heartbeat", "not a JSON object"),
    ],
    ids=[
        "no-kind",
        "no-backend",
        "no-slide",
        "zero-time",
        "text-time",
        "text-number",
        "bool-number",
        "float-integer",
        "huge-integer",
        "text-count",
        "list-counts",
        "not-object",
    ],
)
def test_one_invalid_report_refuses_the_whole_batch(ingest, bad, message):
    status, answer = send(ingest.address, [heartbeat(), slide_event(), bad], ingest.token)
    assert status == 400 and message in answer["error"] and "report 2" in answer["error"]
    assert ingest.heartbeats() == [] and ingest.inference_events() == []


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"heartbeat at noon", 400, "not JSON"),
        (b'{"schema": 1, "reports": [{"kind": "heartbeat", "at": NaN, "backend": "x"}]}', 400, "not JSON"),
        (b"[]", 400, "JSON object"),
        (b'{"reports": []}', 400, "schema None is not one this telemetry server reads (it reads 1)"),
        (b'{"schema": 2, "reports": []}', 400, "schema 2 is not one this telemetry server reads (it reads 1)"),
        (b'{"schema": 1, "reports": {}}', 400, "'reports' must be a list"),
        (
            json.dumps({"schema": 1, "reports": [heartbeat()] * (MAX_REPORTS + 1)}).encode(),
            400,
            f"at most {MAX_REPORTS}",
        ),
    ],
    ids=["not-json", "nan", "not-object", "no-schema", "newer-schema", "reports-not-list", "too-many"],
)
def test_a_body_that_is_not_a_batch_is_refused_with_the_reason(ingest, body, status, message):
    headers = {"Authorization": f"Bearer {ingest.token}", "Content-Type": "application/json"}
    answered, answer, _ = request(ingest.address, "POST", "/v1/reports", body, headers)
    assert (answered, message in answer["error"]) == (status, True), answer
    assert ingest.heartbeats() == []


def test_the_body_must_be_json_and_say_so(ingest):
    body = json.dumps({"schema": 1, "reports": [heartbeat()]}).encode()
    headers = {"Authorization": f"Bearer {ingest.token}", "Content-Type": "text/plain"}
    status, answer, _ = request(ingest.address, "POST", "/v1/reports", body, headers)
    assert status == 415 and "application/json" in answer["error"] and ingest.heartbeats() == []


def test_an_oversize_body_is_refused_and_nothing_is_recorded(ingest):
    padding = "x" * (MAX_BODY_BYTES // 8)
    reports = [heartbeat(model_version=padding) for _ in range(9)]  # each report valid, the whole too large
    status, answer = send(ingest.address, reports, ingest.token)
    assert status == 413 and f"more than the {MAX_BODY_BYTES}" in answer["error"]
    assert ingest.heartbeats() == []
    assert send(ingest.address, reports[:2], ingest.token)[0] == 200  # the same reports, fewer at once


def test_a_store_that_cannot_write_answers_503_and_records_nothing(ingest, tmp_path, monkeypatch):
    monkeypatch.setattr(cmdfed.telemetry.store, "BUSY_TIMEOUT_S", 0.2)
    server = IngestServer(tmp_path / "busy.db", ingest.tokens.path, port=0).start()
    address = f"127.0.0.1:{server.port}"
    holder = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
        status, answer = send(address, [heartbeat(), slide_event()], ingest.token)
        assert status == 503 and "send them again later" in answer["error"]
        holder.execute("ROLLBACK")
        assert send(address, [heartbeat(), slide_event()], ingest.token)[0] == 200
        assert holder.execute("SELECT COUNT(*) FROM heartbeats").fetchone() == (1,)
    finally:
        holder.close()
        server.stop(grace=1)


def test_health_needs_no_token_and_other_paths_are_not_found(ingest):
    assert request(ingest.address, "GET", "/healthz")[:2] == (200, {"status": "serving", "schema": 1})
    status, answer, _ = request(
        ingest.address, "POST", "/v2/reports", b"{}", {"Authorization": f"Bearer {ingest.token}"}
    )
    assert status == 404 and "/v1/reports" in answer["error"]


def test_a_time_ahead_of_the_servers_clock_is_recorded_as_now(ingest):
    before = time.time()
    send(ingest.address, [heartbeat(at=before + 86_400)], ingest.token)
    [beat] = ingest.heartbeats()
    assert before <= beat["at"] <= time.time()


def test_tokens_added_or_removed_take_effect_without_a_restart(ingest):
    second = ingest.tokens.add("scanner-2")
    assert send(ingest.address, [heartbeat()], second) == (200, {"recorded": 1, "workstation": "scanner-2"})
    ingest.tokens.remove("scanner-1")
    assert send(ingest.address, [heartbeat()], ingest.token)[0] == 401
    assert [b["workstation"] for b in ingest.heartbeats()] == ["scanner-2"]


def test_a_replaced_token_stops_working(ingest):
    new = ingest.tokens.add("scanner-1", replace=True)
    assert send(ingest.address, [heartbeat()], ingest.token)[0] == 401
    assert send(ingest.address, [heartbeat()], new) == (200, {"recorded": 1, "workstation": "scanner-1"})
    with pytest.raises(CmdfedError, match="--replace"):
        ingest.tokens.add("scanner-1")


def test_tls_with_the_federation_certificates(ingest, tmp_path):
    certs = tmp_path / "certs"
    write_certificates(certs, ["127.0.0.1"])
    server = IngestServer(
        tmp_path / "tls.db", ingest.tokens.path, port=0, tls=(certs / "server.crt", certs / "server.key")
    ).start()
    try:
        address = f"127.0.0.1:{server.port}"
        trusted = ssl.create_default_context(cafile=certs / "ca.crt")
        assert send(address, [heartbeat()], ingest.token, context=trusted) == (
            200,
            {"recorded": 1, "workstation": "scanner-1"},
        )
        with pytest.raises((OSError, http.client.HTTPException)):  # the server hangs up on plaintext
            send(address, [heartbeat()], ingest.token)
        write_certificates(tmp_path / "other", ["127.0.0.1"])  # a CA that did not sign the server's certificate
        untrusted = ssl.create_default_context(cafile=tmp_path / "other" / "ca.crt")
        with pytest.raises(ssl.SSLCertVerificationError):
            send(address, [heartbeat()], ingest.token, context=untrusted)
        assert send(address, [slide_event()], ingest.token, context=trusted)[0] == 200  # still serving after both
    finally:
        server.stop(grace=1)
    assert (tmp_path / "tls.db").exists() and ingest.heartbeats() == []


def test_a_client_trickling_its_request_does_not_hold_up_stop(ingest, tmp_path):
    server = IngestServer(tmp_path / "loris.db", ingest.tokens.path, port=0).start()
    stop_sending = threading.Event()
    loris = socket.create_connection(("127.0.0.1", server.port))

    def trickle():  # a byte of one endless header line at a time, each well within the read timeout
        try:
            loris.sendall(b"POST /v1/reports HTTP/1.1\r\nX-Slow: ")
            while not stop_sending.wait(0.1):
                loris.sendall(b"a")
        except OSError:
            pass  # the server hung up

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    time.sleep(0.5)  # the request is under way
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 1}, daemon=True)
    stopper.start()
    stopper.join(5)
    stopped = not stopper.is_alive()
    stop_sending.set()  # lets a stop() that waited on the client end too
    sender.join(5)
    loris.close()
    stopper.join(60)
    assert stopped, "stop() waited on the trickling client past its grace"


def test_a_server_without_a_tokens_file_says_how_to_make_one(tmp_path):
    with pytest.raises(CmdfedError, match="add-workstation NAME --tokens"):
        IngestServer(tmp_path / "t.db", tmp_path / "missing.json", port=0)


def test_a_taken_port_is_a_clear_error(ingest, tmp_path):
    with pytest.raises(CmdfedError, match="cannot listen on 127.0.0.1"):
        IngestServer(tmp_path / "t.db", ingest.tokens.path, port=ingest.server.port)


def test_the_core_protocol_loads_no_grpc():
    """cmdfed/ holds no gRPC: server and edge share this code through the core."""
    code = (
        "import sys, cmdfed.telemetry.remote.ingest, cmdfed.telemetry.remote.reporter; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'flwr', 'streamlit')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


class Trickler:
    """A loopback client that sends the start of a request, then one more byte every ``every``
    seconds (each well within any per-read timeout) until the server hangs up or it is stopped."""

    def __init__(self, port: int, start: bytes, every: float = 0.2):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.start, self.every = start, every
        self.stopped, self.hung_up = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.socket.sendall(self.start)
            while not self.stopped.wait(self.every):
                self.socket.sendall(b"a")
                self.socket.setblocking(False)
                try:
                    if self.socket.recv(1024) == b"":
                        break  # the server closed its side
                except BlockingIOError:
                    pass
                finally:
                    self.socket.setblocking(True)
        except OSError:
            pass  # reset by the server
        self.hung_up.set()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.socket.close()


SLOW_HEADERS = b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nX-Slow: "


def test_slow_clients_do_not_hold_up_other_workstations(ingest):
    """Finding 5 of issue 14: eight clients trickling their headers held every worker of the old
    http.server; reports of other workstations waited behind them."""
    slow = [Trickler(ingest.server.port, SLOW_HEADERS) for _ in range(12)]
    try:
        time.sleep(0.5)  # all of them under way
        started = time.monotonic()
        assert send(ingest.address, [heartbeat()], ingest.token) == (200, {"recorded": 1, "workstation": "scanner-1"})
        assert time.monotonic() - started < 3
    finally:
        for client in slow:
            client.close()
    assert len(ingest.heartbeats()) == 1


@pytest.mark.parametrize(
    "start",
    [
        SLOW_HEADERS,
        (
            b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n{{"
        ),
    ],
    ids=["headers", "body"],
)
def test_a_client_too_slow_with_its_headers_or_body_is_cut_off(ingest, tmp_path, start):
    server = IngestServer(
        tmp_path / "slow.db", ingest.tokens.path, port=0, header_timeout_s=0.5, body_timeout_s=0.5
    ).start()
    try:
        client = Trickler(server.port, start.replace(b"{token}", ingest.token.encode()), every=0.1)
        assert client.hung_up.wait(5), "the server kept a trickling client past its timeout"
        client.close()
        assert send(f"127.0.0.1:{server.port}", [heartbeat()], ingest.token)[0] == 200
    finally:
        server.stop(grace=1)


def test_connections_beyond_the_limit_are_refused_with_503_and_the_rest_served(ingest, tmp_path):
    server = IngestServer(tmp_path / "busy.db", ingest.tokens.path, port=0, max_connections=3).start()
    address = f"127.0.0.1:{server.port}"
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        time.sleep(0.3)
        # A raw request, read to the server's close: the refusal may come (and the socket close)
        # before a client library has finished sending, which it reports as a broken pipe.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            extra.sendall(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            reply = b""
            while chunk := extra.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower() and b"connections" in body
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        assert send(address, [heartbeat()], ingest.token)[0] == 200
    finally:
        for sock in idle:
            sock.close()
        server.stop(grace=1)
