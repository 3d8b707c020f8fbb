"""The wire protocol between the telemetry server and its workstations: HTTPS + JSON.

    POST /v1/reports   Authorization: Bearer <token>   Content-Type: application/json
        {"schema": 1, "reports": [
            {"kind": "heartbeat", "at": 1700000000.0, "backend": "tensorrt", "gpu": "L4", ...},
            {"kind": "inference", "at": 1700000060.5, "slide_name": "case-1.svs", "n_cells": 4211, ...}]}
        200  {"recorded": 2, "workstation": "scanner-3"}   all recorded, under the token's name
        401  missing or unknown token: nothing recorded (the workstation keeps its reports)
        400  not JSON, an unknown "schema", or an invalid report: none recorded (resending cannot help)
        413  body above MAX_BODY_BYTES: none recorded
        503  the store cannot write now, or the tokens file is unreadable: send again later
        errors answer {"error": "<what is wrong and what to do>"}
    GET /healthz       200 {"status": "serving", "schema": 1}, no token needed

A report is ``kind``, ``at`` (when it happened on the workstation, seconds since the epoch)
and the fields of FIELDS[kind]; a field left out is None, a field this side does not know is
ignored (a newer workstation may send more), and a change an older server must not ignore
bumps ``schema``. The workstation a report is recorded under is always the name its token
was issued for; a name inside a report is never read.

Why HTTPS and JSON rather than gRPC: the documents are small (a heartbeat a minute, a summary
a slide), so a binary encoding buys nothing; ``cmdfed/`` stays free of gRPC, because server and
edge share this code and the core holds only uvicorn/Starlette (the server, ``ingest``), the
standard library's ``urllib`` and ``ssl`` here; and a hospital network passes HTTPS to one port through its
firewalls and outbound proxies (``https_proxy`` / ``no_proxy`` are honoured) where HTTP/2
gRPC often needs exceptions. TLS uses the federation CA of ``cmdfed certs init``; plaintext,
which would carry the tokens in the clear, is for loopback or an explicit ``--insecure``.
"""

from __future__ import annotations

import json
import logging
import math

from cmdfed.addresses import LOOPBACK
from cmdfed.errors import CmdfedError

log = logging.getLogger("cmdfed.telemetry")

SCHEMA = 1
REPORTS_PATH = "/v1/reports"
HEALTH_PATH = "/healthz"
MAX_BODY_BYTES = 1 << 20  # a full batch of BATCH reports is well under this (an error text is cut at 2000 chars)
MAX_REPORTS = 1000  # per request; a workstation sends at most reporter.BATCH at once
MAX_REPORT_BYTES = 64 << 10  # one report; a workstation drops (with an error) a larger one rather than queue it

# The fields of each kind of report, as in TelemetryStore.heartbeat / record_inference:
# "text" is required and not empty; "optional ..." may be left out or null; "counts" is
# {name: integer}, left out meaning {}.
FIELDS: dict[str, dict[str, str]] = {
    "heartbeat": {
        "backend": "text",
        "gpu": "optional text",
        "model_version": "optional text",
        "tiles_per_s": "optional number",
        "p50_ms": "optional number",
        "p95_ms": "optional number",
        "errors": "counts",  # failed calls by reason since the service started
    },
    "inference": {
        "slide_name": "text",  # the file name only: both sides cut any folders off
        "model_version": "optional text",
        "n_cells": "optional integer",
        "counts_by_type": "counts",
        "area_mm2": "optional number",
        "duration_s": "optional number",
        "backend": "optional text",
        "error": "optional text",
    },
}


def encode_report(kind: str, at: float, fields: dict) -> bytes:
    """One report as compact JSON; a field the protocol lacks is a TypeError, as for a function."""
    spec = FIELDS[kind]
    unknown = sorted(set(fields) - set(spec))
    if unknown:
        raise TypeError(f"a {kind} report has no field {', '.join(unknown)}")
    report = {"kind": kind, "at": at}
    for name, value in fields.items():
        value = _plain(value)
        if value is not None:
            report[name] = value
    return json.dumps(report, separators=(",", ":"), allow_nan=False).encode()


def encode_batch(reports: list[bytes]) -> bytes:
    return b'{"schema":%d,"reports":[' % SCHEMA + b",".join(reports) + b"]}"


def _plain(value):
    """JSON's own types: numpy scalars become Python numbers, NaN and infinities None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if not isinstance(value, (str, int, float)) and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def bearer_header(token: str) -> str:
    return f"Bearer {token}"


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def check_token(token: str) -> str:
    if not token or not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
        raise CmdfedError(
            "a telemetry token is one word of printable ASCII; ask the federation operator for this workstation's"
        )
    return token


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def require_tls_off_loopback(host: str, *, tls: bool, insecure: bool, what: str, insecure_flag: str) -> None:
    """Plaintext carries the workstation tokens, so it is for loopback, or an explicit ``insecure_flag``."""
    if tls or host in LOOPBACK:
        return
    if not insecure:
        raise CmdfedError(
            f"{what} {host} is not this machine and TLS is not configured, so workstation tokens would travel "
            f"unencrypted; configure TLS (`cmdfed certs init`), use 127.0.0.1, or pass {insecure_flag} on a network "
            "you trust"
        )
    log.warning(
        "%s %s without TLS: workstation tokens and telemetry travel unencrypted (%s)", what, host, insecure_flag
    )
