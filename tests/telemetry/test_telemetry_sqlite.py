"""What only the SQLite file has: files, WAL, and several processes on one file."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from cmdfed.errors import CmdfedError
from cmdfed.telemetry import TelemetryStore

# Spawned, not forked: each process starts with nothing of the parent's SQLite state, like
# the server, a client and the dashboard would.
SPAWN = mp.get_context("spawn")


def _heartbeat(store: TelemetryStore, workstation: str, i: int) -> None:
    store.heartbeat(
        workstation,
        backend="onnxruntime",
        gpu=None,
        model_version="v1",
        tiles_per_s=float(i),
        p50_ms=1.0,
        p95_ms=2.0,
    )


def _writer(path: str, name: str, n: int, go) -> None:
    go.wait(60)
    with TelemetryStore.open(path, create=True) as store:
        for i in range(n):
            _heartbeat(store, name, i)
            # every writer also replays the same rounds: upserts racing on one key
            store.record_site_round(
                "run",
                phase="finetune",
                round=i % 10,
                site="site-a",
                status="trained",
                n_examples=i,
                metrics={},
                duration_s=0.1,
            )
            store.record_round(
                "run",
                phase="finetune",
                round=i % 10,
                started_at=0,
                finished_at=1,
                n_sites=1,
                n_failed=0,
                bytes_sent=i,
                bytes_received=0,
                metrics={},
            )


def _reader(path: str, go, out) -> None:
    """Poll while writers write; report the counts seen (they must never go down) or the error."""
    go.wait(60)
    seen = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with TelemetryStore.open(path, readonly=True) as store:
                    while time.monotonic() < deadline:
                        seen.append(len(store.heartbeats(latest_only=False)))
                        if seen[-1] >= 3 * 150:
                            break
                        time.sleep(0.01)
                break
            except CmdfedError as e:  # the first writer may not have laid the schema yet
                if "is empty" not in str(e) and "no telemetry store" not in str(e):
                    raise
                time.sleep(0.02)
        out.put(("ok", seen))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(e)))


@pytest.mark.timeout(180)
def test_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.db")
    go, out = SPAWN.Event(), SPAWN.Queue()
    writers = [SPAWN.Process(target=_writer, args=(path, f"ws-{k}", 150, go)) for k in range(3)]
    reader = SPAWN.Process(target=_reader, args=(path, go, out))
    for p in [*writers, reader]:
        p.start()
    go.set()  # all four start on the (not yet existing) file together
    for p in writers:
        p.join(150)
        assert p.exitcode == 0, f"writer exit code {p.exitcode}"
    status, seen = out.get(timeout=90)
    reader.join(30)
    assert status == "ok", seen
    assert seen == sorted(seen) and seen[-1] == 450

    with TelemetryStore.open(path, readonly=True) as store:
        beats = store.heartbeats(latest_only=False)
        assert len(beats) == 450
        for k in range(3):
            mine = [b["tiles_per_s"] for b in beats if b["workstation"] == f"ws-{k}"]
            assert mine == [float(i) for i in range(150)]
        assert sorted(r["round"] for r in store.site_rounds("run")) == list(range(10))
        assert sorted(r["round"] for r in store.rounds("run")) == list(range(10))
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()


def _read_runs(path: str, out) -> None:
    try:
        with TelemetryStore.open(path, readonly=True) as store:
            out.put([r["run_id"] for r in store.runs()])
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.put(repr(e))


def _runs_in_other_process(path: Path) -> list[str] | str:
    out = SPAWN.Queue()
    p = SPAWN.Process(target=_read_runs, args=(str(path), out))
    p.start()
    try:
        return out.get(timeout=60)
    finally:
        p.join(30)


@pytest.mark.timeout(120)
def test_reader_in_another_process_sees_committed_rows_only(tmp_path):
    path = tmp_path / "t.db"
    with TelemetryStore.open(path, create=True) as store:
        store.start_run("committed", name="a", config={}, strategy="fedavg", phases=[])
        # a writer in the middle of a transaction neither blocks the reader nor shows it its rows
        held = sqlite3.connect(path, isolation_level=None)
        held.execute("BEGIN IMMEDIATE")
        held.execute(
            "INSERT INTO runs (run_id, name, config, strategy, phases, status, "
            "started_at) VALUES ('pending', 'b', '{}', 'x', '[]', 'running', 0)"
        )
        assert _runs_in_other_process(path) == ["committed"]
        held.execute("COMMIT")
        held.close()
        assert sorted(_runs_in_other_process(path)) == ["committed", "pending"]


def test_wal_mode_and_a_busy_writer_waits(tmp_path):
    path = tmp_path / "t.db"
    with TelemetryStore.open(path, create=True) as store:
        raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        # Another writer holds the lock for a moment: our write waits for it, not fails.
        raw.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(1.0, raw.execute, args=("COMMIT",))
        timer.start()
        started = time.monotonic()
        _heartbeat(store, "ws-1", 0)
        waited = time.monotonic() - started
        timer.join()
        raw.close()
        assert waited >= 0.5
        assert len(store.heartbeats()) == 1


def test_path_and_url_forms_open_the_same_file(tmp_path):
    path = tmp_path / "sub" / "t.db"
    with TelemetryStore.open(path, create=True) as store:  # creates the folder too
        _heartbeat(store, "ws-1", 0)
    for form in (str(path), f"sqlite:///{path}", f"sqlite+pysqlite:///{path}"):
        with TelemetryStore.open(form, readonly=True) as store:
            assert store.target == str(path)
            assert len(store.heartbeats()) == 1


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "telemetry.db"
    with pytest.raises(CmdfedError) as err:
        TelemetryStore.open(path, readonly=True)
    assert str(path) in str(err.value) and "cmdfed server" in str(err.value)
    with pytest.raises(CmdfedError, match="create=True"):
        TelemetryStore.open(path)
    assert not path.exists() and not path.parent.exists()
    with pytest.raises(ValueError):
        TelemetryStore.open(path, create=True, readonly=True)


@pytest.mark.parametrize("content", [os.urandom(4096), b"not a db", b"SQLite format 3\x00" + b"\xff" * 200])
def test_garbage_file_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "telemetry.db"
    path.write_bytes(content)
    for kwargs in ({}, {"create": True}, {"readonly": True}):
        with pytest.raises(CmdfedError) as err:
            TelemetryStore.open(path, **kwargs)
        assert str(path) in str(err.value)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["telemetry.db"]


def test_folder_and_other_urls_are_refused(tmp_path):
    with pytest.raises(CmdfedError, match="folder"):
        TelemetryStore.open(tmp_path, create=True)
    with pytest.raises(CmdfedError, match="unsupported database") as err:
        TelemetryStore.open("mysql://u:secret@host/db")
    assert "secret" not in str(err.value)
    with pytest.raises(CmdfedError, match="names no file"):
        TelemetryStore.open("sqlite://", create=True)
