"""``python -m server.superlink_process ARGS``: ``flower-superlink ARGS`` with a patient state database.

Flower keeps the SuperLink's state in SQLite (``--database``) and waits at most 5 s for a
lock (``busy_timeout`` in ``flwr.supercore.constant.SQLITE_PRAGMAS``). Writes of weight
objects are large; on a busy machine (sites training beside the server, as in ``cmdfed
demo``) a writer can hold the lock longer, and Flower then answers HTTP 500: a SuperNode
whose push fails gives up and exits, and the ServerApp dies mid-run. Waiting up to
``BUSY_TIMEOUT_MS`` turns those into a short delay. Everything else is Flower's own CLI.
"""

import sys

from flwr.supercore import sql_mixin
from flwr.superlink.cli import flower_superlink

BUSY_TIMEOUT_MS = 120_000

sql_mixin.SQLITE_PRAGMAS = tuple(
    (pragma, str(BUSY_TIMEOUT_MS) if pragma == "busy_timeout" else value) for pragma, value in sql_mixin.SQLITE_PRAGMAS
)

if __name__ == "__main__":
    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())
