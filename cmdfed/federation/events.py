"""Progress events of a federated run: one JSON line each on the ServerApp's stdout.

Flower streams the ServerApp's output to ``flwr run --stream``; ``cmdfed federate`` and
``cmdfed simulate`` pick the lines starting with ``EVENT_PREFIX`` out of it and render them
(start, waiting, round, rejected, warning, finish, error).
"""

from __future__ import annotations

import json
from typing import Any

from cmdfed.atomic import json_safe

EVENT_PREFIX = "cmdfed-event "


def emit_event(kind: str, **fields: Any) -> None:
    print(EVENT_PREFIX + json.dumps(json_safe({"event": kind, **fields}), default=str), flush=True)
