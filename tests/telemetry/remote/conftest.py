"""A real telemetry ingest server on 127.0.0.1 over a fresh SQLite store, with one workstation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from cmdfed.telemetry import TelemetryStore
from cmdfed.telemetry.remote.ingest import IngestServer
from cmdfed.telemetry.remote.tokens import WorkstationTokens


@dataclass
class Ingest:
    server: IngestServer
    db: Path
    tokens: WorkstationTokens
    token: str  # the token of workstation "scanner-1"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def heartbeats(self) -> list[dict]:
        with TelemetryStore.open(self.db, readonly=True) as store:
            return store.heartbeats(latest_only=False)

    def inference_events(self) -> list[dict]:
        with TelemetryStore.open(self.db, readonly=True) as store:
            return store.inference_events()


@pytest.fixture
def ingest(tmp_path):
    tokens = WorkstationTokens(tmp_path / "workstations.json")
    token = tokens.add("scanner-1")
    server = IngestServer(tmp_path / "telemetry.db", tokens.path, port=0).start()
    yield Ingest(server, tmp_path / "telemetry.db", tokens, token)
    server.stop(grace=1)
