"""The SuperNode process: a site's connection to the SuperLink, running the ClientApp on demand.

The site's settings travel as Flower node config (``SiteSettings.to_node_config``); the
SuperNode keeps its Flower files in ``WORK_DIR/flwr-home`` and logs to
``WORK_DIR/supernode.log``. Flower's SuperNode installs no runtime dependencies unless
``--allow-runtime-dependency-installation`` is given, which cmdfed never does.

With ``ca`` (the federation CA's certificate, ``cmdfed certs init``) the connection is TLS
and the server is verified against it; without, plaintext (loopback, or ``--insecure``).
With ``key`` (``cmdfed client keygen``) the SuperNode authenticates with its private key;
the server must have registered the public key (``cmdfed server register-site``).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cmdfed.federation.processes import (
    flower_env,
    flower_executable,
    free_port,
    start_process,
    stop_process,
    wait_for_port,
)
from cmdfed.federation.site import SiteSettings


@dataclass
class SuperNode:
    site: SiteSettings
    superlink: str  # host:port of the SuperLink
    runtime_port: int = 0  # the SuperNode's local API for its ClientApp processes; 0 = any free port
    ca: Path | None = None  # the federation CA certificate: TLS
    key: Path | None = None  # the site's private key: SuperNode authentication
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.site.work_dir / "supernode.log"

    def command(self) -> list[str]:
        transport = ["--insecure"] if self.ca is None else ["--root-certificates", str(self.ca)]
        auth = [] if self.key is None else ["--auth-supernode-private-key", str(self.key)]
        return [
            flower_executable("flower-supernode"), *transport, *auth, "--superlink", self.superlink,
            "--host", "127.0.0.1", "--port", str(self.runtime_port), "--node-config", self.site.to_node_config(),
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> SuperNode:
        self.site.work_dir.mkdir(parents=True, exist_ok=True)
        self.runtime_port = self.runtime_port or free_port()
        self.process = start_process(self.command(), flower_env(self.site.work_dir / "flwr-home"), self.log_path)
        try:
            wait_for_port("127.0.0.1", self.runtime_port, self.process, self.log_path, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> SuperNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
