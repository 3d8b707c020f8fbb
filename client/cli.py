"""``cmdfed client ...``: join a federation as a site, and make the site's key pair."""

from __future__ import annotations

from pathlib import Path

import typer

from cmdfed.addresses import split_address
from cmdfed.cli import console
from cmdfed.errors import CmdfedError
from cmdfed.federation.keys import write_site_keys
from cmdfed.federation.processes import require_loopback_or_insecure, serve_in_foreground

commands = typer.Typer(
    help="Federation site: the SuperNode that trains on this hospital's store.", no_args_is_help=True
)


@commands.command("start")
def start(
    store: Path = typer.Option(..., "--store", help="This site's store (it never leaves this machine)."),
    name: str = typer.Option(..., "--name", help="The site's name as the server sees it, e.g. site-a."),
    superlink: str = typer.Option("127.0.0.1:9092", help="The SuperLink's host:port."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(0, help="Tiles per step here (0 = the run's batch size)."),
    work_dir: Path | None = typer.Option(
        None, help="Folder for the SuperNode's files and cache (default ./cmdfed-site-NAME)."
    ),
    port: int = typer.Option(0, help="Local port of the SuperNode's API for its ClientApps (0 = any free one)."),
    ca: Path | None = typer.Option(
        None, "--ca", help="The federation CA certificate (from the server's `cmdfed certs init`): TLS."
    ),
    key: Path | None = typer.Option(
        None,
        "--key",
        help="This site's private key (`cmdfed client keygen`), for a server that admits registered sites only.",
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback SuperLink without TLS."),
    share_metrics: bool = typer.Option(
        False,
        "--share-metrics",
        help="Under local DP, also send losses and evaluation "
        "scores (un-noised statistics of this site's tiles, outside its privacy budget); "
        "without it only privacy numbers and tile counts are sent.",
    ),
    isolation: str = typer.Option(
        "subprocess",
        "--isolation",
        help="How each message's ClientApp runs: subprocess (Flower's default: a fresh "
        "flwr-clientapp that imports torch and cmdfed every time) or process (a launcher beside the SuperNode "
        "imports them once and forks a process per message; needs fork(), tested on Linux).",
    ),
) -> None:
    """Check the store, then connect to the SuperLink and train when rounds come; Ctrl-C leaves."""
    from client.supernode import SuperNode
    from cmdfed.federation.site import SiteSettings, check_site_name, check_site_store
    from cmdfed.train.device import select_device

    check_site_name(name)
    if batch_size < 0:
        raise CmdfedError(f"--batch-size must be >= 0 (0 = the run's), got {batch_size}")
    info = check_site_store(store).info()
    select_device(device)
    host, _ = split_address(superlink)
    require_loopback_or_insecure(host, insecure, "SuperLink", tls=ca is not None)
    for path, what in ((ca, "--ca"), (key, "--key")):
        if path is not None and not path.is_file():
            raise CmdfedError(f"{what} {path} does not exist")
    settings = SiteSettings(
        store=store.absolute(),
        name=name,
        work_dir=(work_dir or Path(f"cmdfed-site-{name}")).absolute(),
        device=device,
        batch_size=batch_size or None,
        share_metrics=share_metrics,
    )
    node = SuperNode(
        settings,
        superlink,
        port,
        ca=ca.absolute() if ca else None,
        key=key.absolute() if key else None,
        isolation=isolation,
    ).start()
    console.print(
        f"site {name}: {info.tiles} tiles ({info.labelled} labelled) ready for {superlink}; "
        f"log in {node.log_path}; Ctrl-C leaves the federation"
    )
    serve_in_foreground(node.process, node.log_path, companions=node.processes[1:])


@commands.command("keygen")
def keygen(
    out: Path = typer.Option(Path("site-key"), "--out", help="Private key file; the public key goes to OUT.pub."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key."),
) -> None:
    """Make this site's key pair: keep the private key here, send OUT.pub to the server's operator."""
    public = write_site_keys(out, force=force)
    console.print(
        f"private key in {out} (keep it here); send {public} to the server: `cmdfed server register-site {public.name} "
        "--name ...`"
    )
