"""``cmdfed simulate``: the federation's own apps on Flower's simulation engine, N virtual sites.

What runs is what a real federation runs: ``server.rounds.run_federation`` (the ServerApp's whole
job: checkpoints, screening, telemetry, DP) and the sites' ClientApp, loaded by its component
reference (``client.client_app:app``) as a SuperNode loads it, each virtual site on a synthetic
store of its own (``cmdfed.federation.simulated``: stain shift by store or shared stains, or
Dirichlet label skew). Only the plumbing differs: Flower's ``run_simulation`` replaces SuperLink and
SuperNodes, and gives each virtual node a node config of ``partition-id`` alone, which the
simulation's ClientApp turns into that site's settings (store, name, work folder) before calling the
real ClientApp; the run config is the one built here (``--set``/``--config``, as ``cmdfed federate``
builds it).

Backend: Flower 1.42's simulation engine runs ClientApps on Ray actors, its only backend
(``pip install 'flwr[simulation]'``). Every virtual site asks Ray for one CPU
(``--cpus-per-site``), so at most ``cpus / cpus-per-site`` sites train at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cmdfed.cli import console
from cmdfed.errors import CmdfedError
from cmdfed.federation.events import EVENT_PREFIX
from server.federate import load_component, render_event, run_config

if TYPE_CHECKING:  # Flower, torch and the apps load when a simulation runs, not for `cmdfed --help`
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from cmdfed.federation.config import FederationConfig
    from cmdfed.federation.site import SiteSettings


def simulate(
    sites: int = typer.Option(4, "--sites", help="Number of virtual sites (8-32 is typical; 3-4 for a smoke test)."),
    split: str = typer.Option(
        "by-store", "--split", help="by-store, by-stain or dirichlet:ALPHA (label skew, e.g. dirichlet:0.5)."
    ),
    tiles: int = typer.Option(16, "--tiles", help="Synthetic tiles per site (64 px)."),
    out: Path = typer.Option(
        Path("cmdfed-simulation"), "--out", help="Folder for the stores, the sites' files and the run."
    ),
    config_file: Path | None = typer.Option(None, "--config", help="TOML file of run-config keys."),
    settings: list[str] = typer.Option(
        [], "--set", help="One run-config value, e.g. --set pretrain-rounds=2 (repeatable)."
    ),
    cpus_per_site: float = typer.Option(1.0, "--cpus-per-site", help="CPUs Ray reserves for each training site."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic stores and the split."),
) -> None:
    """Simulate a federation of N sites on synthetic stores, in this process, with the real apps."""
    from cmdfed.federation.checkpoints import last_complete_round
    from cmdfed.federation.simulated import Split, write_simulated_sites

    if not 1 <= sites <= 256:
        raise CmdfedError(f"--sites must be between 1 and 256, got {sites}")
    out = out.absolute()
    config = run_config(config_file, [f"min-sites={sites}", *settings], out / "run")
    site_settings = write_simulated_sites(out, sites, Split.parse(split), tiles, seed=seed)
    console.print(
        f"{sites} virtual sites ({split}, {tiles} tiles each) in {out / 'stores'}; run folder {config.run_dir}"
    )
    events = run_simulated(config, site_settings, cpus_per_site)
    finished = next((e for e in reversed(events) if e["event"] == "finish"), {})
    last = last_complete_round(config.run_dir)
    if finished.get("status") == "completed" and last is None:  # e.g. every site's privacy budget spent before round 1
        console.print(
            f"[bold yellow]simulation ended without training a round[/]: {finished.get('note') or 'no round ran'}"
        )
        return
    if finished.get("status") != "completed" or last is None:
        raise CmdfedError(
            f"the simulation ended as {finished.get('status', 'failed')}: "
            f"{finished.get('error') or 'see the messages above'}"
        )
    console.print(f"[bold green]simulation completed[/]: {last.round} rounds, checkpoints in {config.run_dir}")


def run_simulated(config: FederationConfig, sites: list[SiteSettings], cpus_per_site: float = 1.0) -> list[dict]:
    """Both phases on Flower's simulation engine; progress events are rendered as they come and returned."""
    try:
        import ray  # noqa: F401  (the engine's backend: without it run_simulation fails deep inside Flower)
        from flwr.simulation import run_simulation
    except ImportError as exc:
        raise CmdfedError(
            f"Flower's simulation engine needs Ray ({exc}); install it: pip install 'flwr[simulation]==1.42.*'"
        ) from exc
    backend = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
        "init_args": {"include_dashboard": False, "logging_level": "warning"},
    }
    events = _EventLines()
    with contextlib.redirect_stdout(events):
        run_simulation(
            server_app=simulation_server_app(config),
            client_app=simulation_client_app(config, sites),
            num_supernodes=len(sites),
            backend_config=backend,
        )
    return events.events


def simulation_server_app(config: FederationConfig) -> ServerApp:
    from flwr.serverapp import ServerApp

    from server.rounds import run_federation

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config)

    return app


def simulation_client_app(config: FederationConfig, sites: list[SiteSettings]) -> ClientApp:
    """The real ClientApp, each virtual node given its site's node config and the run config."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    site_app = load_component("clientapp")
    node_configs = [site.node_config() for site in sites]
    run_config_values = config.to_run_config()
    app = ClientApp()

    def as_site(context: Context) -> Context:
        # A copy: Flower refuses a handler that changes the run config of the context it keeps.
        site = node_configs[int(context.node_config["partition-id"])]
        return Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=site,
            state=context.state,
            run_config=run_config_values,
        )

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return site_app(msg, as_site(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return site_app(msg, as_site(context))

    return app


class _EventLines(io.TextIOBase):
    """stdout while simulating: the coordinator's event lines rendered, anything else passed on."""

    def __init__(self) -> None:
        self.buffer, self.events = "", []
        self.passthrough = sys.stdout

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if line.startswith(EVENT_PREFIX):
            event: dict[str, Any] = json.loads(line[len(EVENT_PREFIX) :])
            self.events.append(event)
            with contextlib.redirect_stdout(self.passthrough):
                render_event(event)
        elif line.strip():
            self.passthrough.write(line + "\n")
