"""Tables of the telemetry store and the ordered migration steps that build them.

See the package docstring (:mod:`cmdfed.telemetry`) for what each table holds and the
migration policy. In short: ``MIGRATIONS`` is append-only; a released step is never edited;
``SCHEMA_VERSION`` is the last step's number.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import BigInteger, Boolean, Column, Double, Integer, Text


def _v1_tables(md: sa.MetaData) -> None:
    """The schema as shipped in version 1. Frozen: later steps change it with their own DDL."""
    sa.Table(
        "schema_version",
        md,
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("description", Text, nullable=False),
        Column("applied_at", Double, nullable=False),
    )
    sa.Table(
        "runs",
        md,
        Column("run_id", Text, primary_key=True),
        Column("name", Text, nullable=False),
        Column("config", Text, nullable=False),  # JSON object
        Column("strategy", Text, nullable=False),
        Column("phases", Text, nullable=False),  # JSON list of phase names
        Column("status", Text, nullable=False),
        Column("started_at", Double, nullable=False),
        Column("finished_at", Double),
    )
    sa.Table(
        "rounds",
        md,
        Column("id", Integer, primary_key=True),
        Column("run_id", Text, nullable=False),
        Column("phase", Text, nullable=False),
        Column("round", Integer, nullable=False),
        Column("started_at", Double, nullable=False),
        Column("finished_at", Double, nullable=False),
        Column("n_sites", Integer, nullable=False),
        Column("n_failed", Integer, nullable=False),
        Column("bytes_sent", BigInteger, nullable=False),
        Column("bytes_received", BigInteger, nullable=False),
        Column("metrics", Text, nullable=False),  # JSON object
        sa.UniqueConstraint("run_id", "phase", "round", name="uq_rounds"),
    )
    sa.Table(
        "site_rounds",
        md,
        Column("id", Integer, primary_key=True),
        Column("run_id", Text, nullable=False),
        Column("phase", Text, nullable=False),
        Column("round", Integer, nullable=False),
        Column("site", Text, nullable=False),
        Column("status", Text, nullable=False),
        Column("n_examples", Integer, nullable=False),
        Column("metrics", Text, nullable=False),  # JSON object
        Column("duration_s", Double),
        Column("error", Text),
        Column("at", Double, nullable=False),
        sa.UniqueConstraint("run_id", "phase", "round", "site", name="uq_site_rounds"),
    )
    sa.Table(
        "privacy",
        md,
        Column("id", Integer, primary_key=True),
        Column("run_id", Text, nullable=False),
        Column("phase", Text, nullable=False),
        Column("round", Integer, nullable=False),
        Column("site", Text, nullable=False),
        Column("epsilon", Double, nullable=False),
        Column("delta", Double, nullable=False),
        Column("noise_multiplier", Double, nullable=False),
        Column("max_grad_norm", Double, nullable=False),
        Column("budget_epsilon", Double),
        Column("at", Double, nullable=False),
        sa.UniqueConstraint("run_id", "phase", "round", "site", name="uq_privacy"),
    )
    sa.Table(
        "model_versions",
        md,
        Column("version", Text, primary_key=True),
        Column("run_id", Text),
        Column("round", Integer),
        Column("metrics", Text, nullable=False),  # JSON object
        Column("checkpoint_sha256", Text, nullable=False),
        Column("at", Double, nullable=False),
    )
    sa.Table(
        "bundles",
        md,
        Column("id", Integer, primary_key=True),
        Column("version", Text, nullable=False),
        Column("sha256", Text, nullable=False, unique=True),
        Column("signed", Boolean, nullable=False),
        Column("path", Text, nullable=False),
        Column("at", Double, nullable=False),
    )
    sa.Table(
        "deployments",
        md,
        Column("id", Integer, primary_key=True),
        Column("workstation", Text, nullable=False),
        Column("version", Text, nullable=False),
        Column("backend", Text, nullable=False),
        Column("gpu", Text),
        Column("status", Text, nullable=False),
        Column("at", Double, nullable=False),
    )
    sa.Table(
        "heartbeats",
        md,
        Column("id", Integer, primary_key=True),
        Column("workstation", Text, nullable=False),
        Column("backend", Text, nullable=False),
        Column("gpu", Text),
        Column("model_version", Text),
        Column("tiles_per_s", Double),
        Column("p50_ms", Double),
        Column("p95_ms", Double),
        Column("errors", Text, nullable=False),  # JSON object: error kind -> count
        Column("at", Double, nullable=False),
    )
    sa.Table(
        "inference_events",
        md,
        Column("id", Integer, primary_key=True),
        Column("workstation", Text, nullable=False),
        Column("model_version", Text),
        Column("slide_name", Text, nullable=False),
        Column("n_cells", BigInteger),
        Column("counts_by_type", Text, nullable=False),  # JSON object: cell type -> count
        Column("area_mm2", Double),
        Column("duration_s", Double),
        Column("backend", Text),
        Column("error", Text),
        Column("at", Double, nullable=False),
    )


def _step1_initial(conn: sa.Connection) -> None:
    md = sa.MetaData()
    _v1_tables(md)
    md.create_all(conn)


# Heartbeats arrive every few seconds from every workstation and inference events once per
# slide: without these the dashboard's "latest per workstation" and "newest N" queries scan
# whole tables that only grow.
_V2_INDEXES = (
    "CREATE INDEX ix_heartbeats_workstation ON heartbeats (workstation, id)",
    "CREATE INDEX ix_heartbeats_at ON heartbeats (at)",
    "CREATE INDEX ix_inference_events_at ON inference_events (at)",
)


def _step2_dashboard_indexes(conn: sa.Connection) -> None:
    for ddl in _V2_INDEXES:
        conn.exec_driver_sql(ddl)


Step = Callable[[sa.Connection], None]

#: (version, description, step) in order. Append only; never edit or reorder a released step.
MIGRATIONS: list[tuple[int, str, Step]] = [
    (1, "initial schema", _step1_initial),
    (2, "indexes for the dashboard's heartbeat and inference queries", _step2_dashboard_indexes),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# The tables as the current code reads and writes them. A step that adds a column must also
# add it here (``table.append_column``), never by editing ``_v1_tables``.
metadata = sa.MetaData()
_v1_tables(metadata)
T = metadata.tables
DATA_TABLES = tuple(name for name in T if name != "schema_version")


def current_version(conn: sa.Connection) -> int:
    """The highest applied step, 0 for a database without a ``schema_version`` table."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return conn.execute(sa.select(sa.func.max(T["schema_version"].c.version))).scalar() or 0


def upgrade(conn: sa.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply the steps after the current version up to ``target``; returns the new version.

    Runs inside the caller's transaction, which must hold the store's write lock so that two
    processes opening the same store at once do not both migrate it.
    """
    version = current_version(conn)
    for number, description, step in MIGRATIONS:
        if version < number <= target:
            step(conn)
            conn.execute(
                T["schema_version"].insert(),
                {"version": number, "description": description, "applied_at": time.time()},
            )
            version = number
    return version
