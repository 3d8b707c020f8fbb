"""A workstation's reports to the federation's telemetry server (``cmdfed edge serve
--report-to``), sent in the background so that nothing the workstation does waits on the network.

    heartbeat(...) / record_inference(...)    stamp the time, scrub paths, encode, queue, return at once
        -> sender thread: the oldest BATCH reports (and at most MAX_BODY_BYTES) per
           POST /v1/reports, with the workstation's token as "Authorization: Bearer", over HTTPS
           checked against the federation's CA certificate when given one
        -> sent: gone from the queue (a batch stays queued until it is sent)
        -> not sent (server down, network, proxy, token refused, 5xx): kept and sent again,
           waiting RETRY_INITIAL_S, then twice as long each time up to retry_max_s; the first
           failure of an outage logs a warning, the first success after it an info line
        -> queue full (``capacity`` reports): the oldest is dropped, with one warning per outage
        -> refused as invalid (400): dropped with an error, since sending the same reports again
           cannot succeed; too large (413, e.g. a proxy's limit): sent again in halves
    close(timeout): sends what it can within ``timeout``; what is left is logged as lost.

One connection per batch (the standard library's urllib: ``https_proxy`` / ``no_proxy`` are
honoured, except for a loopback server, and redirects are not followed, so the token goes only
to the address given). Patients' file paths never leave the workstation: the slide is sent by
file name only and path-like words in error texts are cut to their last part before a report
is queued.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

import cmdfed
from cmdfed.addresses import LOOPBACK, split_address
from cmdfed.errors import CmdfedError
from cmdfed.redaction import file_name_only
from cmdfed.telemetry.remote.tokens import read_token_file
from cmdfed.telemetry.remote.transport import (
    MAX_BODY_BYTES,
    MAX_REPORT_BYTES,
    REPORTS_PATH,
    bearer_header,
    check_token,
    encode_batch,
    encode_report,
    require_tls_off_loopback,
    url_host,
)
from cmdfed.telemetry.store import scrub_paths

log = logging.getLogger("cmdfed.telemetry")

DEFAULT_CAPACITY = 5000  # about three and a half days of heartbeats at one a minute
BATCH = 100
CALL_TIMEOUT_S = 10.0
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0
CLOSE_TIMEOUT_S = 5.0
_ERROR_BODY_BYTES = 4096  # of an error answer, read for its message

# What a batch's POST came to.
_SENT, _RETRY, _SPLIT, _DROP = "sent", "retry", "split", "drop"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: following it would hand the token to another address."""

    def redirect_request(self, *args, **kwargs):
        return None


class RemoteReporter:
    """Queues reports (the keyword arguments of ``TelemetryStore.heartbeat`` / ``record_inference``
    less the workstation, which the server takes from the token) and sends them in the background."""

    def __init__(
        self,
        address: str,
        token: str,
        *,
        ca: bytes | None = None,
        capacity: int = DEFAULT_CAPACITY,
        retry_max_s: float = RETRY_MAX_S,
    ):
        """``ca``: PEM certificate(s) to check the server's against (HTTPS); None sends plaintext HTTP."""
        host, port = split_address(address)  # a clear error for a malformed address, before any thread starts
        if capacity < 1:
            raise CmdfedError(f"the telemetry queue must hold at least one report, got {capacity}")
        self.address, self.capacity, self.retry_max_s = address, capacity, retry_max_s
        self.url = f"{'https' if ca is not None else 'http'}://{url_host(host)}:{port}{REPORTS_PATH}"
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if ca is not None:
            handlers.append(urllib.request.HTTPSHandler(context=_client_context(ca)))
        if host in LOOPBACK:
            handlers.append(urllib.request.ProxyHandler({}))  # this machine is never reached through a proxy
        self._opener = urllib.request.build_opener(*handlers)
        self._headers = {
            "Authorization": bearer_header(check_token(token)),
            "Content-Type": "application/json",
            "User-Agent": f"cmdfed/{cmdfed.__version__}",
        }
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, bytes]] = deque()  # (number, encoded report), oldest first
        self._next_number = 0
        self._batch_limit = BATCH  # halved when the server (or a proxy) finds a batch too large
        self._close_requested = threading.Event()
        self._deadline = math.inf  # set by close(): the sender gives up then
        self._warned_full = False
        self._thread = threading.Thread(target=self._send_loop, name="telemetry-reporter", daemon=True)
        self._thread.start()

    @classmethod
    def from_files(
        cls, address: str, token_file: str | Path, ca_file: str | Path | None = None, *, insecure: bool = False
    ) -> RemoteReporter:
        """The reporter `cmdfed edge serve --report-to ADDR --report-token FILE [--report-ca CA]` makes."""
        host, _ = split_address(address)
        require_tls_off_loopback(
            host, tls=ca_file is not None, insecure=insecure, what="telemetry server", insecure_flag="--report-insecure"
        )
        token = read_token_file(token_file)
        ca = None
        if ca_file is not None:
            try:
                ca = Path(ca_file).read_bytes()
            except OSError as exc:
                raise CmdfedError(
                    f"cannot read the federation CA certificate {ca_file} ({exc.strerror}); it is the ca.crt of "
                    "the server's `cmdfed certs init`"
                ) from exc
            if b"BEGIN CERTIFICATE" not in ca:
                raise CmdfedError(
                    f"{ca_file} is not a PEM certificate; give the ca.crt of the server's `cmdfed certs init`"
                )
        return cls(address, token, ca=ca)

    # -- what the workstation calls

    def heartbeat(self, **fields) -> None:
        self._put(encode_report("heartbeat", time.time(), fields))

    def record_inference(self, **fields) -> None:
        fields["slide_name"] = file_name_only(str(fields["slide_name"]))
        fields["error"] = scrub_paths(fields.get("error"))
        self._put(encode_report("inference", time.time(), fields))

    @property
    def pending(self) -> int:
        """Reports not yet sent."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Send what can be sent within ``timeout`` seconds, then stop; what is left is lost."""
        with self._cond:
            self._deadline = time.monotonic() + timeout
            self._close_requested.set()
            self._cond.notify_all()
        self._thread.join()
        lost = self.pending
        if lost:
            log.warning(
                "%d telemetry reports could not be sent to %s before stopping; they are lost", lost, self.address
            )

    # -- the sender thread

    def _put(self, report: bytes) -> None:
        if len(report) > MAX_REPORT_BYTES:
            log.error(
                "a telemetry report of %d bytes is more than the %d sent; it is dropped", len(report), MAX_REPORT_BYTES
            )
            return
        with self._cond:
            if len(self._queue) >= self.capacity:
                self._queue.popleft()
                if not self._warned_full:
                    log.warning(
                        "telemetry queue full (%d reports): dropping the oldest until %s can be reached",
                        self.capacity,
                        self.address,
                    )
                    self._warned_full = True
            self._queue.append((self._next_number, report))
            self._next_number += 1
            self._cond.notify()

    def _next_batch(self) -> list[tuple[int, bytes]]:
        """The oldest reports, at most ``_batch_limit`` of them and MAX_BODY_BYTES in all (at least one)."""
        batch, size = [], 64  # the envelope around the reports
        for number, report in self._queue:
            if batch and (len(batch) >= self._batch_limit or size + len(report) + 1 > MAX_BODY_BYTES):
                break
            batch.append((number, report))
            size += len(report) + 1
        return batch

    def _send_loop(self) -> None:
        delay, failing = RETRY_INITIAL_S, False
        while True:
            # The batch stays queued while it is sent: what is pending is always the queue, and the
            # bound on it holds even during an outage (a report dropped while in flight may still arrive).
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._close_requested.is_set())
                if not self._queue:
                    return  # closing, and everything was sent
                batch = self._next_batch()
                timeout = min(CALL_TIMEOUT_S, self._deadline - time.monotonic())
            if timeout <= 0:
                return  # close() is out of time
            outcome, detail = self._post([report for _, report in batch], timeout)
            if outcome == _RETRY:
                if not failing:
                    log.warning(
                        "cannot send telemetry to %s (%s); keeping up to %d reports and retrying",
                        self.address,
                        detail,
                        self.capacity,
                    )
                    failing = True
                self._pause(delay)
                delay = min(2 * delay, self.retry_max_s)
                continue
            if outcome == _SPLIT:
                self._batch_limit = max(1, len(batch) // 2)
                log.warning(
                    "telemetry server %s found %d reports too many at once (%s); sending at most %d",
                    self.address,
                    len(batch),
                    detail,
                    self._batch_limit,
                )
                continue
            if outcome == _DROP:
                log.error(
                    "telemetry server %s refused %d reports as invalid (%s); they are dropped",
                    self.address,
                    len(batch),
                    detail,
                )
            elif failing:
                log.info("telemetry server %s reachable again", self.address)
            failing, delay = False, RETRY_INITIAL_S
            last_sent = batch[-1][0]
            with self._cond:
                while self._queue and self._queue[0][0] <= last_sent:
                    self._queue.popleft()
                self._warned_full = False

    def _post(self, reports: list[bytes], timeout: float) -> tuple[str, str]:
        """(outcome, what happened, for the log) of one POST of ``reports``."""
        request = urllib.request.Request(self.url, data=encode_batch(reports), headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as response:
                answer = json.loads(response.read(_ERROR_BODY_BYTES))
            if not (isinstance(answer, dict) and answer.get("recorded") == len(reports)):
                raise ValueError(answer)
        except urllib.error.HTTPError as exc:
            try:
                detail = f"HTTP {exc.code}: {_error_message(exc)}"
            finally:
                exc.close()
            if exc.code == 413:
                return (_SPLIT if len(reports) > 1 else _DROP), detail
            return (_DROP if exc.code == 400 else _RETRY), detail
        except urllib.error.URLError as exc:  # could not connect, TLS refused, ...
            return _RETRY, str(exc.reason)
        except (OSError, http.client.HTTPException) as exc:  # the connection broke, timed out
            return _RETRY, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except ValueError:
            return _RETRY, f"{self.url} answered, but not as a cmdfed telemetry server"
        except Exception as exc:  # never let the sender thread die
            log.exception("unexpected error sending telemetry to %s", self.address)
            return _RETRY, f"{type(exc).__name__}: {exc}"
        return _SENT, ""

    def _pause(self, delay: float) -> None:
        """Wait before the next try: close() cuts a wait short once, then bounds the waits by its deadline."""
        if not self._close_requested.is_set():
            self._close_requested.wait(delay)
        else:
            time.sleep(min(delay, max(0.0, self._deadline - time.monotonic())))


def _client_context(ca: bytes) -> ssl.SSLContext:
    """Checks the server's certificate chain against ``ca`` and its name against the address."""
    try:
        context = ssl.create_default_context(cadata=ca.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise CmdfedError(
            f"the federation CA certificate is not usable ({exc}); give the ca.crt of the server's `cmdfed certs init`"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The server's {"error": ...} of an error answer, else its reason phrase."""
    try:
        return str(json.loads(exc.read(_ERROR_BODY_BYTES))["error"])
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return str(exc.reason)
