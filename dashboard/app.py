"""The dashboard page (run by `cmdfed dashboard`): sidebar filters, then five tabs.

The telemetry store and the outputs folder come from the environment that ``cmdfed dashboard``
sets (``CMDFED_DASHBOARD_DB``, ``CMDFED_DASHBOARD_OUTPUTS``). A store that cannot be opened is
one message in the telemetry tabs; the slide viewer works without it.
"""

import streamlit as st

from dashboard import views

st.set_page_config(page_title="cmdfed dashboard", layout="wide")
st.title("cmdfed dashboard")
db, outputs_root = views.settings()
store, problem = views.open_store(db)
filters = views.sidebar(store, db)


@st.fragment(run_every=filters.refresh_s)
def tabs() -> None:
    federation, privacy, models, fleet, slide_viewer = st.tabs(
        ["Federation", "Privacy", "Models", "Edge fleet", "Slide viewer"]
    )
    for tab, view in ((federation, views.federation), (privacy, views.privacy),
                      (models, views.models), (fleet, views.fleet)):  # fmt: skip
        with tab:
            if store is None:
                st.error(problem)
            else:
                view(store, filters)
    with slide_viewer:
        views.slide_viewer(outputs_root)


tabs()
