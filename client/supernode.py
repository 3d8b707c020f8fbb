"""The SuperNode process: a site's connection to the SuperLink, running the ClientApp on demand.

The site's settings travel as Flower node config (``SiteSettings.to_node_config``); the
SuperNode keeps its Flower files in ``WORK_DIR/flwr-home`` and logs to
``WORK_DIR/supernode.log``. Flower's SuperNode installs no runtime dependencies unless
``--allow-runtime-dependency-installation`` is given, which cmdfed never does.

With ``ca`` (the federation CA's certificate, ``cmdfed certs init``) the connection is TLS
and the server is verified against it; without, plaintext (loopback, or ``--insecure``).
With ``key`` (``cmdfed client keygen``) the SuperNode authenticates with its private key;
the server must have registered the public key (``cmdfed server register-site``).

Isolation: how each message's ClientApp runs. ``subprocess`` (Flower's default): the
SuperNode's own ``flower-superexec`` starts a fresh ``flwr-clientapp`` per message, which
imports torch, Flower and cmdfed again every time. ``process``: the SuperNode starts no
executor; ``client.launcher``, started and stopped with it, imports all that once and
forks a process per message that runs Flower's ClientApp runtime (needs fork(); tested on
Linux). Its output goes to the same log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cmdfed.errors import CmdfedError
from cmdfed.federation.processes import (
    flower_env,
    flower_executable,
    free_port,
    log_tail,
    start_process,
    stop_process,
    wait_for_port,
)
from cmdfed.federation.site import SiteSettings

ISOLATION_MODES = ("subprocess", "process")


@dataclass
class SuperNode:
    site: SiteSettings
    superlink: str  # host:port of the SuperLink
    runtime_port: int = 0  # the SuperNode's local API for its ClientApp processes; 0 = any free port
    ca: Path | None = None  # the federation CA certificate: TLS
    key: Path | None = None  # the site's private key: SuperNode authentication
    isolation: str = "subprocess"  # subprocess: a fresh flwr-clientapp per message; process: client.launcher forks one
    process: subprocess.Popen | None = field(default=None, repr=False)
    launcher: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.site.work_dir / "supernode.log"

    def command(self) -> list[str]:
        transport = ["--insecure"] if self.ca is None else ["--root-certificates", str(self.ca)]
        auth = [] if self.key is None else ["--auth-supernode-private-key", str(self.key)]
        return [
            flower_executable("flower-supernode"),
            *transport,
            *auth,
            "--superlink",
            self.superlink,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.runtime_port),
            "--node-config",
            self.site.to_node_config(),
            "--isolation",
            self.isolation,
        ]

    @property
    def ready_file(self) -> Path:
        return self.site.work_dir / "launcher.ready"

    def launcher_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "client.launcher",
            "--runtime-api-address",
            f"127.0.0.1:{self.runtime_port}",
            "--supernode-pid",
            str(self.process.pid),
            "--ready-file",
            str(self.ready_file),
        ]

    @property
    def processes(self) -> list[subprocess.Popen]:
        """What must keep running for this site to train: the SuperNode, and its launcher."""
        return [p for p in (self.process, self.launcher) if p is not None]

    def start(self, timeout: float = 60.0) -> SuperNode:
        if self.isolation not in ISOLATION_MODES:
            raise CmdfedError(f"isolation must be one of {', '.join(ISOLATION_MODES)}, got {self.isolation!r}")
        if self.isolation == "process" and not hasattr(os, "fork"):
            raise CmdfedError(
                "isolation process forks a process per message; this system has no fork(), use subprocess"
            )
        self.site.work_dir.mkdir(parents=True, exist_ok=True)
        self.runtime_port = self.runtime_port or free_port()
        env = flower_env(self.site.work_dir / "flwr-home")
        self.process = start_process(self.command(), env, self.log_path)
        try:
            try:
                wait_for_port("127.0.0.1", self.runtime_port, self.process, self.log_path, timeout)
            except CmdfedError as exc:
                if self.key is not None and "Failed to activate SuperNode" in str(exc):
                    raise CmdfedError(
                        f"{exc} -- if the SuperLink requires site authentication, this site's public key "
                        "must be registered first: `cmdfed server register-site KEY.pub --name NAME`"
                    ) from exc
                raise
            if self.isolation == "process":
                self.ready_file.unlink(missing_ok=True)
                self.launcher = start_process(self.launcher_command(), env, self.log_path)
                self._wait_for_launcher(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_launcher(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.launcher.poll() is not None:
                raise CmdfedError(
                    f"the ClientApp launcher exited with code {self.launcher.returncode}: {log_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise CmdfedError(
                    f"the ClientApp launcher was not ready within {timeout:.0f} s: {log_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        for process in reversed(self.processes):  # the launcher and its running ClientApps first
            stop_process(process)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
