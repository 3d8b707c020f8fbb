"""Which sites a round goes to, without Flower's endless wait.

Flower's strategies count the connected nodes, then ``sample_nodes``
(``flwr.serverapp.strategy.strategy_utils``) waits, without a timeout, until that many are
connected: a site leaving between the two calls would hold the run forever. Here a round
first waits, up to the round timeout, for ``min-sites`` sites (:func:`wait_for_sites`), and
the strategy then samples from that snapshot (:class:`SamplingGrid`).
"""

from __future__ import annotations

import time

from flwr.serverapp import Grid

from cmdfed.errors import CmdfedError
from cmdfed.federation.events import emit_event


class SitesMissing(CmdfedError):
    """Fewer sites than ``min-sites`` were connected within the round timeout."""


def wait_for_sites(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Block until ``minimum`` sites are connected and return their node ids; ``SitesMissing``
    after ``timeout`` seconds."""
    deadline, announced = time.monotonic() + timeout, -1
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise _sites_missing(len(nodes), minimum, timeout)
        if len(nodes) != announced:
            emit_event("waiting", connected=len(nodes), needed=minimum)
            announced = len(nodes)
        time.sleep(1.0)
    return nodes


class SamplingGrid:
    """The grid as a strategy samples sites from it: one snapshot of the connected sites.

    Flower's strategies count the connected nodes, then ``sample_nodes``
    (``flwr.serverapp.strategy.strategy_utils``) waits, without a timeout, until that many
    are connected; a site leaving between the two calls would hold the run forever. Both
    calls see the snapshot :func:`wait_for_sites` took instead; a site gone since is sent
    its message, does not answer, and is recorded as timed out, like any site that leaves
    mid-round.
    """

    def __init__(self, grid: Grid, nodes: list[int]):
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _sites_missing(connected: int, minimum: int, timeout: float) -> SitesMissing:
    return SitesMissing(
        f"only {connected} of the {minimum} sites the run needs connected within {timeout:.0f} s; "
        "start more sites (`cmdfed client start`) or lower min-sites"
    )
