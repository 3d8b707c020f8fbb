"""Where a workstation's heartbeats and slide summaries go.

``--telemetry STORE``: :class:`StoreReports` writes each one into a telemetry store this
machine opens itself, as it happens, under this machine's host name.

``--report-to ADDR --report-token FILE [--report-ca CA]``: ``RemoteReporter``
(``cmdfed.telemetry.remote.reporter``) queues them for the federation's telemetry server
(HTTPS + JSON, checked against the federation CA), which records them under the name the token
was issued for; nothing waits on the network, and reports made while the server is down are
kept (up to a bound) and sent later.

Both take the keyword arguments of ``TelemetryStore.heartbeat`` and ``record_inference``,
less the workstation.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Protocol

from cmdfed.errors import CmdfedError
from cmdfed.telemetry import TelemetryStore


class Reports(Protocol):
    def heartbeat(self, **fields) -> None: ...

    def record_inference(self, **fields) -> None: ...

    def close(self) -> None: ...


class StoreReports:
    """Each report one short transaction in a store this machine opens (SQLite file or PostgreSQL URL)."""

    def __init__(self, target: str | os.PathLike):
        self.target = str(target)

    def heartbeat(self, **fields) -> None:
        with TelemetryStore.open(self.target, create=True) as store:
            store.heartbeat(socket.gethostname(), **fields)

    def record_inference(self, **fields) -> None:
        with TelemetryStore.open(self.target, create=True) as store:
            store.record_inference(socket.gethostname(), **fields)

    def close(self) -> None:
        """Nothing to flush: the store is opened per report."""


def reports_to(telemetry: str | os.PathLike | Reports | None) -> Reports | None:
    """A store path or URL becomes :class:`StoreReports`; a ``Reports`` object is used as it is."""
    if telemetry is None or isinstance(telemetry, (str, os.PathLike)):
        return StoreReports(telemetry) if telemetry else None
    return telemetry


def open_reports(
    telemetry: str | None,
    report_to: str | None,
    report_token: Path | None,
    report_ca: Path | None,
    report_insecure: bool,
) -> Reports | None:
    """The reports `cmdfed edge serve` options ask for: a local store, the telemetry server, or none."""
    if report_to is None:
        if report_token is not None or report_ca is not None or report_insecure:
            raise CmdfedError(
                "--report-token, --report-ca and --report-insecure go with --report-to ADDR; add it or drop them"
            )
        return reports_to(telemetry)
    if telemetry is not None:
        raise CmdfedError(
            "give --telemetry (a store this machine writes) or --report-to (the federation's telemetry server), not "
            "both"
        )
    if report_token is None:
        raise CmdfedError(
            "--report-to needs --report-token FILE: the token the federation operator issued for this workstation "
            "(`cmdfed server telemetry add-workstation NAME --token-out FILE`)"
        )
    from cmdfed.telemetry.remote.reporter import RemoteReporter

    return RemoteReporter.from_files(report_to, report_token, report_ca, insecure=report_insecure)
