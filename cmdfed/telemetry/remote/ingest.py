"""The telemetry server (``cmdfed server telemetry serve``): edge workstations' reports into the
telemetry store, over HTTPS + JSON (the protocol is in ``transport``).

    POST /v1/reports with "Authorization: Bearer <token>"
        -> WorkstationTokens: unknown or missing token -> 401, nothing recorded
        -> body above MAX_BODY_BYTES -> 413; not JSON, unknown schema, or one bad report -> 400,
           none recorded
        -> all recorded in one store transaction, under the workstation the token names
        -> a store that cannot write (locked too long, disk full, database down) -> 503,
           so the workstation keeps the batch and sends it again later

Served by uvicorn (asyncio, HTTP/1.1 through h11) with Starlette routes, on a thread of its own:
a connection costs no worker while it waits for its client, so slow clients cannot hold up the
others. Each connection must deliver its request headers within ``header_timeout_s`` of
connecting and its body within ``body_timeout_s`` of the headers, or it is closed (the old
``http.server`` allowed 30 s per read, so one byte every few seconds held a worker for ever);
at most ``max_connections`` are open at once, and one more is answered 503 and closed at
once. Token checks and store writes run on a small thread pool (``workers``), since the store
blocks. One request per connection (``Connection: close``).

Reports carry the time they happened on the workstation (a heartbeat buffered through an
outage keeps its own time); a time ahead of the server's clock is recorded as now. Delivery
is at least once: a batch recorded whose answer was lost is sent and recorded again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import ssl
import threading
import time
from http import HTTPStatus
from pathlib import Path

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

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

DEFAULT_WORKERS = 8  # threads for token checks and store writes
GRACE_S = 5.0
HEADER_TIMEOUT_S = 10.0  # from connecting (after TLS) to the end of the request headers
BODY_TIMEOUT_S = 30.0  # from the headers to the end of the body (1 MB even over a slow link)
MAX_CONNECTIONS = 256  # open at once; one more is answered 503 and closed
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


def _answer(status: HTTPStatus, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    # One request per connection: nothing to time out or keep track of between requests.
    return JSONResponse(body, status_code=status, headers={"Connection": "close", **(headers or {})})


class _Ingest:
    """The ASGI application: routes, token check, body limits, the store transaction."""

    def __init__(self, store: TelemetryStore, tokens: WorkstationTokens, *, body_timeout_s: float, workers: int):
        self.store, self.tokens, self.body_timeout_s = store, tokens, body_timeout_s
        self.stopping = False
        self._threads = anyio.CapacityLimiter(workers)
        self.app = Starlette(
            routes=[
                Route(HEALTH_PATH, self.health, methods=["GET"]),
                Route(REPORTS_PATH, self.reports, methods=["POST"]),
            ],
            exception_handlers={404: self.not_here, 405: self.not_here},
        )

    async def health(self, request: Request) -> JSONResponse:
        return _answer(HTTPStatus.OK, {"status": "serving", "schema": SCHEMA})

    async def not_here(self, request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", HTTPStatus.NOT_FOUND)
        return _answer(
            status, {"error": f"no {request.method} {request.url.path} here: POST reports to {REPORTS_PATH}"}
        )

    async def reports(self, request: Request) -> JSONResponse:
        client = request.client.host if request.client else "?"
        try:
            workstation, recorded = await self._record(request, client)
        except _Refused as refusal:
            return _answer(refusal.status, {"error": refusal.message}, refusal.headers)
        except ClientDisconnect:
            log.info("%s closed the connection before sending its whole body; nothing recorded", client)
            return _answer(HTTPStatus.BAD_REQUEST, {"error": "incomplete body"})
        except Exception:  # a bug or a store error of a kind not foreseen: the workstation tries again
            log.exception("could not handle reports from %s", client)
            return _answer(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "the telemetry server failed; send the reports again later"}
            )
        return _answer(HTTPStatus.OK, {"recorded": recorded, "workstation": workstation})

    async def _record(self, request: Request, client: str) -> tuple[str, int]:
        if self.stopping:
            raise _Refused(
                HTTPStatus.SERVICE_UNAVAILABLE, "the telemetry server is stopping; send the reports again later"
            )
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        try:
            length = int(request.headers.get("content-length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required") from None
        workstation = await self._authenticate(request, client, length)
        if length > MAX_BODY_BYTES:
            await self._discard(request, length)
            raise _Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes, more than the {MAX_BODY_BYTES} this server accepts; send fewer reports "
                "at once",
            )
        body = await self._body(request, length)
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            raise _Refused(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the body must be application/json, not {content_type or 'untyped'}"
            )
        try:
            writes = store_calls(json.loads(body.decode("utf-8"), parse_constant=_no_constants))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _Refused(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({exc})") from None
        except InvalidReport as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
        try:
            await anyio.to_thread.run_sync(self._write, workstation, writes, limiter=self._threads)
        except CmdfedError as exc:
            log.error("could not record %d reports from %s: %s", len(writes), workstation, exc)
            raise _Refused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the telemetry store cannot record reports now; send them again later",
                {"Retry-After": "10"},
            ) from None
        log.debug("recorded %d reports from %s", len(writes), workstation)
        return workstation, len(writes)

    def _write(self, workstation: str, writes: list[tuple[str, dict]]) -> None:
        with self.store.batch():
            for method, fields in writes:
                getattr(self.store, method)(workstation, **fields)

    async def _authenticate(self, request: Request, client: str, length: int) -> str:
        token = bearer_token(request.headers.get("authorization"))
        try:
            workstation = (
                await anyio.to_thread.run_sync(self.tokens.workstation_for, token, limiter=self._threads)
                if token
                else None
            )
        except CmdfedError as exc:  # a damaged tokens file: accept nobody until it is fixed
            log.error("refusing reports: %s", exc)
            await self._discard(request, length)
            raise _Refused(
                HTTPStatus.SERVICE_UNAVAILABLE, "the telemetry server cannot read its workstation tokens now"
            ) from None
        if workstation is None:
            log.warning("refused reports from %s: %s token", client, "unknown" if token else "no")
            await self._discard(request, length)
            raise _Refused(
                HTTPStatus.UNAUTHORIZED,
                "missing or unknown workstation token: send 'Authorization: Bearer <token>' with the token "
                "`cmdfed server telemetry add-workstation` issued for this workstation",
                {"WWW-Authenticate": 'Bearer realm="cmdfed telemetry"'},
            )
        return workstation

    async def _body(self, request: Request, length: int) -> bytes:
        """The whole body, within body_timeout_s."""
        try:
            body = await asyncio.wait_for(request.body(), self.body_timeout_s)
        except TimeoutError:
            raise _Refused(
                HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.body_timeout_s:g} s"
            ) from None
        if len(body) != length:
            raise ClientDisconnect()
        return body

    async def _discard(self, request: Request, length: int) -> None:
        """Read a body that will not be used, so that its client sees the answer rather than a
        reset connection; one too large even for that is left, and the connection closed."""
        if length > DRAIN_LIMIT_BYTES:
            return

        async def drain() -> None:
            async for _ in request.stream():
                pass

        try:
            await asyncio.wait_for(drain(), self.body_timeout_s)
        except (TimeoutError, ClientDisconnect):
            pass


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with what it lacks against slow clients: a deadline for the request
    headers, and a limit on open connections (one more is answered 503 and closed)."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_connections = MAX_CONNECTIONS

    refusal_linger_s = 2.0  # a refused connection is read and discarded this long before it is closed

    def connection_made(self, transport) -> None:
        self._header_timer = None
        self._refused = False
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning(
                "refused a connection from %s: %d connections are open",
                (self.client or ("?",))[0],
                len(self.connections) - 1,
            )
            body = json.dumps(
                {
                    "error": f"the telemetry server has {self.max_connections} connections open; "
                    "send the reports again later"
                }
            ).encode()
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 10\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            # A close with the client's request unread would send a reset, which can destroy the 503
            # before the client reads it: stop writing, discard what arrives, close a little later.
            self._refused = True
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(self.refusal_linger_s, transport.close)
            return
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the request of a refused connection is read and dropped
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """A timer runs while the client owes this connection a request's headers."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)
        elif not waiting:
            self._cancel_header_timer()

    def _cancel_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info(
                "closed a connection from %s: no request headers within %gs",
                (self.client or ("?",))[0],
                self.header_timeout_s,
            )
            self.transport.close()


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
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ):
        """``tls``: (certificate chain, private key) PEM files, e.g. server.crt and server.key of
        ``cmdfed certs init``; None serves plaintext. ``header_timeout_s``, ``body_timeout_s``,
        ``max_connections``: see the module's docstring."""
        if workers < 1 or max_connections < 1 or header_timeout_s <= 0 or body_timeout_s <= 0:
            raise CmdfedError("workers and max_connections must be at least 1, and the timeouts positive")
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
            self._socket = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as exc:
            self.store.close()
            raise CmdfedError(f"cannot listen on {address} ({exc.strerror or exc}); choose another --listen") from exc
        self.port = self._socket.getsockname()[1]
        self._ingest = _Ingest(self.store, self.tokens, body_timeout_s=body_timeout_s, workers=workers)
        protocol = type(
            "_ConfiguredProtocol",
            (_Protocol,),
            {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
        )
        config = uvicorn.Config(
            self._ingest.app,
            http=protocol,
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=int(max(1, header_timeout_s)),
        )
        config.load()
        config.ssl = context  # ours: the federation certificates, TLS 1.2 at least
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="telemetry-http", daemon=True)

    def _serve(self) -> None:
        try:
            self._uvicorn.run(sockets=[self._socket])
        except BaseException:  # pragma: no cover - logged, the caller sees the thread end
            log.exception("the telemetry server stopped with an error")

    def start(self) -> IngestServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            raise CmdfedError(f"the telemetry server did not start on port {self.port}; see the log")
        return self

    def stop(self, grace: float = GRACE_S) -> None:
        """Stop accepting, let requests under way finish within ``grace`` seconds, close the store."""
        self._ingest.stopping = True
        self._uvicorn.config.timeout_graceful_shutdown = max(math.ceil(grace), 1)
        self._uvicorn.should_exit = True
        if self._thread.is_alive():
            self._thread.join(grace + 2)
            if self._thread.is_alive():
                self._uvicorn.force_exit = True
                self._thread.join(2)
                log.warning("telemetry server stopped with requests still under way after %gs", grace)
        self._socket.close()
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
