"""``cmdfed server telemetry ...``: the federation's telemetry server, where edge workstations
report (``cmdfed edge serve --report-to``), and the tokens that admit them.

    add-workstation NAME --tokens FILE [--token-out TOKEN]   issue a token (shown or written once)
    remove-workstation NAME --tokens FILE                    its token stops working at once
    serve --listen HOST:PORT --db URL --tokens FILE [--certs DIR]   record reports until SIGTERM
          [--header-timeout S] [--body-timeout S] [--max-connections N]   limits against slow clients

The server itself is ``cmdfed.telemetry.remote.ingest`` (uvicorn; HTTPS + JSON, ``POST /v1/reports``,
``GET /healthz``); with ``--certs`` it serves HTTPS with the server certificate of
``cmdfed certs init``, the same one the SuperLink uses.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

from cmdfed.addresses import split_address
from cmdfed.cli import console, out
from cmdfed.telemetry.remote.tokens import WorkstationTokens, write_token_file
from cmdfed.telemetry.remote.transport import require_tls_off_loopback
from server.certs import server_tls_files

commands = typer.Typer(help="Telemetry server for edge workstations, and their tokens.", no_args_is_help=True)

TOKENS_HELP = "The server's workstation tokens file (JSON of names and token hashes)."


@commands.command("add-workstation")
def add_workstation(
    name: str = typer.Argument(..., help="The workstation's name, e.g. scanner-3; its reports are recorded under it."),
    tokens: Path = typer.Option(..., "--tokens", help=TOKENS_HELP + " Created if missing."),
    token_out: Path | None = typer.Option(
        None, "--token-out", help="Write the token here (owner-only) instead of printing it."
    ),
    replace: bool = typer.Option(
        False, "--replace", help="Issue a new token for a workstation that has one (the old one stops working)."
    ),
) -> None:
    """Issue a workstation's token; it is shown (or written) once and only its hash is kept."""
    if token_out is None:
        token = WorkstationTokens(tokens).add(name, replace=replace)
        out.print(token, highlight=False, soft_wrap=True)
        console.print(f"token for {name} (shown once; give it to the workstation as its --report-token file)")
    else:
        # The token file first: if it cannot be written, the hash is not saved and a rerun needs no --replace.
        WorkstationTokens(tokens).add(name, replace=replace, deliver=lambda token: write_token_file(token_out, token))
        console.print(f"token for {name} written to {token_out}; give it to the workstation as its --report-token file")


@commands.command("remove-workstation")
def remove_workstation(
    name: str = typer.Argument(..., help="The workstation's name."),
    tokens: Path = typer.Option(..., "--tokens", help=TOKENS_HELP),
) -> None:
    """Revoke a workstation's token; a running server refuses it from its next report."""
    WorkstationTokens(tokens).remove(name)
    console.print(f"workstation {name} removed from {tokens}")


@commands.command("serve")
def serve(
    listen: str = typer.Option("127.0.0.1:9093", "--listen", help="HOST:PORT to listen on (port 0: any free port)."),
    db: str = typer.Option(
        ..., "--db", help="Telemetry store to record into (SQLite path or postgresql:// URL); created if missing."
    ),
    tokens: Path = typer.Option(..., "--tokens", help=TOKENS_HELP),
    certs: Path | None = typer.Option(
        None, "--certs", help="Folder of `cmdfed certs init`: serve HTTPS with its server certificate."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback address without TLS."),
    header_timeout: float | None = typer.Option(
        None, "--header-timeout", help="Seconds a connection has to send its request headers (default 10)."
    ),
    body_timeout: float | None = typer.Option(
        None, "--body-timeout", help="Seconds a request has to send its body (default 30)."
    ),
    max_connections: int | None = typer.Option(
        None, "--max-connections", help="Connections open at once; one more is answered 503 (default 256)."
    ),
) -> None:
    """Record edge workstations' heartbeats and slide summaries until SIGTERM or Ctrl-C."""
    from cmdfed.telemetry.remote.ingest import IngestServer  # the HTTP server and the store: only when serving

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host, port = split_address(listen)
    require_tls_off_loopback(
        host, tls=certs is not None, insecure=insecure, what="listen address", insecure_flag="--insecure"
    )
    tls = None
    if certs is not None:
        _, cert, key = server_tls_files(certs)
        tls = (cert, key)
    limits = {"header_timeout_s": header_timeout, "body_timeout_s": body_timeout, "max_connections": max_connections}
    server = IngestServer(
        db, tokens, host=host, port=port, tls=tls, **{k: v for k, v in limits.items() if v is not None}
    ).start()
    console.print(
        f"telemetry server listening on {host}:{server.port} ({'HTTPS' if tls else 'plaintext HTTP'}; "
        f"{server.workstations} workstations in {tokens}; recording into {server.store.target}); Ctrl-C stops it",
        soft_wrap=True,
        highlight=False,
    )
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    server.stop()
