"""The telemetry server (``cmdfed server telemetry serve``): edge workstations' reports into the
telemetry store, over HTTPS + JSON (the protocol is in ``transport``).

    POST /v1/reports with "Authorization: Bearer <token>"
        -> WorkstationTokens: unknown or missing token -> 401, nothing recorded
        -> body above MAX_BODY_BYTES -> 413; not JSON, unknown schema, or one bad report -> 400,
           none recorded
        -> all recorded in one store transaction, under the workstation the token names
        -> a store that cannot write (locked too long, disk full, database down) -> 503,
           so the workstation keeps the batch and sends it again later

The standard library's ThreadingHTTPServer, with at most ``workers`` requests at once, a
timeout on every connection, and the TLS handshake done in the request's thread (so a slow or
plaintext client never holds up the others).

Reports carry the time they happened on the workstation (a heartbeat buffered through an
outage keeps its own time); a time ahead of the server's clock is recorded as now. Delivery
is at least once: a batch recorded whose answer was lost is sent and recorded again.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import socketserver
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cmdfed.errors import CmdfedError
from cmdfed.telemetry import TelemetryStore
from cmdfed.telemetry.remote.tokens import WorkstationTokens
from cmdfed.telemetry.remote.transport import (
    FIELDS,
    HEALTH_PATH,
    MAX_BODY_BYTES,
    MAX_REPORTS,
    REPORTS_PATH,
    SCHEMA,
    bearer_token,
    url_host,
)

log = logging.getLogger("cmdfed.telemetry")

DEFAULT_WORKERS = 8
GRACE_S = 5.0
REQUEST_TIMEOUT_S = 30.0  # TLS handshake, and each read or write of a request
DRAIN_LIMIT_BYTES = 8 * MAX_BODY_BYTES  # an oversized body read and discarded so its client sees the 413
_INT64 = 1 << 63


class InvalidReport(CmdfedError):
    pass


def store_calls(batch) -> list[tuple[str, dict]]:
    """(TelemetryStore method, its keyword arguments but the workstation) for each report of a
    decoded request body; InvalidReport names the first thing wrong."""
    if not isinstance(batch, dict):
        raise InvalidReport('the body must be a JSON object {"schema": 1, "reports": [...]}')
    if batch.get("schema") != SCHEMA:
        raise InvalidReport(
            f"schema {batch.get('schema')!r} is not one this telemetry server reads (it reads {SCHEMA}); "
            "run the same cmdfed version on the workstation and the server"
        )
    reports = batch.get("reports")
    if not isinstance(reports, list):
        raise InvalidReport("'reports' must be a list of reports")
    if len(reports) > MAX_REPORTS:
        raise InvalidReport(f"{len(reports)} reports in one request; send at most {MAX_REPORTS} at once")
    now = time.time()
    return [_store_call(k, report, now) for k, report in enumerate(reports)]


def _store_call(index: int, report, now: float) -> tuple[str, dict]:
    if not isinstance(report, dict):
        raise InvalidReport(f"report {index} is not a JSON object")
    at = report.get("at")
    if not (_is_number(at) and at > 0):
        raise InvalidReport(f"report {index}: 'at' must be the time it happened, in seconds since the epoch")
    kind = report.get("kind")
    if kind not in FIELDS:
        raise InvalidReport(f"report {index} is neither a heartbeat nor an inference event (kind {kind!r})")
    fields = {name: _field(index, kind, name, expected, report.get(name)) for name, expected in FIELDS[kind].items()}
    if kind == "heartbeat":
        return "heartbeat", {**fields, "at": min(at, now)}
    return "record_inference", {**fields, "at": min(at, now)}


_REQUIRED = {"heartbeat": "a heartbeat needs its backend", "inference": "an inference event needs the slide's name"}


def _field(index: int, kind: str, name: str, expected: str, value):
    """The value of one field, checked against its type in FIELDS."""
    if expected == "text":
        if not (isinstance(value, str) and value):
            raise InvalidReport(f"report {index}: {_REQUIRED[kind]} ('{name}', text)")
        return value
    if expected == "counts":
        if value is None:
            return {}
        if isinstance(value, dict) and all(_is_int(v) for v in value.values()):
            return value
    elif value is None:
        return None
    elif expected == "optional text" and isinstance(value, str):
        return value
    elif expected == "optional number" and _is_number(value):
        return float(value)
    elif expected == "optional integer" and _is_int(value):
        return value
    what = "{name: integer}" if expected == "counts" else expected.removeprefix("optional ")
    raise InvalidReport(f"report {index}: '{name}' must be {what}, not {json.dumps(value)[:40]}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -_INT64 <= value < _INT64


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _Refused(Exception):
    """Answer the request with ``status`` and ``message``."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "cmdfed-telemetry"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        if self.path.partition("?")[0] == HEALTH_PATH:
            self._answer(HTTPStatus.OK, {"status": "serving", "schema": SCHEMA})
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no {self.path} here: POST reports to {REPORTS_PATH}"})

    def do_POST(self) -> None:
        try:
            workstation, recorded = self._record()
        except _Refused as refusal:
            self._answer(refusal.status, {"error": refusal.message}, refusal.headers)
        except Exception:  # a bug or a store error of a kind not foreseen: the workstation tries again
            log.exception("could not handle reports from %s", self.client_address[0])
            self._answer(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "the telemetry server failed; send the reports again later"})
        else:
            self._answer(HTTPStatus.OK, {"recorded": recorded, "workstation": workstation})

    def _record(self) -> tuple[str, int]:
        if self.path.partition("?")[0] != REPORTS_PATH:
            raise _Refused(HTTPStatus.NOT_FOUND, f"no {self.path} here: POST reports to {REPORTS_PATH}")
        if self.server.stopping:
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "the telemetry server is stopping; send the reports again later")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required") from None
        workstation = self._authenticate(length)
        if length > MAX_BODY_BYTES:
            self._discard(length)
            raise _Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes, more than the {MAX_BODY_BYTES} this server accepts; send fewer reports at once",
            )
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError("the client closed the connection before sending its whole body")
        content_type = self.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the body must be application/json, not {content_type or 'untyped'}")
        try:
            writes = store_calls(json.loads(body.decode("utf-8"), parse_constant=_no_constants))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _Refused(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({exc})") from None
        except InvalidReport as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
        store = self.server.store
        try:
            with store.batch():
                for method, fields in writes:
                    getattr(store, method)(workstation, **fields)
        except CmdfedError as exc:
            log.error("could not record %d reports from %s: %s", len(writes), workstation, exc)
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "the telemetry store cannot record reports now; send them again later",
                           {"Retry-After": "10"}) from None  # fmt: skip
        log.debug("recorded %d reports from %s", len(writes), workstation)
        return workstation, len(writes)

    def _authenticate(self, length: int) -> str:
        token = bearer_token(self.headers.get("Authorization"))
        try:
            workstation = self.server.tokens.workstation_for(token) if token else None
        except CmdfedError as exc:  # a damaged tokens file: accept nobody until it is fixed
            log.error("refusing reports: %s", exc)
            self._discard(length)
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "the telemetry server cannot read its workstation tokens now") from None
        if workstation is None:
            log.warning("refused reports from %s: %s token", self.client_address[0], "unknown" if token else "no")
            self._discard(length)
            raise _Refused(
                HTTPStatus.UNAUTHORIZED,
                "missing or unknown workstation token: send 'Authorization: Bearer <token>' with the token "
                "`cmdfed server telemetry add-workstation` issued for this workstation",
                {"WWW-Authenticate": 'Bearer realm="cmdfed telemetry"'},
            )
        return workstation

    def _discard(self, length: int) -> None:
        """Read a body that will not be used, so that its client sees the answer rather than a
        reset connection; one too large even for that is left, and the connection closed."""
        left = length if length <= DRAIN_LIMIT_BYTES else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 64 << 10))
            if not chunk:
                break
            left -= len(chunk)

    def _answer(self, status: HTTPStatus, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.close_connection = True  # one request per connection: nothing to time out or keep track of
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with TLS in each request's thread and at most ``workers`` requests at once."""

    # server_close() must not join the request threads: ThreadingMixIn joins them without a
    # timeout, and a client that trickles its request in (each read within REQUEST_TIMEOUT_S)
    # would hold SIGTERM up for ever. block_on_close = False says so outright (socketserver
    # already skips daemon threads, but only as a detail of its thread list); IngestServer.stop()
    # waits for requests under way with wait_idle(grace) instead, and a request still running
    # after that is a daemon thread, which does not keep the process alive.
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], *, store: TelemetryStore, tokens: WorkstationTokens,
                 context: ssl.SSLContext | None, workers: int):  # fmt: skip
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.store, self.tokens, self.context = store, tokens, context
        self._slots = threading.BoundedSemaphore(workers)
        self._active = 0
        self._idle = threading.Condition()
        self.stopping = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's, which looks the host up in DNS
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        while not self._slots.acquire(timeout=0.5):  # all workers busy: new connections wait
            if self.stopping:
                self.shutdown_request(request)
                return
        with self._idle:
            self._active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def finish_request(self, request, client_address) -> None:
        if self.context is None:
            return super().finish_request(request, client_address)
        request.settimeout(REQUEST_TIMEOUT_S)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:  # plaintext, an untrusting client, a port scan ...
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request, client_address) -> None:
        log.debug("connection from %s ended badly", client_address[0], exc_info=True)

    def _done(self) -> None:
        self._slots.release()
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


class IngestServer:
    """The HTTP(S) server that records workstations' reports into ``db``, started and stopped together."""

    def __init__(
        self,
        db: str | Path,
        tokens: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int,
        tls: tuple[str | Path, str | Path] | None = None,
        workers: int = DEFAULT_WORKERS,
    ):
        """``tls``: (certificate chain, private key) PEM files, e.g. server.crt and server.key of
        ``cmdfed certs init``; None serves plaintext."""
        self.tokens = WorkstationTokens(tokens)
        if not self.tokens.path.is_file():
            raise CmdfedError(
                f"no workstation tokens file at {self.tokens.path}: issue a token first with "
                f"`cmdfed server telemetry add-workstation NAME --tokens {self.tokens.path}`"
            )
        self.workstations = len(self.tokens.read())
        context = None if tls is None else _server_context(*tls)
        self.tls = context is not None
        self.store = TelemetryStore.open(db, create=True)
        address = f"{url_host(host)}:{port}"
        try:
            self._http = _HTTPServer((host, port), store=self.store, tokens=self.tokens, context=context, workers=workers)
        except OSError as exc:
            self.store.close()
            raise CmdfedError(f"cannot listen on {address} ({exc.strerror or exc}); choose another --listen") from exc
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="telemetry-http", daemon=True)  # fmt: skip

    def start(self) -> IngestServer:
        self._thread.start()
        return self

    def stop(self, grace: float = GRACE_S) -> None:
        """Stop accepting, let requests under way finish within ``grace`` seconds, close the store."""
        self._http.stopping = True
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()
        if not self._http.wait_idle(grace):
            log.warning("telemetry server stopped with requests still under way after %gs", grace)
        self.store.close()


def _server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CmdfedError(
            f"cannot load the TLS certificate {cert_file} with key {key_file} ({exc}); "
            "give the server.crt and server.key of `cmdfed certs init`"
        ) from exc
    return context
