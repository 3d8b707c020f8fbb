"""Telemetry store -> pandas tables for the dashboard's views.

Plain functions over a read-only :class:`cmdfed.telemetry.TelemetryStore`; no Streamlit here,
so each can be unit-tested on a seeded store. Times come out as timezone-aware UTC
timestamps; JSON metric columns are flattened into one column per metric.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from cmdfed.telemetry import SITE_STATUSES, TelemetryStore

#: A workstation whose newest heartbeat is older than this is shown as stale.
STALE_AFTER_S = 300.0
#: Global metrics plotted by default: keys ending in these (train_loss, eval_dice, server_pq ...).
HEADLINE_METRICS = ("loss", "dice", "aji", "pq")
ONLINE, STALE = "online", "stale"


def open_store(db: str | Path) -> TelemetryStore:
    """The store, read-only; a missing, empty or newer-schema store raises ``CmdfedError``."""
    return TelemetryStore.open(db, readonly=True)


def _utc(seconds) -> pd.Series | pd.Timestamp:
    return pd.to_datetime(seconds, unit="s", utc=True)


def _flatten_metrics(rows: list[dict], column: str = "metrics") -> pd.DataFrame:
    """Rows with the JSON ``column`` spread into one numeric column per key."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    metrics = pd.json_normalize(frame[column].tolist()).set_index(frame.index)
    metrics = metrics.apply(pd.to_numeric, errors="coerce")
    return pd.concat([frame.drop(columns=[column]), metrics], axis=1)


def runs_table(store: TelemetryStore, since: float | None = None) -> pd.DataFrame:
    """One row per run started at or after ``since``, oldest first."""
    rows = [r for r in store.runs() if since is None or r["started_at"] >= since]
    columns = ["run_id", "name", "strategy", "status", "phases", "started", "finished", "rounds"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    frame["phases"] = frame["phases"].map(", ".join)
    frame["started"] = _utc(frame["started_at"])
    frame["finished"] = _utc(frame["finished_at"])
    frame["rounds"] = [len(store.rounds(run_id)) for run_id in frame["run_id"]]
    return frame[columns]


def rounds_table(store: TelemetryStore, run_id: str) -> pd.DataFrame:
    """A run's rounds: timing, sites, bytes on the wire and one column per global metric."""
    frame = _flatten_metrics(store.rounds(run_id))
    if frame.empty:
        return frame
    frame["started"] = _utc(frame["started_at"])
    frame["finished"] = _utc(frame["finished_at"])
    frame["duration_s"] = frame["finished_at"] - frame["started_at"]
    frame["bytes_total"] = frame["bytes_sent"] + frame["bytes_received"]
    return frame.drop(columns=["id", "run_id"]).sort_values("round", ignore_index=True)


def metric_columns(frame: pd.DataFrame, known: tuple[str, ...]) -> list[str]:
    """Columns of ``frame`` that are metrics, i.e. not in ``known``, numeric and not all empty."""
    return [
        c
        for c in frame.columns
        if c not in known and pd.api.types.is_numeric_dtype(frame[c]) and frame[c].notna().any()
    ]


ROUND_COLUMNS = (
    "phase",
    "round",
    "started_at",
    "finished_at",
    "started",
    "finished",
    "duration_s",
    "n_sites",
    "n_failed",
    "bytes_sent",
    "bytes_received",
    "bytes_total",
)
SITE_ROUND_COLUMNS = ("phase", "round", "site", "status", "n_examples", "duration_s", "error", "at")


def headline_metrics(columns: list[str]) -> list[str]:
    return [c for c in columns if c.lower().endswith(HEADLINE_METRICS)]


def metric_curves(frame: pd.DataFrame, metrics: list[str], by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Long form (``by``..., phase, round, metric, value) of the chosen metric columns."""
    present = [m for m in metrics if m in frame.columns]
    if frame.empty or not present:
        return pd.DataFrame(columns=[*by, "phase", "round", "metric", "value"])
    long = frame.melt(id_vars=[*by, "phase", "round"], value_vars=present, var_name="metric")
    return long.dropna(subset=["value"]).reset_index(drop=True)


def phase_timeline(rounds: pd.DataFrame) -> pd.DataFrame:
    """Each phase's first and last round and its start and end time."""
    if rounds.empty:
        return pd.DataFrame(columns=["phase", "first_round", "last_round", "started", "finished"])
    grouped = rounds.groupby("phase", sort=False)
    return pd.DataFrame(
        {
            "first_round": grouped["round"].min(),
            "last_round": grouped["round"].max(),
            "started": grouped["started"].min(),
            "finished": grouped["finished"].max(),
        }
    ).reset_index()


def site_rounds_table(store: TelemetryStore, run_id: str, sites: list[str] | None = None) -> pd.DataFrame:
    """Each site's part in each round of a run (metrics flattened), optionally only ``sites``."""
    frame = _flatten_metrics(store.site_rounds(run_id))
    if frame.empty:
        return frame
    if sites:
        frame = frame[frame["site"].isin(sites)]
    return frame.drop(columns=["id", "run_id"]).sort_values(["round", "site"], ignore_index=True)


def participation(site_rounds: pd.DataFrame) -> pd.DataFrame:
    """Site x round participation statuses (long form) for the heatmap."""
    if site_rounds.empty:
        return pd.DataFrame(columns=["site", "round", "status"])
    return site_rounds[["site", "round", "status", "error"]].reset_index(drop=True)


def status_counts(site_rounds: pd.DataFrame) -> dict[str, int]:
    """How many site rounds ended in each status (every status listed, zero included)."""
    counts = site_rounds["status"].value_counts() if not site_rounds.empty else {}
    return {status: int(counts.get(status, 0)) for status in SITE_STATUSES}


def sites_of(store: TelemetryStore, run_ids: list[str]) -> list[str]:
    return sorted({r["site"] for run_id in run_ids for r in store.site_rounds(run_id)})


def privacy_table(store: TelemetryStore, run_id: str, sites: list[str] | None = None) -> pd.DataFrame:
    """Each site's cumulative spend after each round, with whether it reached its budget."""
    frame = pd.DataFrame(store.privacy(run_id))
    if frame.empty:
        return frame
    if sites:
        frame = frame[frame["site"].isin(sites)]
    frame["budget_reached"] = frame["budget_epsilon"].notna() & (frame["epsilon"] >= frame["budget_epsilon"])
    return frame.drop(columns=["id", "run_id"]).sort_values(["site", "round"], ignore_index=True)


def privacy_by_site(privacy: pd.DataFrame, site_rounds: pd.DataFrame) -> pd.DataFrame:
    """Per site: the newest spend, its budget, DP settings and whether the budget is reached
    (spend at or over the budget, or the site declined a round for its budget)."""
    columns = [
        "site",
        "epsilon",
        "budget_epsilon",
        "budget_used",
        "delta",
        "noise_multiplier",
        "max_grad_norm",
        "last_round",
        "budget_reached",
    ]
    if privacy.empty:
        return pd.DataFrame(columns=columns)
    latest = privacy.sort_values("round").groupby("site").tail(1).set_index("site")
    declined = set()
    if not site_rounds.empty:
        declined = set(site_rounds.loc[site_rounds["status"] == "declined_budget", "site"])
    latest["last_round"] = latest["round"]
    latest["budget_used"] = latest["epsilon"] / latest["budget_epsilon"]
    latest["budget_reached"] = latest["budget_reached"] | latest.index.isin(declined)
    return latest.reset_index()[columns].sort_values("site", ignore_index=True)


def model_versions_table(store: TelemetryStore, run_ids: list[str] | None = None) -> pd.DataFrame:
    """Model versions, newest first, with their run, round, metrics, bundle checksum, signature
    status and the workstations whose newest heartbeat reports running them."""
    frame = _flatten_metrics(store.model_versions())
    if frame.empty:
        return frame
    if run_ids:
        frame = frame[frame["run_id"].isin(run_ids)]
    bundles = {}
    for bundle in store.bundles():  # oldest first: the newest bundle of a version wins
        bundles[bundle["version"]] = bundle
    running: dict[str, list[str]] = {}
    for beat in store.heartbeats():
        running.setdefault(beat["model_version"], []).append(beat["workstation"])
    frame["bundle_sha256"] = frame["version"].map(lambda v: bundles.get(v, {}).get("sha256"))
    frame["signature"] = frame["version"].map(
        lambda v: "no bundle" if v not in bundles else ("signed" if bundles[v]["signed"] else "unsigned")
    )
    frame["workstations"] = frame["version"].map(lambda v: ", ".join(sorted(running.get(v, []))))
    frame["recorded"] = _utc(frame["at"])
    front = [
        "version",
        "run_id",
        "round",
        "signature",
        "workstations",
        "bundle_sha256",
        "checkpoint_sha256",
    ]
    rest = [c for c in frame.columns if c not in (*front, "at")]
    return frame[front + rest].iloc[::-1].reset_index(drop=True)


def deployments_table(store: TelemetryStore, since: float | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(store.deployments())
    if frame.empty:
        return frame
    if since is not None:
        frame = frame[frame["at"] >= since]
    frame["when"] = _utc(frame["at"])
    return frame.drop(columns=["id", "at"]).iloc[::-1].reset_index(drop=True)


def fleet_table(store: TelemetryStore, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> pd.DataFrame:
    """Per workstation its newest heartbeat: online or stale, backend, GPU, model, speed, errors."""
    beats = store.heartbeats()
    columns = [
        "workstation",
        "state",
        "last_heartbeat",
        "seconds_ago",
        "backend",
        "gpu",
        "model_version",
        "tiles_per_s",
        "p50_ms",
        "p95_ms",
        "errors",
    ]
    if not beats:
        return pd.DataFrame(columns=columns)
    now = time.time() if now is None else now
    frame = pd.DataFrame(beats)
    frame["seconds_ago"] = (now - frame["at"]).round(1)
    frame["state"] = [STALE if age > stale_after_s else ONLINE for age in frame["seconds_ago"]]
    frame["last_heartbeat"] = _utc(frame["at"])
    frame["errors"] = frame["errors"].map(lambda e: int(sum(e.values())))
    return frame[columns]


def errors_by_reason(store: TelemetryStore) -> pd.DataFrame:
    """Error counts by kind from each workstation's newest heartbeat (long form)."""
    rows = [
        {"workstation": b["workstation"], "reason": reason, "count": int(count)}
        for b in store.heartbeats()
        for reason, count in sorted(b["errors"].items())
    ]
    return pd.DataFrame(rows, columns=["workstation", "reason", "count"])


def inference_table(store: TelemetryStore, since: float | None = None, limit: int = 500) -> pd.DataFrame:
    """The newest inference events (newest first) at or after ``since``."""
    frame = pd.DataFrame(store.inference_events(limit))
    if frame.empty:
        return frame
    if since is not None:
        frame = frame[frame["at"] >= since]
    frame["when"] = _utc(frame["at"])
    frame["counts_by_type"] = frame["counts_by_type"].map(
        lambda counts: ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    )
    front = ["when", "workstation", "slide_name", "model_version", "n_cells", "error"]
    rest = [c for c in frame.columns if c not in (*front, "id", "at")]
    return frame[front + rest].reset_index(drop=True)


def recent_errors(inference: pd.DataFrame) -> pd.DataFrame:
    if inference.empty:
        return inference
    return inference.loc[inference["error"].notna(), ["when", "workstation", "slide_name", "error"]]
