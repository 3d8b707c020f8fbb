"""The dashboard's sidebar filters and its five views, as Streamlit calls over
:mod:`dashboard.queries`, :mod:`dashboard.slides` and :mod:`dashboard.charts`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import streamlit as st

from cmdfed.errors import CmdfedError
from cmdfed.slide_outputs import GEOJSON
from cmdfed.telemetry import TelemetryStore
from dashboard import DB_ENV, FILES_ROOT_ENV, OUTPUTS_ENV, charts, queries, slides

TIME_RANGES = {
    "all time": None,
    "last hour": 3600,
    "last 24 hours": 86_400,
    "last 7 days": 7 * 86_400,
}
REFRESH_SECONDS = (10, 30, 60, 300)
RUN_FILLED_BY = (
    "`cmdfed federate` or `cmdfed simulate` record runs in the run folder's telemetry.db "
    "(or the store given by `--set telemetry=...`)"
)


@dataclass
class Filters:
    run_id: str | None
    sites: list[str]
    time_range: str  # a key of TIME_RANGES; the window's start is taken when the views are drawn
    refresh_s: int | None
    run_ids: list[str] = field(default_factory=list)  # the runs the sidebar offered
    since: float | None = None  # start of the time range, as of ``at``

    def at(self, now: float) -> Filters:
        """These filters with the time range ending at ``now``."""
        return replace(self, since=window_start(self.time_range, now))


def window_start(time_range: str, now: float) -> float | None:
    seconds = TIME_RANGES[time_range]
    return None if seconds is None else now - seconds


def settings() -> tuple[str, str, str]:
    """The telemetry store, the inference outputs folder and the folder whose files the viewer may
    show, as `cmdfed dashboard` passed them on (the last defaults as there: outputs, else here)."""
    outputs = os.environ.get(OUTPUTS_ENV, "")
    files_root = os.environ.get(FILES_ROOT_ENV, "") or outputs or os.getcwd()
    return os.environ.get(DB_ENV, ""), outputs, files_root


def open_store(db: str) -> tuple[TelemetryStore | None, str | None]:
    """The store read-only, or None and the message to show instead."""
    if not db:
        return (
            None,
            "No telemetry store given: start the dashboard with `cmdfed dashboard --db PATH_OR_URL`.",
        )
    try:
        return _shared_store(db), None
    except CmdfedError as exc:
        return None, f"Cannot open the telemetry store: {exc}"


@st.cache_resource(show_spinner=False)
def _shared_store(db: str) -> TelemetryStore:
    """One store per dashboard process, shared by its sessions (a failed open is not kept)."""
    return queries.open_store(db)


def sidebar(store: TelemetryStore | None, db: str) -> Filters:
    st.sidebar.caption(f"Telemetry store: `{db or 'none'}`")
    label = st.sidebar.selectbox("Time range", list(TIME_RANGES))
    run_id, sites, run_ids = None, [], []
    if store is not None:
        runs = queries.runs_table(store, window_start(label, time.time()))
        run_ids = list(runs["run_id"])
        if not runs.empty:
            names = dict(zip(runs["run_id"], runs["name"]))
            run_id = st.sidebar.selectbox(
                "Run", list(reversed(runs["run_id"])), format_func=lambda r: f"{names[r]} ({r})"
            )
            sites = st.sidebar.multiselect("Sites (all when none chosen)", queries.sites_of(store, [run_id]))
    refresh_s = None
    if st.sidebar.toggle("Auto-refresh"):
        refresh_s = st.sidebar.selectbox("Every (seconds)", REFRESH_SECONDS, index=1)
    return Filters(run_id, sites, label, refresh_s, run_ids)


def current_filters(store: TelemetryStore | None, db: str, filters: Filters) -> Filters:
    """The filters as of now, for views that auto-refresh on their own (a fragment) while the
    sidebar stays as drawn: the whole page is drawn again when the sidebar is out of date, i.e.
    the store now opens though it did not, or the runs in the time range are not those it offers."""
    now = filters.at(time.time())
    if store is None:
        if open_store(db)[0] is not None:
            st.rerun(scope="app")
    elif list(queries.runs_table(store, now.since)["run_id"]) != filters.run_ids:
        st.rerun(scope="app")
    return now


def _table(frame: pd.DataFrame, **kwargs) -> None:
    st.dataframe(frame, hide_index=True, width="stretch", **kwargs)


def federation(store: TelemetryStore, filters: Filters) -> None:
    runs = queries.runs_table(store, filters.since)
    if runs.empty:
        st.info(f"No federated runs in this time range. {RUN_FILLED_BY}.")
        return
    st.subheader("Runs")
    _table(runs)
    run_id = filters.run_id
    rounds = queries.rounds_table(store, run_id)
    site_rounds = queries.site_rounds_table(store, run_id, filters.sites)
    st.subheader(f"Run {run_id}")
    if rounds.empty:
        st.info(f"Run {run_id} has no completed round yet: the server records each round as it completes.")
        return
    metrics = queries.metric_columns(rounds, queries.ROUND_COLUMNS)
    counts = queries.status_counts(site_rounds)
    cols = st.columns(5)
    cols[0].metric("Rounds", len(rounds))
    cols[1].metric("Sites", site_rounds["site"].nunique() if not site_rounds.empty else 0)
    cols[2].metric("Failed or timed out site rounds", counts["failed"] + counts["timed_out"])
    cols[3].metric("Declined for budget", counts["declined_budget"])
    cols[4].metric("MB on the wire", f"{rounds['bytes_total'].sum() / 1e6:.2f}")
    last = rounds.iloc[-1]
    headline = queries.headline_metrics(metrics)
    if headline:
        cols = st.columns(len(headline))
        for col, metric in zip(cols, headline):
            col.metric(f"Last {metric}", "—" if pd.isna(last[metric]) else f"{last[metric]:.4f}")

    st.markdown("**Phases**")
    st.altair_chart(charts.phase_timeline(queries.phase_timeline(rounds)), width="stretch")
    st.markdown("**Global metrics per round**")
    chosen = st.multiselect("Metrics", metrics, default=headline or metrics[:4])
    curves = queries.metric_curves(rounds, chosen)
    if curves.empty:
        st.info("The rounds recorded no values for these metrics.")
    else:
        st.altair_chart(charts.metric_lines(curves, facet_by_metric=True))

    if not site_rounds.empty:
        st.markdown("**Participation (site × round)**")
        st.altair_chart(charts.participation_heatmap(queries.participation(site_rounds)), width="stretch")
        site_metrics = queries.metric_columns(site_rounds, queries.SITE_ROUND_COLUMNS)
        if site_metrics:
            st.markdown("**Per-site metrics**")
            site_metric = st.selectbox("Site metric", site_metrics)
            site_curves = queries.metric_curves(site_rounds, [site_metric], by=("site",))
            st.altair_chart(charts.metric_lines(site_curves, colour="site"), width="stretch")

    left, right = st.columns(2)
    left.markdown("**Round duration (s)**")
    left.altair_chart(charts.round_bars(rounds, "duration_s", "seconds"), width="stretch")
    right.markdown("**Bytes on the wire per round**")
    right.altair_chart(charts.round_bars(rounds, "bytes_total", "bytes"), width="stretch")
    with st.expander("Rounds table"):
        _table(rounds.drop(columns=["started_at", "finished_at"]))
    if not site_rounds.empty:
        with st.expander("Site rounds table"):
            _table(site_rounds.drop(columns=["at"]))


def privacy(store: TelemetryStore, filters: Filters) -> None:
    if filters.run_id is None:
        st.info(f"No federated runs in this time range. {RUN_FILLED_BY}.")
        return
    spend = queries.privacy_table(store, filters.run_id, filters.sites)
    if spend.empty:
        st.info(
            f"Run {filters.run_id} recorded no privacy spend: sites record it when training with local "
            "differential privacy (`--set dp-mode=local`)."
        )
        return
    site_rounds = queries.site_rounds_table(store, filters.run_id, filters.sites)
    by_site = queries.privacy_by_site(spend, site_rounds)
    reached = by_site[by_site["budget_reached"]]
    for row in reached.itertuples():
        st.error(
            f"{row.site} reached its privacy budget: ε {row.epsilon:.2f} of {row.budget_epsilon:.2f}",
            icon="⛔",
        )
    shown = by_site.assign(budget=by_site["budget_reached"].map({True: "⛔ reached", False: "within"}))
    _table(
        shown.drop(columns=["budget_reached"]),
        column_config={
            "budget_used": st.column_config.ProgressColumn(
                "budget used", min_value=0.0, max_value=1.0, format="percent"
            ),
        },
    )
    st.altair_chart(charts.epsilon_over_rounds(spend), width="stretch")
    with st.expander("Spend per round"):
        _table(spend.drop(columns=["at"]))


def models(store: TelemetryStore, filters: Filters) -> None:
    only_run = st.toggle("Only the selected run's versions", value=False) and filters.run_id
    versions = queries.model_versions_table(store, [filters.run_id] if only_run else None)
    if versions.empty:
        st.info(
            "No model versions recorded: a completed federated run records its final model, and "
            "`cmdfed edge export --telemetry DB` records the exported version and its bundle."
        )
    else:
        _table(versions.drop(columns=["recorded"]))
    deployments = queries.deployments_table(store, filters.since)
    st.markdown("**Deployments**")
    if deployments.empty:
        st.info("No deployments recorded: `cmdfed edge deploy BUNDLE --telemetry DB` records them.")
    else:
        _table(deployments)


def fleet(store: TelemetryStore, filters: Filters) -> None:
    table = queries.fleet_table(store)
    if table.empty:
        st.info("No heartbeats recorded: `cmdfed edge serve --telemetry DB` reports them from each workstation.")
    else:
        stale = table[table["state"] == queries.STALE]
        cols = st.columns(3)
        cols[0].metric("Workstations", len(table))
        cols[1].metric("Online", len(table) - len(stale))
        cols[2].metric("Stale", len(stale))
        for row in stale.itertuples():
            st.warning(f"{row.workstation} is stale: last heartbeat {row.seconds_ago:.0f} s ago", icon="🔴")
        shown = table.assign(state=table["state"].map({queries.ONLINE: "🟢 online", queries.STALE: "🔴 stale"}))
        _table(shown)
        errors = queries.errors_by_reason(store)
        if not errors.empty:
            st.markdown("**Errors by reason**")
            st.altair_chart(charts.errors_by_reason(errors), width="stretch")
    inference = queries.inference_table(store, filters.since)
    st.markdown("**Recent inference errors**")
    recent = queries.recent_errors(inference)
    if recent.empty:
        st.success("No inference errors in this time range.")
    else:
        _table(recent)
    st.markdown("**Slides inferred**")
    if inference.empty:
        st.info("No slides inferred in this time range: `cmdfed edge infer SLIDE --telemetry DB` records them.")
    else:
        _table(inference)


def _modified(path: Path) -> float | None:
    return path.stat().st_mtime if path.is_file() else None


@st.cache_resource(show_spinner=False, max_entries=4)
def _load_output(folder: str, geojson_modified: float | None) -> slides.SlideOutput:
    """A folder's outputs, read again only when its GeoJSON changes."""
    return slides.load_output(folder)


def slide_viewer(outputs_root: str, files_root: str) -> None:
    """Output folders and slides are read only inside ``files_root``: what is read goes to the
    browser, and the dashboard has no authentication."""
    folders = [f for f in slides.output_folders(outputs_root) if slides.is_inside(files_root, f)]
    typed = st.text_input("Output folder (`cmdfed edge infer --out`)", placeholder=f"{files_root}/...")
    if typed:
        try:
            folder = slides.inside(files_root, typed, "output folder")
        except CmdfedError as exc:
            st.error(str(exc))
            return
    elif folders:
        folder = st.selectbox("Or one under the outputs folder", folders, format_func=lambda p: str(p))
    else:
        where = f" under {outputs_root}" if outputs_root else ""
        st.info(
            f"No inference output folders{where}: `cmdfed edge infer SLIDE --out FOLDER` writes one; "
            "type its path above or start the dashboard with `--outputs DIR`."
        )
        return
    try:
        output = _load_output(str(folder), _modified(folder / GEOJSON))
    except CmdfedError as exc:
        st.error(str(exc))
        return
    summary = output.summary
    counts = slides.counts_by_type(output)
    cols = st.columns(4)
    cols[0].metric("Slide", summary.get("slide", "unknown"))
    cols[1].metric("Nuclei", len(output.nuclei))
    cols[2].metric("Model version", summary.get("model_version") or "unknown")
    density = summary.get("cells_per_mm2")
    cols[3].metric("Nuclei per mm²", "unknown" if density is None else f"{density:.0f}")

    width, height = output.dimensions
    found = slides.locate_slide(output, files_root)
    default = str(found.path or "")
    slide_path = st.text_input("Slide file (for the background)", value=default)
    slide = None
    if slide_path == default and found.path:
        st.caption(found.message)
    elif slide_path == default:
        st.warning(found.message)
    if slide_path:
        try:
            slide = slides.inside(files_root, slide_path, "slide")
        except CmdfedError as exc:
            st.error(str(exc))
    if slide and slide_path != default:
        differs = slides.typed_slide_mismatch(output, slide)
        if differs:
            st.warning(
                f"{slide_path} is not the slide this output was made from ({differs}): "
                "its nuclei may not lie under the outlines"
            )
    zoom_x = st.slider("x range (level-0 pixels)", 0, width, (0, width))
    zoom_y = st.slider("y range (level-0 pixels)", 0, height, (0, height))
    region = (zoom_x[0], zoom_y[0], max(zoom_x[1], zoom_x[0] + 1), max(zoom_y[1], zoom_y[0] + 1))
    image, note = slides.render(output, region, slide)
    left, right = st.columns([3, 1])
    left.image(image, caption=note)
    right.markdown("**Nuclei per type**")
    right.dataframe(counts[["type", "count"]], hide_index=True)
    if not counts.empty:
        right.altair_chart(charts.counts_by_type(counts), width="stretch")
