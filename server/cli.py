"""``cmdfed server ...``: run the federation's SuperLink on this machine."""

from __future__ import annotations

from pathlib import Path

import typer

from cmdfed.cli import console
from cmdfed.federation.processes import require_loopback_or_insecure, serve_in_foreground
from server.superlink import SuperLink

commands = typer.Typer(help="Federation server: the SuperLink that sites connect to.", no_args_is_help=True)


@commands.command("start")
def start(
    run_dir: Path = typer.Option(Path("cmdfed-run"), "--run-dir", help="Run folder; the SuperLink keeps its state in RUN_DIR/superlink."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9092, help="Port for sites, `cmdfed federate` and the ServerApp (one HTTP port)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback address without TLS."),
) -> None:
    """Start the SuperLink and keep it running until Ctrl-C; sites and runs survive a restart."""
    require_loopback_or_insecure(host, insecure, "listen address")
    superlink = SuperLink(run_dir, host, port).start()
    console.print(f"SuperLink listening on {superlink.address} (state and log in {superlink.state_dir}); Ctrl-C stops it")
    serve_in_foreground(superlink.process, superlink.log_path)
