"""The federation's Flower ServerApp: reads the run config and runs the rounds (``server.rounds``)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cmdfed.errors import CmdfedError
from cmdfed.federation.config import FederationConfig
from cmdfed.federation.events import emit_event
from server.rounds import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_federation(grid, FederationConfig.from_run_config(context.run_config))
    except CmdfedError as exc:
        emit_event("error", message=str(exc))  # the one line `cmdfed federate` shows
        raise
