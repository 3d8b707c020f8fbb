"""``cmdfed server ...``: run the federation's SuperLink on this machine, and admit sites."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import typer

from cmdfed.addresses import split_address
from cmdfed.cli import console
from cmdfed.errors import CmdfedError
from cmdfed.federation.processes import (
    SERVE_TLS,
    flower_env,
    flower_executable,
    require_loopback_or_insecure,
    serve_in_foreground,
)
from server.federate import CONNECTION, write_connection
from server.superlink import SuperLink
from server.telemetry import commands as telemetry_commands

commands = typer.Typer(help="Federation server: the SuperLink that sites connect to.", no_args_is_help=True)
commands.add_typer(telemetry_commands, name="telemetry")


@commands.command("start")
def start(
    run_dir: Path = typer.Option(
        Path("cmdfed-run"), "--run-dir", help="Run folder; the SuperLink keeps its state in RUN_DIR/superlink."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(9092, help="Port for sites, `cmdfed federate` and the ServerApp (one HTTP port)."),
    certs: Path | None = typer.Option(
        None, "--certs", help="Folder of `cmdfed certs init`: serve TLS with its server certificate."
    ),
    site_auth: bool = typer.Option(
        False, "--site-auth", help="Admit only sites whose keys were registered (`cmdfed server register-site`)."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback address without TLS."),
) -> None:
    """Start the SuperLink and keep it running until Ctrl-C; sites and runs survive a restart."""
    require_loopback_or_insecure(host, insecure, "listen address", tls=certs is not None, how=SERVE_TLS)
    superlink = SuperLink(run_dir, host, port, certs=certs.absolute() if certs else None, site_auth=site_auth).start()
    security = ("TLS" if certs else "plaintext") + (", registered sites only" if site_auth else "")
    console.print(
        f"SuperLink listening on {superlink.address} ({security}; state and log in {superlink.state_dir}); Ctrl-C "
        "stops it"
    )
    serve_in_foreground(superlink.process, superlink.log_path)


@commands.command("register-site")
def register_site(
    public_key: Path = typer.Argument(..., help="The site's public key (its `cmdfed client keygen` .pub file)."),
    name: str = typer.Option(..., "--name", help="The site's name, e.g. site-a."),
    superlink: str = typer.Option("127.0.0.1:9092", help="The SuperLink's host:port."),
    ca: Path | None = typer.Option(None, "--ca", help="The federation CA certificate, when the SuperLink serves TLS."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback SuperLink without TLS."),
) -> None:
    """Admit a site to a SuperLink started with --site-auth: its SuperNode may then join."""
    from cmdfed.federation.site import check_site_name

    check_site_name(name)
    if not public_key.is_file():
        raise CmdfedError(f"{public_key} does not exist; the site makes it with `cmdfed client keygen`")
    host, _ = split_address(superlink)
    require_loopback_or_insecure(host, insecure, "SuperLink", tls=ca is not None)
    node_id = register_public_key(public_key, name, superlink, ca)
    console.print(f"site {name} registered (node {node_id}); it can now join with its private key")


def register_public_key(public_key: Path, name: str, superlink: str, ca: Path | None = None) -> int:
    """``flwr supernode register`` against ``superlink``; returns the node id it assigns."""
    with tempfile.TemporaryDirectory(prefix="cmdfed-register-") as tmp:
        env = flower_env(Path(tmp) / "flwr-home")
        write_connection(Path(env["FLWR_HOME"]), superlink, ca)
        command = [
            flower_executable("flwr"),
            "supernode",
            "register",
            str(public_key.absolute()),
            CONNECTION,
            "--name",
            name,
            "--format",
            "json",
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    try:
        reply = json.loads(result.stdout[result.stdout.index("{") :])
    except ValueError:
        reply = {}
    if result.returncode != 0 or not reply.get("success"):
        message = reply.get("error-message") or (result.stdout + result.stderr).strip()[-300:]
        raise CmdfedError(f"the SuperLink did not register {public_key.name}: {message}")
    return int(reply["node-id"])
