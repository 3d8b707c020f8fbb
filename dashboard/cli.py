"""`cmdfed dashboard`: start the Streamlit app over a telemetry store and inference outputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cmdfed.errors import CmdfedError
from dashboard import DB_ENV, FILES_ROOT_ENV, OUTPUTS_ENV

APP = Path(__file__).with_name("app.py")


def streamlit_command(port: int, host: str) -> list[str]:
    """`streamlit run` of the page: headless, no usage statistics, bound to ``host``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.address",
        host,
        "--server.port",
        str(port),
    ]


def dashboard(
    db: str | None = typer.Option(
        None,
        "--db",
        help="Telemetry store (SQLite path or postgresql:// URL); default RUNS/telemetry.db.",
    ),
    runs: Path = typer.Option(
        Path("cmdfed-run"),
        "--runs",
        help="Federation run folder whose telemetry.db is read when --db is not given.",
    ),
    outputs: Path | None = typer.Option(
        None,
        "--outputs",
        help="Folder holding `cmdfed edge infer --out` folders, for the slide viewer.",
    ),
    files_root: Path | None = typer.Option(
        None,
        "--files-root",
        help="The only folder whose files the slide viewer reads and shows (output folders, slides); "
        "default: --outputs, else the current folder.",
    ),
    port: int = typer.Option(8501, "--port", help="Port to serve on."),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to bind. The dashboard has no authentication: anyone who reaches it sees the "
        "telemetry and the slides under --files-root. Keep 127.0.0.1, or bind it behind a reverse "
        "proxy that authenticates (e.g. the hospital's); 0.0.0.0 exposes it to the whole network.",
    ),
) -> None:
    """Serve the dashboard: federation, privacy, models, edge fleet and slide viewer."""
    if not 1 <= port <= 65535:
        raise CmdfedError(f"--port must be between 1 and 65535, got {port}")
    root = (files_root or outputs or Path.cwd()).resolve()
    if not root.is_dir():
        raise CmdfedError(
            f"--files-root {root} is not a folder: give the folder that holds the output folders and slides to show"
        )
    if outputs and not outputs.resolve().is_relative_to(root):
        raise CmdfedError(f"--outputs {outputs} is outside --files-root {root}: give a --files-root that holds it")
    env = {
        **os.environ,
        DB_ENV: db or str((runs / "telemetry.db").absolute()),
        OUTPUTS_ENV: str(outputs.absolute()) if outputs else "",
        FILES_ROOT_ENV: str(root),
    }
    print(f"cmdfed dashboard on http://{host}:{port}", file=sys.stderr, flush=True)
    # Become Streamlit rather than wait on it: a stop signal (Ctrl-C, SIGTERM from a service
    # manager) then reaches the server itself and never leaves it running orphaned.
    command = streamlit_command(port, host)
    os.execve(command[0], command, env)
