"""``TelemetryStore``: open, migrate, write and read the telemetry database."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

import cmdfed
from cmdfed.errors import CmdfedError
from cmdfed.redaction import file_name_only, redact_paths
from cmdfed.telemetry.schema import DATA_TABLES, SCHEMA_VERSION, T, current_version, upgrade

SITE_STATUSES = ("trained", "failed", "timed_out", "declined_budget")
RUN_STATUSES = ("running", "completed", "failed", "interrupted")

#: How long a writer waits for another writer's lock before giving up (SQLite busy timeout).
BUSY_TIMEOUT_S = 30.0
_SQLITE_HEADER = b"SQLite format 3\x00"
_FILLED_BY = (
    "the federation server (`cmdfed server ...`) and the edge commands (`cmdfed edge ...`) "
    "create and fill it when given this path"
)
# Any pg_advisory lock key works as long as every cmdfed uses the same one.
_PG_MIGRATION_LOCK = 0x636D64666564  # "cmdfed"
_MAX_ERROR_CHARS = 2000

Timestamp = float | int | datetime | None


class TelemetryStore:
    """One telemetry database: a SQLite file, or a PostgreSQL database given by URL.

    Open one store per process (after any fork) and share it between threads; every write
    is one short transaction. Use :meth:`open`, not the constructor.
    """

    def __init__(self, engine: sa.Engine, target: str, readonly: bool):
        self._engine = engine
        self.target = target  # the path or the URL without its password, for messages
        self.readonly = readonly
        self._is_sqlite = engine.dialect.name == "sqlite"
        self._batch = threading.local()  # this thread's open batch() transaction, if any

    # ---------------------------------------------------------------- opening and closing

    @classmethod
    def open(cls, url_or_path: str | os.PathLike, *, create: bool = False, readonly: bool = False) -> TelemetryStore:
        """Open the store at a filesystem path, a ``sqlite:///`` or a ``postgresql://`` URL.

        ``create=True`` creates a missing SQLite file (and its folder) or lays the schema into
        an empty PostgreSQL database; without it an absent store is an error. A store written by
        an older cmdfed is upgraded in place unless ``readonly``; one written by a newer cmdfed
        is refused.
        """
        if create and readonly:
            raise ValueError("create=True and readonly=True exclude each other")
        engine, target = _make_engine(url_or_path, create=create, readonly=readonly)
        store = cls(engine, target, readonly)
        try:
            store._check_and_upgrade(create)
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.readonly else "read-write"
        return f"TelemetryStore({self.target!r}, {mode})"

    @property
    def schema_version(self) -> int:
        with self._tx() as conn:
            return current_version(conn)

    def _check_and_upgrade(self, create: bool) -> None:
        with self._tx() as conn:
            version = current_version(conn)
            tables = set(sa.inspect(conn).get_table_names())
        self._refuse_newer(version)
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            # A SQLite file belongs to one program; a PostgreSQL database may be shared, so
            # there only a clash with our own table names means it is someone else's.
            clash = tables if self._is_sqlite else tables & set(DATA_TABLES)
            if clash:
                raise CmdfedError(
                    f"{self.target} is a database but not a cmdfed telemetry store (it has "
                    f"tables {', '.join(sorted(clash))} and no schema_version): give another path or database"
                )
            if self.readonly:
                raise CmdfedError(f"telemetry store {self.target} is empty: {_FILLED_BY}")
            if not create:
                raise CmdfedError(
                    f"telemetry store {self.target} is empty: {_FILLED_BY} "
                    "(from Python: TelemetryStore.open(..., create=True))"
                )
        elif self.readonly:
            raise CmdfedError(
                f"telemetry store {self.target} has schema version {version}, older than this "
                f"cmdfed's {SCHEMA_VERSION}; it cannot be upgraded read-only: run any cmdfed "
                "command that writes to it (server or edge) once with this cmdfed"
            )
        with self._tx(write=True, migrate=True) as conn:
            self._refuse_newer(upgrade(conn))  # a newer cmdfed may have won the race

    def _refuse_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise CmdfedError(
                f"telemetry store {self.target} has schema version {version}, newer than this "
                f"cmdfed {cmdfed.__version__} understands (up to {SCHEMA_VERSION}): "
                "upgrade cmdfed on this machine"
            )

    # ---------------------------------------------------------------- transactions

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Writes this thread makes inside go into one transaction: all are recorded, or none."""
        with self._tx(write=True) as conn:
            self._batch.conn = conn
            try:
                yield
            finally:
                self._batch.conn = None

    @contextlib.contextmanager
    def _tx(self, write: bool = False, migrate: bool = False) -> Iterator[sa.Connection]:
        """One transaction; SQLite takes the write lock at BEGIN when ``write``. Inside
        :meth:`batch`, the batch's transaction."""
        if write and self.readonly:
            raise CmdfedError(f"telemetry store {self.target} was opened read-only")
        batch_conn = getattr(self._batch, "conn", None)
        if batch_conn is not None:
            yield batch_conn
            return
        try:
            with self._engine.connect() as conn:
                conn.execution_options(cmdfed_write=write)
                with conn.begin():
                    if migrate and not self._is_sqlite:
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                    yield conn
        except sa.exc.IntegrityError:
            raise  # a value the caller got wrong (e.g. None where one is required): a bug
        except sa.exc.DBAPIError as e:  # unreachable, locked, corrupt, not allowed ...
            raise CmdfedError(f"telemetry store {self.target}: {_one_line(e.orig)}") from e

    def _upsert(self, table: str, values: dict, keys: tuple[str, ...], keep: tuple[str, ...] = ()):
        """Insert, or on a duplicate key overwrite all columns but ``keys`` and ``keep``."""
        tbl = T[table]
        insert = (sqlite_dialect if self._is_sqlite else pg_dialect).insert(tbl).values(**values)
        update = {c: insert.excluded[c] for c in values if c not in keys and c not in keep}
        stmt = insert.on_conflict_do_update(index_elements=list(keys), set_=update)
        with self._tx(write=True) as conn:
            conn.execute(stmt)

    def _insert(self, table: str, values: dict) -> None:
        with self._tx(write=True) as conn:
            conn.execute(T[table].insert().values(**values))

    def _select(self, stmt) -> list[dict]:
        with self._tx() as conn:
            rows = conn.execute(stmt).mappings().all()
        return [_decode(dict(r)) for r in rows]

    # ---------------------------------------------------------------- federated training

    def start_run(
        self,
        run_id: str,
        *,
        name: str,
        config: Mapping[str, Any],
        strategy: str,
        phases: list[str],
        started_at: Timestamp = None,
    ) -> None:
        """Record a run as running. Calling it again (a resumed run) keeps the first start time."""
        self._upsert(
            "runs",
            {
                "run_id": run_id,
                "name": name,
                "config": _json(config),
                "strategy": strategy,
                "phases": _json(list(phases)),
                "status": "running",
                "started_at": _ts(started_at),
                "finished_at": None,
            },
            keys=("run_id",),
            keep=("started_at",),
        )

    def finish_run(self, run_id: str, *, status: str, finished_at: Timestamp = None) -> None:
        _check_choice("run status", status, RUN_STATUSES)
        runs = T["runs"]
        stmt = runs.update().where(runs.c.run_id == run_id).values(status=status, finished_at=_ts(finished_at))
        with self._tx(write=True) as conn:
            if conn.execute(stmt).rowcount == 0:
                raise CmdfedError(f"telemetry store {self.target} has no run {run_id!r} to finish")

    def record_round(
        self,
        run_id: str,
        *,
        phase: str,
        round: int,
        started_at: Timestamp,
        finished_at: Timestamp,
        n_sites: int,
        n_failed: int,
        bytes_sent: int,
        bytes_received: int,
        metrics: Mapping[str, Any],
    ) -> None:
        """Aggregated result of one round; recording the same (run, phase, round) again replaces it."""
        self._upsert(
            "rounds",
            {
                "run_id": run_id,
                "phase": phase,
                "round": int(round),
                "started_at": _ts(started_at),
                "finished_at": _ts(finished_at),
                "n_sites": int(n_sites),
                "n_failed": int(n_failed),
                "bytes_sent": int(bytes_sent),
                "bytes_received": int(bytes_received),
                "metrics": _json(metrics),
            },
            keys=("run_id", "phase", "round"),
        )

    def record_site_round(
        self,
        run_id: str,
        *,
        phase: str,
        round: int,
        site: str,
        status: str,
        n_examples: int,
        metrics: Mapping[str, Any],
        duration_s: float | None,
        error: str | None = None,
    ) -> None:
        """One site's part in one round; unique per (run, phase, round, site)."""
        _check_choice("site status", status, SITE_STATUSES)
        self._upsert(
            "site_rounds",
            {
                "run_id": run_id,
                "phase": phase,
                "round": int(round),
                "site": site,
                "status": status,
                "n_examples": int(n_examples),
                "metrics": _json(metrics),
                "duration_s": _float(duration_s),
                "error": scrub_paths(error),
                "at": time.time(),
            },
            keys=("run_id", "phase", "round", "site"),
        )

    def record_privacy(
        self,
        run_id: str,
        *,
        phase: str,
        round: int,
        site: str,
        epsilon: float,
        delta: float,
        noise_multiplier: float,
        max_grad_norm: float,
        budget_epsilon: float | None,
    ) -> None:
        """A site's cumulative privacy spend after a round; unique per (run, phase, round, site)."""
        self._upsert(
            "privacy",
            {
                "run_id": run_id,
                "phase": phase,
                "round": int(round),
                "site": site,
                "epsilon": float(epsilon),
                "delta": float(delta),
                "noise_multiplier": float(noise_multiplier),
                "max_grad_norm": float(max_grad_norm),
                "budget_epsilon": _float(budget_epsilon),
                "at": time.time(),
            },
            keys=("run_id", "phase", "round", "site"),
        )

    def record_model_version(
        self,
        version: str,
        *,
        run_id: str | None,
        round: int | None,
        metrics: Mapping[str, Any],
        checkpoint_sha256: str,
    ) -> None:
        self._upsert(
            "model_versions",
            {
                "version": version,
                "run_id": run_id,
                "round": None if round is None else int(round),
                "metrics": _json(metrics),
                "checkpoint_sha256": checkpoint_sha256,
                "at": time.time(),
            },
            keys=("version",),
            keep=("at",),
        )

    # ---------------------------------------------------------------- edge

    def record_bundle(self, version: str, *, sha256: str, signed: bool, path: str) -> None:
        """An exported bundle, keyed by its sha256: recording the same bytes again updates the row."""
        self._upsert(
            "bundles",
            {
                "version": version,
                "sha256": sha256,
                "signed": bool(signed),
                "path": str(path),
                "at": time.time(),
            },
            keys=("sha256",),
            keep=("at",),
        )

    def record_deployment(self, workstation: str, *, version: str, backend: str, gpu: str | None, status: str) -> None:
        self._insert(
            "deployments",
            {
                "workstation": workstation,
                "version": version,
                "backend": backend,
                "gpu": gpu,
                "status": status,
                "at": time.time(),
            },
        )

    def heartbeat(
        self,
        workstation: str,
        *,
        backend: str,
        gpu: str | None,
        model_version: str | None,
        tiles_per_s: float | None,
        p50_ms: float | None,
        p95_ms: float | None,
        errors: Mapping[str, int] | None = None,
        at: Timestamp = None,
    ) -> None:
        """``at``: when the workstation took it (a report relayed later keeps its time); default now."""
        self._insert(
            "heartbeats",
            {
                "workstation": workstation,
                "backend": backend,
                "gpu": gpu,
                "model_version": model_version,
                "tiles_per_s": _float(tiles_per_s),
                "p50_ms": _float(p50_ms),
                "p95_ms": _float(p95_ms),
                "errors": _json(errors or {}),
                "at": _ts(at),
            },
        )

    def record_inference(
        self,
        workstation: str,
        *,
        model_version: str | None,
        slide_name: str,
        n_cells: int | None,
        counts_by_type: Mapping[str, int],
        area_mm2: float | None,
        duration_s: float | None,
        backend: str | None,
        error: str | None = None,
        at: Timestamp = None,
    ) -> None:
        """One slide's inference (``at``: when it ended; default now). Only the slide's file name
        is kept, never its folder: a path given here is cut to its last part, and paths inside
        ``error`` likewise."""
        self._insert(
            "inference_events",
            {
                "workstation": workstation,
                "model_version": model_version,
                "slide_name": file_name_only(str(slide_name)),
                "n_cells": None if n_cells is None else int(n_cells),
                "counts_by_type": _json(counts_by_type),
                "area_mm2": _float(area_mm2),
                "duration_s": _float(duration_s),
                "backend": backend,
                "error": scrub_paths(error),
                "at": _ts(at),
            },
        )

    # ---------------------------------------------------------------- readers

    def runs(self) -> list[dict]:
        runs = T["runs"]
        return self._select(sa.select(runs).order_by(runs.c.started_at, runs.c.run_id))

    def rounds(self, run_id: str) -> list[dict]:
        t = T["rounds"]
        return self._select(sa.select(t).where(t.c.run_id == run_id).order_by(t.c.id))

    def site_rounds(self, run_id: str) -> list[dict]:
        t = T["site_rounds"]
        return self._select(sa.select(t).where(t.c.run_id == run_id).order_by(t.c.id))

    def privacy(self, run_id: str) -> list[dict]:
        t = T["privacy"]
        return self._select(sa.select(t).where(t.c.run_id == run_id).order_by(t.c.id))

    def model_versions(self) -> list[dict]:
        t = T["model_versions"]
        return self._select(sa.select(t).order_by(t.c.at, t.c.version))

    def bundles(self) -> list[dict]:
        t = T["bundles"]
        return self._select(sa.select(t).order_by(t.c.id))

    def deployments(self) -> list[dict]:
        t = T["deployments"]
        return self._select(sa.select(t).order_by(t.c.id))

    def heartbeats(
        self,
        latest_only: bool = True,
        *,
        workstation: str | None = None,
        since: Timestamp = None,
    ) -> list[dict]:
        """The newest heartbeat of each workstation, or all of them oldest first.

        ``workstation`` and ``since`` (a time) narrow either form; with ``latest_only`` a
        workstation silent since then is left out.
        """
        t = T["heartbeats"]
        stmt = sa.select(t)
        if workstation is not None:
            stmt = stmt.where(t.c.workstation == workstation)
        if since is not None:
            stmt = stmt.where(t.c.at >= _ts(since))
        if latest_only:
            newest = sa.select(sa.func.max(t.c.id)).group_by(t.c.workstation)
            stmt = stmt.where(t.c.id.in_(newest)).order_by(t.c.workstation)
        else:
            stmt = stmt.order_by(t.c.id)
        return self._select(stmt)

    def inference_events(self, limit: int | None = 100, *, workstation: str | None = None):
        """The newest inference events first."""
        t = T["inference_events"]
        stmt = sa.select(t).order_by(t.c.id.desc())
        if workstation is not None:
            stmt = stmt.where(t.c.workstation == workstation)
        if limit is not None:
            stmt = stmt.limit(int(limit))
        return self._select(stmt)


# -------------------------------------------------------------------- engines


def _make_engine(url_or_path, *, create: bool, readonly: bool) -> tuple[sa.Engine, str]:
    text = os.fspath(url_or_path)
    if "://" not in text:
        return _sqlite_engine(Path(text), create=create, readonly=readonly)
    try:
        url = sa.engine.make_url(text)
    except sa.exc.ArgumentError as e:
        raise CmdfedError(f"cannot parse telemetry store URL {text!r}: {e}") from e
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise CmdfedError(f"telemetry store URL {text!r} names no file: use sqlite:///PATH")
        return _sqlite_engine(Path(url.database), create=create, readonly=readonly)
    if backend in ("postgresql", "postgres"):
        return _postgres_engine(url, readonly=readonly)
    raise CmdfedError(
        f"telemetry store URL {url.render_as_string(hide_password=True)!r}: unsupported database "
        f"{backend!r}; use a file path, sqlite:///PATH or postgresql+psycopg://..."
    )


def _sqlite_engine(path: Path, *, create: bool, readonly: bool) -> tuple[sa.Engine, str]:
    path = path.expanduser().absolute()
    target = str(path)
    if path.is_dir():
        raise CmdfedError(f"telemetry store {target} is a folder, not a file")
    if not path.exists():
        if readonly:
            raise CmdfedError(f"no telemetry store at {target}: {_FILLED_BY}")
        if not create:
            raise CmdfedError(
                f"no telemetry store at {target}: check the path, or create one there "
                "(TelemetryStore.open(..., create=True))"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(len(_SQLITE_HEADER))
        except OSError as e:
            raise CmdfedError(f"cannot read telemetry store {target}: {e.strerror}") from e
        if head and head != _SQLITE_HEADER:
            raise CmdfedError(
                f"{target} is not an SQLite database, so not a telemetry store: "
                "give the path of a telemetry .db file (or a new path to start one)"
            )

    if readonly:

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(
                f"file:{quote(target)}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                check_same_thread=False,
            )
    else:

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(target, timeout=BUSY_TIMEOUT_S, check_same_thread=False)

    engine = sa.create_engine("sqlite+pysqlite://", creator=connect, poolclass=sa.pool.QueuePool)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy, not the sqlite3 module, say when a transaction begins (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if readonly:
            cur.execute("PRAGMA query_only = ON")
        else:
            # Persistent in the file: readers never block the writer nor the writer readers.
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A writer takes the write lock up front, so it waits (busy timeout) rather than fail
        # when upgrading a read lock; readers begin deferred and never block anyone.
        write = conn.get_execution_options().get("cmdfed_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine, target


def _postgres_engine(url: sa.URL, *, readonly: bool) -> tuple[sa.Engine, str]:
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3, not SQLAlchemy's psycopg2
    target = url.render_as_string(hide_password=True)
    try:
        connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": 10}
        engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except (ImportError, sa.exc.ArgumentError) as e:
        raise CmdfedError(f"cannot use telemetry store {target}: {e} (pip install 'cmdfed[postgres]')") from e

    if readonly:

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            with dbapi_conn.cursor() as cur:
                cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            dbapi_conn.commit()

    return engine, target


# -------------------------------------------------------------------- values


_JSON_COLUMNS = ("config", "phases", "metrics", "errors", "counts_by_type")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any):
    # numpy scalars and arrays, torch tensors: what metrics code tends to hand over
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in telemetry JSON: {value!r}")


def _decode(row: dict) -> dict:
    for key in _JSON_COLUMNS:
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    return row


def _ts(value: Timestamp) -> float:
    """Seconds since the epoch (UTC); ``None`` is now."""
    if value is None:
        return time.time()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give a timezone-aware one or epoch seconds")
        return value.timestamp()
    return float(value)


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(choices)}")


def scrub_paths(error: str | None) -> str | None:
    """Error text without folders (``cmdfed.redaction``), cut to the column's length."""
    if error is None:
        return None
    return redact_paths(str(error))[:_MAX_ERROR_CHARS]


def _one_line(error: BaseException | None) -> str:
    return " ".join(str(error).split())


__all__ = ["BUSY_TIMEOUT_S", "RUN_STATUSES", "SITE_STATUSES", "TelemetryStore", "scrub_paths"]
