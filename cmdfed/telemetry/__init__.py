"""The telemetry store: one database that every role writes and the dashboard reads.

Open it with ``TelemetryStore.open(path_or_url, create=..., readonly=...)``: a filesystem path
or ``sqlite:///PATH`` gives a SQLite file (the default, one machine), a
``postgresql+psycopg://user:pass@host/db`` URL the same schema on PostgreSQL (several machines).
Writers are keyword-argument methods, each one short transaction; readers return plain lists
of dicts, JSON columns already decoded.

Tables
------
==================  ==========================================================================
runs                one row per federated run: name, config (JSON), strategy, phases (JSON
                    list), status (running/completed/failed/interrupted), start and end time
rounds              a run's aggregated result per (run_id, phase, round): timing, sites taking
                    part and failing, bytes each way, global metrics (JSON: loss, Dice, AJI, PQ)
site_rounds         each site's part in a round, unique per (run_id, phase, round, site): status
                    (trained/failed/timed_out/declined_budget), examples, metrics, duration, error
privacy             a site's cumulative differential-privacy spend after a round (epsilon, delta,
                    noise multiplier, clipping norm, the site's budget), same key as site_rounds
model_versions      a model version (key) with the run and round that made it, its metrics and
                    the checkpoint's sha256
bundles             exported edge bundles: version, sha256 (key), signed or not, where it lies
deployments         each deploy attempt on a workstation: version, backend, GPU, status
heartbeats          periodic health of each edge service: backend, GPU, model version,
                    throughput, p50/p95 latency, error counts by kind (JSON)
inference_events    one per slide inferred: workstation, model version, slide *name* (never its
                    folder: paths are cut to their last part, in ``error`` too), cell counts by
                    type (JSON), tissue area, duration, backend, error
schema_version      one row per migration step applied (version, description, time)
==================  ==========================================================================

Times are seconds since the epoch (UTC) as floats in every table; writers take epoch seconds
or timezone-aware datetimes and default to now. Writes that a retry could repeat are upserts on
the keys above (a round recorded again after a server restart replaces the first record);
heartbeats, deployments and inference events are append-only. There are no foreign keys: a
round whose run was never recorded (telemetry was down) is still kept.

SQLite runs in WAL mode with a busy timeout (``BUSY_TIMEOUT_S``); a writer takes the write
lock when its transaction begins, so several writer processes queue rather than fail, and
readers never block. Open one store per process, after any fork.

Migration policy
----------------
``schema.MIGRATIONS`` is an ordered, append-only list of numbered steps; ``SCHEMA_VERSION`` is
the last number. A released step is never edited: a change to the schema is a new step with its
own DDL, plus the matching change to the current table definitions in ``schema``. Opening a
store applies the missing steps in one transaction under the store's write lock (SQLite's
``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so concurrent openers migrate it once. A store
whose version is newer than this code knows is refused (upgrade cmdfed); a read-only open of an
older store is refused too, since it cannot be upgraded read-only. Steps should only add
(tables, nullable columns, indexes), so an older cmdfed's writes remain valid.
"""

from cmdfed.telemetry.schema import MIGRATIONS, SCHEMA_VERSION
from cmdfed.telemetry.store import BUSY_TIMEOUT_S, RUN_STATUSES, SITE_STATUSES, TelemetryStore

__all__ = [
    "BUSY_TIMEOUT_S",
    "MIGRATIONS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "SITE_STATUSES",
    "TelemetryStore",
]
