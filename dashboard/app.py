"""The dashboard page (run by `cmdfed dashboard`): sidebar filters, then five tabs.

The telemetry store, the outputs folder and the folder whose files the viewer may show come from
the environment that ``cmdfed dashboard`` sets (``CMDFED_DASHBOARD_DB``, ``..._OUTPUTS``,
``..._FILES_ROOT``). A store that cannot be opened is one message in the telemetry tabs; the
slide viewer works without it.
"""

import streamlit as st

from dashboard import views

st.set_page_config(page_title="cmdfed dashboard", layout="wide")
st.title("cmdfed dashboard")
db, outputs_root, files_root = views.settings()
store, problem = views.open_store(db)
filters = views.sidebar(store, db)


@st.fragment(run_every=filters.refresh_s)
def tabs() -> None:
    # Auto-refresh runs only this function: it takes the time range as of now, and draws the whole
    # page again when the sidebar is out of date (the store appeared, runs came or left the range).
    current = views.current_filters(store, db, filters)
    federation, privacy, models, fleet, slide_viewer = st.tabs(
        ["Federation", "Privacy", "Models", "Edge fleet", "Slide viewer"]
    )
    for tab, view in (
        (federation, views.federation),
        (privacy, views.privacy),
        (models, views.models),
        (fleet, views.fleet),
    ):
        with tab:
            if store is None:
                st.error(problem)
            else:
                view(store, current)
    with slide_viewer:
        views.slide_viewer(outputs_root, files_root)


tabs()
