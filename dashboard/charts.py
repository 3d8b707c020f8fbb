"""Altair charts for the dashboard, each from a table of :mod:`dashboard.queries`."""

from __future__ import annotations

import altair as alt
import pandas as pd

from cmdfed.telemetry import SITE_STATUSES

STATUS_COLOURS = {
    "trained": "#2ca02c",
    "failed": "#d62728",
    "timed_out": "#ff7f0e",
    "declined_budget": "#7f7f7f",
}


def metric_lines(curves: pd.DataFrame, colour: str = "metric", facet_by_metric: bool = False) -> alt.Chart:
    """Value per round, one line per ``colour`` (metric or site); one panel per metric when asked."""
    chart = (
        alt.Chart(curves)
        .mark_line(point=True)
        .encode(
            x=alt.X("round:Q", title="round", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            color=alt.Color(f"{colour}:N"),
            tooltip=[
                "phase",
                "round",
                "metric",
                *([colour] if colour != "metric" else []),
                "value",
            ],
        )
        .properties(height=220, width=320 if facet_by_metric else "container")
    )
    if facet_by_metric:
        return chart.facet(facet=alt.Facet("metric:N", title=None), columns=2).resolve_scale(y="independent")
    return chart


def participation_heatmap(participation: pd.DataFrame) -> alt.Chart:
    """Site x round cells coloured by the site's status in that round."""
    return (
        alt.Chart(participation)
        .mark_rect(stroke="white")
        .encode(
            x=alt.X("round:O", title="round"),
            y=alt.Y("site:N", title="site"),
            color=alt.Color(
                "status:N",
                scale=alt.Scale(domain=list(SITE_STATUSES), range=[STATUS_COLOURS[s] for s in SITE_STATUSES]),
                legend=alt.Legend(orient="bottom"),
            ),
            tooltip=["site", "round", "status", "error"],
        )
        .properties(height=alt.Step(28), width="container")
    )


def round_bars(rounds: pd.DataFrame, column: str, title: str) -> alt.Chart:
    return (
        alt.Chart(rounds)
        .mark_bar()
        .encode(
            x=alt.X("round:O", title="round"),
            y=alt.Y(f"{column}:Q", title=title),
            color=alt.Color("phase:N"),
            tooltip=["phase", "round", column],
        )
        .properties(height=200, width="container")
    )


UTC_TIME = "%Y-%m-%d %H:%M:%S UTC"


def phase_timeline(timeline: pd.DataFrame) -> alt.Chart:
    """Each phase as a bar from its start to its end, in UTC whatever the browser's timezone (Vega-Lite
    draws times in the browser's local time unless the scale is ``utc``; the tooltip's times are
    formatted here, in UTC, for the same reason)."""
    timeline = timeline.assign(
        started_utc=pd.to_datetime(timeline["started"], utc=True).dt.strftime(UTC_TIME),
        finished_utc=pd.to_datetime(timeline["finished"], utc=True).dt.strftime(UTC_TIME),
    )
    return (
        alt.Chart(timeline)
        .mark_bar()
        .encode(
            x=alt.X(
                "started:T",
                title="time (UTC)",
                scale=alt.Scale(type="utc"),
                axis=alt.Axis(format="%H:%M"),
            ),
            x2="finished:T",
            y=alt.Y("phase:N", sort=None),
            color="phase:N",
            tooltip=[
                "phase",
                "first_round",
                "last_round",
                alt.Tooltip("started_utc:N", title="started"),
                alt.Tooltip("finished_utc:N", title="finished"),
            ],
        )
        .properties(height=alt.Step(30), width="container")
    )


def epsilon_over_rounds(privacy: pd.DataFrame) -> alt.Chart:
    """Each site's cumulative epsilon per round, with its budget as a dashed rule."""
    spend = (
        alt.Chart(privacy)
        .mark_line(point=True)
        .encode(
            x=alt.X("round:Q", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("epsilon:Q", title="ε spent"),
            color="site:N",
            tooltip=[
                "site",
                "round",
                "epsilon",
                "budget_epsilon",
                "delta",
                "noise_multiplier",
                "max_grad_norm",
            ],
        )
    )
    budget = (
        alt.Chart(privacy.dropna(subset=["budget_epsilon"]))
        .mark_rule(strokeDash=[6, 4])
        .encode(y="max(budget_epsilon):Q", color="site:N")
    )
    return (spend + budget).properties(height=260, width="container")


def errors_by_reason(errors: pd.DataFrame) -> alt.Chart:
    return (
        alt.Chart(errors)
        .mark_bar()
        .encode(
            x=alt.X("count:Q", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("reason:N"),
            color="workstation:N",
            tooltip=["workstation", "reason", "count"],
        )
        .properties(height=alt.Step(24), width="container")
    )


def counts_by_type(counts: pd.DataFrame) -> alt.Chart:
    return (
        alt.Chart(counts)
        .mark_bar()
        .encode(
            x=alt.X("count:Q"),
            y=alt.Y("type:N", sort="-x"),
            color=alt.Color(
                "type:N",
                scale=alt.Scale(domain=list(counts["type"]), range=list(counts["colour"])),
                legend=None,
            ),
            tooltip=["type", "count"],
        )
        .properties(height=alt.Step(24), width="container")
    )
