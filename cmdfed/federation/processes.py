"""Starting Flower's long-running processes (SuperLink, SuperNode) and waiting for them.

Plain subprocess handling shared by ``server/superlink.py`` and ``client/supernode.py``;
nothing here imports Flower. Each process gets:

* its own ``FLWR_HOME`` (Flower unpacks apps and keeps its files there), under the
  caller's folder, so two sites on one machine never share state;
* ``FLWR_TELEMETRY_ENABLED=0``: hospitals' machines do not report to Flower's servers;
* this interpreter's ``bin`` folder first on ``PATH``, because Flower launches its helper
  processes (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) by name;
* a session of its own, so stopping it also stops the helpers it started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cmdfed.addresses import LOOPBACK
from cmdfed.errors import CmdfedError

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log levels


def flower_env(flwr_home: Path) -> dict[str, str]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def flower_executable(name: str) -> str:
    """A Flower command installed beside this interpreter (the environment cmdfed runs in)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise CmdfedError(f"{name} is not installed beside {sys.executable}; install cmdfed with its flwr dependency")
    return str(path)


def start_process(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process's session (it and the helpers it started), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)
    except ProcessLookupError:
        pass


def wait_for_port(host: str, port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    """Return once ``host:port`` accepts connections; a process that exits first is an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CmdfedError(
                f"{Path(process.args[0]).name} exited with code {process.returncode}: {log_tail(log_path)}"
            )
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise CmdfedError(
        f"{Path(process.args[0]).name} did not listen on {host}:{port} within {timeout:.0f} s: {log_tail(log_path)}"
    )


def log_tail(log_path: Path, lines: int = 5) -> str:
    """The end of a process's log, or Flower's exit report in it (``Exit Code: N`` and its reason),
    which a web server's shutdown lines would otherwise push out of view."""
    try:
        text = [
            clean
            for line in log_path.read_text(errors="replace").splitlines()
            if (clean := ANSI_ESCAPE.sub("", line).strip())
        ]
    except OSError:
        return f"no log at {log_path}"
    exits = [k for k, line in enumerate(text) if "Exit Code:" in line]
    shown = text[exits[-1] : exits[-1] + lines] if exits else text[-lines:]
    return " | ".join(shown) or f"{log_path} is empty"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for tests and default local set-ups)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def federate_command(superlink: str, run_dir: str | Path, settings: Sequence[str]) -> list[str]:
    """The ``cmdfed`` arguments that start a federated run on ``superlink`` (host:port), its
    state in ``run_dir``, each of ``settings`` ("key=value") given with ``--set``."""
    sets = [arg for setting in settings for arg in ("--set", setting)]
    return ["federate", "--superlink", superlink, "--run-dir", str(run_dir), *sets]


CONNECT_WITH_TLS = "pass --ca with the federation's ca.crt (made on the server by `cmdfed certs init`)"
SERVE_TLS = "pass --certs DIR made by `cmdfed certs init DIR --host THIS-HOST`"


def require_loopback_or_insecure(
    host: str, insecure: bool, what: str, tls: bool = False, how: str = CONNECT_WITH_TLS
) -> None:
    """Plaintext is for loopback; off it, TLS, or ``--insecure`` given explicitly (with a warning).
    ``how``: how this command is given TLS."""
    if tls or host in LOOPBACK:
        return
    if not insecure:
        raise CmdfedError(
            f"{what} {host} is not this machine and TLS is not configured, so weights would travel "
            f"unencrypted; for TLS {how}, or use 127.0.0.1, or pass --insecure on a network you trust"
        )
    print(
        f"cmdfed: warning: {what} {host} without TLS: weights and metrics travel unencrypted (--insecure)",
        file=sys.stderr,
        flush=True,
    )


def serve_in_foreground(process: subprocess.Popen, log_path: Path, companions: Sequence[subprocess.Popen] = ()) -> None:
    """Wait on a started Flower process until it exits, Ctrl-C, or SIGTERM; then stop it.

    ``companions`` are helpers it needs (a SuperNode's ClientApp launcher): the first of them
    all to exit stops the rest, and a companion exiting on its own is an error too. The
    processes run in sessions of their own (see :func:`start_process`), so a signal to this
    command would not reach them: SIGTERM is turned into an orderly stop here.
    """

    def terminate(signum, frame):
        raise KeyboardInterrupt

    watched = [process, *companions]
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        while (ended := next((p for p in watched if p.poll() is not None), None)) is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        ended = None
    finally:
        for each in reversed(watched):
            stop_process(each)
        signal.signal(signal.SIGTERM, previous)
    if ended is not None and (ended.returncode != 0 or ended is not process):
        raise CmdfedError(f"{_name(ended)} stopped with code {ended.returncode}: {log_tail(log_path)}")


def _name(process: subprocess.Popen) -> str:
    """The program's name, or the module's for ``python -m MODULE``."""
    args = list(process.args)
    return args[2] if len(args) > 2 and args[1] == "-m" else Path(args[0]).name
