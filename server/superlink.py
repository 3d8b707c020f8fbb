"""The SuperLink process: Flower's coordinator that SuperNodes connect to and runs are sent to.

One HTTP port carries everything in Flower 1.42 (fleet, control and runtime APIs). Its state
(registered nodes, runs, messages) lives in ``RUN_DIR/superlink/state.db`` rather than in
memory, so a restarted SuperLink still knows its sites and its runs, and its log in
``RUN_DIR/superlink/superlink.log``. Runtime dependency installation is off: the app runs in
the environment cmdfed is installed in, never in one pip-installed at run time. It runs
through ``server.superlink_process``, which gives the state database a longer lock wait.

Security: with ``certs`` (a ``cmdfed certs init`` folder) the SuperLink serves TLS on its
port (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``); without, it runs ``--insecure``
(the CLI allows that off loopback only when asked). With ``site_auth`` it starts with
``--enable-supernode-auth``: a SuperNode joins only if its public key was registered
(``cmdfed server register-site``) and it signs its requests with the private key.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cmdfed.federation.processes import (
    flower_env,
    start_process,
    stop_process,
    wait_for_port,
)
from server.certs import server_tls_files


@dataclass
class SuperLink:
    run_dir: Path
    host: str = "127.0.0.1"
    port: int = 9092
    certs: Path | None = None  # a `cmdfed certs init` folder: TLS
    site_auth: bool = False  # only registered SuperNode keys may join
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def state_dir(self) -> Path:
        return Path(self.run_dir).absolute() / "superlink"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "superlink.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.certs is None:
            transport = ["--insecure"]
        else:
            ca, cert, key = server_tls_files(Path(self.certs))
            transport = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        return [
            sys.executable,
            "-m",
            "server.superlink_process",
            *transport,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--database",
            str(self.state_dir / "state.db"),
            "--disable-runtime-dependency-installation",
            *(["--enable-supernode-auth"] if self.site_auth else []),
        ]

    def start(self, timeout: float = 60.0) -> SuperLink:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.process = start_process(self.command(), flower_env(self.state_dir / "flwr-home"), self.log_path)
        try:
            wait_for_port(self.host, self.port, self.process, self.log_path, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
