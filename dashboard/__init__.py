"""cmdfed dashboard: a Streamlit app over the telemetry store and edge inference outputs.

``cmdfed dashboard`` (:mod:`dashboard.cli`) starts ``streamlit run dashboard/app.py``. The page
script is thin: :mod:`dashboard.queries` turns the telemetry store into pandas tables,
:mod:`dashboard.slides` reads inference output folders and draws nuclei outlines,
:mod:`dashboard.charts` makes the Altair charts and :mod:`dashboard.views` lays out the tabs.
The dashboard only reads: it opens the store read-only and never imports server internals. It
has no authentication: it serves files from one folder only (``--files-root``) and binds to
loopback unless told otherwise.
"""

# How `cmdfed dashboard` tells the page what to show (environment of `streamlit run`); here so
# the command does not import the page's libraries to start it.
DB_ENV = "CMDFED_DASHBOARD_DB"
OUTPUTS_ENV = "CMDFED_DASHBOARD_OUTPUTS"
# The only folder whose files (output folders, slides) the slide viewer reads and sends to browsers.
FILES_ROOT_ENV = "CMDFED_DASHBOARD_FILES_ROOT"
