"""``cmdfed federate``: submit the federation app to a SuperLink and follow the run.

It wraps ``flwr run`` rather than re-implementing Flower's control API:

1. the run config is built and validated here first (defaults < ``--config`` file <
   ``--set`` values, and an absolute ``--run-dir``), so mistakes fail before submission;
2. the app is staged in a temporary folder: the installed packages of its two components
   (``APP_TABLE``, as ``[tool.flwr.app.components]`` declares them: this ServerApp and the
   sites' ClientApp, found by name, not imported, since roles do not import each other)
   plus a ``pyproject.toml`` whose ``[tool.flwr.app.config]`` is that run config (this
   works the same from a checkout and from an installed wheel);
3. a temporary ``FLWR_HOME/config.toml`` names the SuperLink connection, so the user's own
   Flower configuration is neither needed nor touched;
4. ``flwr run --stream`` prints the ServerApp's output; the ``cmdfed-event`` lines in it
   (``RunCoordinator`` emits them) become progress lines: phase, round, per-site results;
5. ``flwr ls --run-id`` tells how the run ended; anything but completed exits non-zero.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import tempfile
import tomllib
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
import typer

import cmdfed
from cmdfed.addresses import split_address
from cmdfed.cli import console, emit, out
from cmdfed.errors import CmdfedError
from cmdfed.federation.events import EVENT_PREFIX
from cmdfed.federation.processes import flower_env, flower_executable, require_loopback_or_insecure

if TYPE_CHECKING:  # the run config needs the model's (torch); commands that never build one start without it
    from cmdfed.federation.config import FederationConfig

CONNECTION = "cmdfed"
APP_TABLE = {
    "publisher": "cmdfed",
    "components": {"serverapp": "server.server_app:app", "clientapp": "client.client_app:app"},
}


def federate(
    superlink: str = typer.Option("127.0.0.1:9092", help="The SuperLink's host:port."),
    run_dir: Path = typer.Option(
        ..., "--run-dir", help="Run folder on the server machine; an existing one is resumed."
    ),
    config_file: Path | None = typer.Option(
        None, "--config", help="TOML file of run-config keys (those of pyproject.toml's tool.flwr.app.config table)."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="One run-config value, e.g. --set pretrain-rounds=5 (repeatable)."
    ),
    ca: Path | None = typer.Option(
        None, "--ca", help="The federation CA certificate (`cmdfed certs init`): connect with TLS."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback SuperLink without TLS."),
    verbose: bool = typer.Option(False, "--verbose", help="Also print Flower's own log lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's events as JSON at the end."),
) -> None:
    """Run federated pretraining then head fine-tuning on the sites connected to a SuperLink."""
    host, _ = split_address(superlink)
    require_loopback_or_insecure(host, insecure, "SuperLink", tls=ca is not None)
    config = run_config(config_file, settings, run_dir)
    with tempfile.TemporaryDirectory(prefix="cmdfed-federate-") as tmp:
        app_dir = stage_app(Path(tmp) / "cmdfed-app", config)
        env = flower_env(Path(tmp) / "flwr-home")
        write_connection(Path(env["FLWR_HOME"]), superlink, ca)
        run_id, events, tail = _stream_run(app_dir, env, verbose)
        status = _run_status(run_id, env)
    if as_json:
        emit({"run_id": run_id, "status": status, "events": events}, True)
    rounds = completed_rounds(run_id, status, events, tail)
    if rounds is None:
        console.print(
            "[yellow]warning[/]: the run's output stopped streaming before its end (Flower 1.42 gives up "
            f"streaming after one failed log upload); every round is recorded in {config.run_dir}"
        )
    if rounds == 0:  # e.g. every site's privacy budget was spent before round 1: the warning above says why
        console.print(
            f"[bold yellow]federated run ended without training a round[/]: no checkpoint in {config.run_dir}"
        )
        return
    done = f"{rounds} rounds, " if rounds is not None else ""
    console.print(f"[bold green]federated run completed[/]: {done}checkpoints in {config.run_dir}")


def completed_rounds(run_id: str, status: str, events: list[dict], tail: list[str]) -> int | None:
    """The rounds of a completed run (None when its output stopped short); an error for any other end.

    Flower's status decides: the ServerApp ends ``completed`` only when the run did (it raises
    otherwise). The events give the details, and may stop short: Flower 1.42 stops streaming
    a run's output for good after one failed log upload (a SuperLink whose SQLite state stays
    locked over 5 s, on a loaded machine, answers it with an error).
    """
    finished = next((e for e in reversed(events) if e["event"] in ("finish", "error")), None)
    if status != "finished:completed" or (finished is not None and finished.get("status") != "completed"):
        message = (finished or {}).get("message") or (finished or {}).get("error") or " | ".join(tail)
        raise CmdfedError(f"the federated run {run_id} ended as {status}: {message}")
    return None if finished is None else int(finished["rounds"])


def run_config(config_file: Path | None, settings: list[str], run_dir: Path) -> FederationConfig:
    from cmdfed.federation.config import FederationConfig

    values: dict[str, Any] = FederationConfig().to_run_config()
    if config_file is not None:
        try:
            values.update(tomllib.loads(config_file.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CmdfedError(f"cannot read run config {config_file}: {exc}") from exc
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep:
            raise CmdfedError(f"--set {setting!r} must be KEY=VALUE, e.g. --set pretrain-rounds=5")
        values[key.strip()] = _toml_value(text.strip())
    values["run-dir"] = str(run_dir.expanduser().absolute())
    return FederationConfig.from_run_config(values)


def stage_app(app_dir: Path, config: FederationConfig) -> Path:
    """A Flower app folder: the installed packages of the app's components and a pyproject with this run config."""
    for component in APP_TABLE["components"]:
        source = _component_package(component)
        (app_dir / source.name).mkdir(parents=True)
        for module in source.glob("*.py"):
            shutil.copy2(module, app_dir / source.name / module.name)
    pyproject = {
        "project": {
            "name": "cmdfed",
            "version": cmdfed.__version__,
            "description": "CMD federated training",
            "license": {"text": "Apache-2.0"},
        },
        "tool": {"flwr": {"app": {**APP_TABLE, "config": config.to_run_config()}}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app_dir


def load_component(component: str) -> Any:
    """The app's ``serverapp`` or ``clientapp`` object, loaded by its reference as Flower's SuperNode loads it."""
    module, _, attribute = APP_TABLE["components"][component].partition(":")
    return getattr(importlib.import_module(module), attribute)


def _component_package(component: str) -> Path:
    package = APP_TABLE["components"][component].split(".", 1)[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CmdfedError(
            f"the app's {component} package '{package}' is not installed; reinstall cmdfed (pip install -e .)"
        )
    return Path(spec.submodule_search_locations[0])


def write_connection(flwr_home: Path, superlink: str, ca: Path | None = None) -> None:
    """Flower's CLI connection to the SuperLink: TLS verified against ``ca``, or plaintext."""
    settings = (
        {"address": superlink, "insecure": True}
        if ca is None
        else {"address": superlink, "root-certificates": str(ca.absolute())}
    )
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: settings}}))


def _stream_run(app_dir: Path, env: dict[str, str], verbose: bool) -> tuple[str, list[dict], list[str]]:
    """Submit with ``flwr run --stream``; render events while they come. Returns (run id, events, last lines)."""
    command = [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    events: list[dict] = []
    tail: deque[str] = deque(maxlen=8)
    run_id = ""
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for raw in process.stdout:
            line = raw.rstrip("\n")
            if line.startswith("Successfully started run "):
                run_id = line.removeprefix("Successfully started run ").split()[0]
                console.print(f"submitted run {run_id}")
            position = line.find(EVENT_PREFIX)
            if position >= 0:
                try:
                    event = json.loads(line[position + len(EVENT_PREFIX) :])
                except json.JSONDecodeError:
                    continue
                events.append(event)
                render_event(event)
            else:
                if line.strip():
                    tail.append(line.strip())
                if verbose:
                    console.print(line, highlight=False, markup=False)
    if not run_id:
        raise CmdfedError(f"flwr run could not submit the app (exit code {process.returncode}): {' | '.join(tail)}")
    return run_id, events, list(tail)


def _run_status(run_id: str, env: dict[str, str]) -> str:
    command = [flower_executable("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    try:
        return str(json.loads(result.stdout)["runs"][0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError) as exc:
        raise CmdfedError(
            f"cannot read the status of run {run_id}: {(result.stdout + result.stderr).strip()[-300:]}"
        ) from exc


def render_event(event: dict) -> None:
    kind = event["event"]
    if kind == "start":
        rounds = ", ".join(f"{n} {phase}" for phase, n in event["rounds"].items())
        resumed = f", resuming after round {event['resumed_after']}" if event["resumed_after"] else ""
        console.print(f"run {event['run_id'][:8]}: {rounds} rounds{resumed}; checkpoints in {event['run_dir']}")
        if event.get("init"):
            init = event["init"]
            console.print(
                f"initial weights: {init['init']} (sha256 {init['sha256'][:12]}, heads {init['heads']})",
                highlight=False,
            )
    elif kind == "waiting":
        console.print(f"waiting for sites: {event['connected']} of {event['needed']} connected")
    elif kind == "round":
        metrics = event["metrics"]
        loss = metrics.get("train_loss")
        out.print(
            f"[bold]{event['phase']}[/] round {event['phase_round']}/{event['phase_rounds']} ({event['checkpoint']}): "
            f"{sum(s['status'] == 'trained' for s in event['sites'])}/{len(event['sites'])} sites, "
            + (f"loss {loss:.4f}, " if loss is not None else "")
            + f"{event['seconds']:.1f} s, sent {event['bytes_sent'] / 1e6:.2f} MB, received "
            f"{event['bytes_received'] / 1e6:.2f} MB"
        )
        for site in event["sites"]:
            if site["status"] == "trained":
                site_loss = site["metrics"].get("loss")
                out.print(
                    f"  {site['site']}: {site['n_examples']} tiles"
                    + (f", loss {site_loss:.4f}" if site_loss is not None else "")
                )
            else:
                out.print(f"  {site['site']}: [red]{site['status']}[/] {site['error'] or ''}", highlight=False)
        for line in evaluation_lines(metrics):
            out.print("  " + line, highlight=False)
    elif kind == "rejected":
        console.print(
            f"[yellow]{event['site']}: update rejected in {event['phase']} round {event['round']}[/]: {event['reason']}"
        )
    elif kind in ("warning", "evaluation_failed"):
        console.print(f"[yellow]warning[/]: {event.get('message') or event.get('error')}")
    elif kind == "error":
        console.print(f"[bold red]run failed[/]: {event['message']}", highlight=False)


# How a round's evaluation scores are shown, in this order (the rest follow under their own names).
SCORES = {"pq": "PQ", "mpq": "mPQ", "aji": "AJI", "dice": "Dice", "masked_mse": "masked MSE"}


def evaluation_lines(metrics: dict[str, Any]) -> list[str]:
    """A round's scores as ``cmdfed federate`` prints them: the server's central evaluation
    (``server-eval-store``) and the sites' federated one, each on a line of its own with PQ,
    AJI and Dice first, as the segmentation is judged by them."""
    lines = []
    for prefix, title in (("server_", "server evaluation"), ("eval_", "site evaluation")):
        found = {
            k.removeprefix(prefix): v
            for k, v in metrics.items()
            if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        tiles = found.pop("tiles", None)
        if not found:
            continue
        names = [k for k in SCORES if k in found] + sorted(k for k in found if k not in SCORES)
        where = f" on {int(tiles)} tiles" if tiles is not None else ""
        lines.append(f"{title}{where}: " + ", ".join(f"{SCORES.get(k, k)} {found[k]:.4f}" for k in names))
    return lines


def _toml_value(text: str) -> Any:
    """A TOML value (5, 0.1, true, "x"), or the text itself when it is none."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
