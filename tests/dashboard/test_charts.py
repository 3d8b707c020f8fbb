"""The Vega-Lite specs the dashboard's charts send to the browser."""

from __future__ import annotations

import pandas as pd

from dashboard import charts


def test_phase_timeline_is_in_utc_whatever_the_browsers_timezone():
    timeline = pd.DataFrame(
        {
            "phase": ["pretrain", "finetune"],
            "first_round": [1, 2],
            "last_round": [1, 3],
            "started": pd.to_datetime(["2025-03-01 10:00:00", "2025-03-01 10:10:00"]).tz_localize("Europe/Paris"),
            "finished": pd.to_datetime(["2025-03-01 10:01:40", "2025-03-01 10:31:40"]).tz_localize("Europe/Paris"),
        }
    )
    spec = charts.phase_timeline(timeline).to_dict()
    x = spec["encoding"]["x"]
    # without a utc scale Vega-Lite draws the axis in the browser's local time
    assert x["field"] == "started" and x["scale"] == {"type": "utc"} and x["title"] == "time (UTC)"
    assert spec["encoding"]["x2"]["field"] == "finished"
    tooltip = {t.get("title", t["field"]): t for t in spec["encoding"]["tooltip"]}
    assert tooltip["started"]["field"] == "started_utc" and tooltip["started"]["type"] == "nominal"
    assert tooltip["finished"]["field"] == "finished_utc"
    (rows,) = spec["datasets"].values()
    assert [(r["phase"], r["started_utc"], r["finished_utc"]) for r in rows] == [
        ("pretrain", "2025-03-01 09:00:00 UTC", "2025-03-01 09:01:40 UTC"),
        ("finetune", "2025-03-01 09:10:00 UTC", "2025-03-01 09:31:40 UTC"),
    ]
