"""Workstation tokens for the telemetry server: issued once, stored only as sha256 hashes.

The operator issues a token per workstation (``cmdfed server telemetry add-workstation
NAME``); the token is shown or written once and never stored on the server. The server's
tokens file is JSON::

    {"schema_version": 1, "workstations": {"NAME": {"sha256": "<hex>", "added_at": "<ISO time>"}}}

A leaked tokens file gives nobody a token: the tokens are 256 random bits, so their hashes
cannot be reversed. The running server re-reads the file when it changes, so adding or
removing a workstation takes effect without a restart.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from cmdfed.atomic import atomic_path, write_json_atomic
from cmdfed.errors import CmdfedError

SCHEMA_VERSION = 1
TOKEN_BYTES = 32
WORKSTATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_workstation_name(name: str) -> str:
    if not WORKSTATION_NAME.fullmatch(name):
        raise CmdfedError(
            f"workstation name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class WorkstationTokens:
    """The server's tokens file: which workstation a token belongs to, kept current as the file changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the file last read
        self._names_by_hash: dict[str, str] = {}

    # -- the operator's side

    def read(self) -> dict[str, dict]:
        """{name: {sha256, added_at}}; a missing file is no workstations."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            workstations = data["workstations"]
            if data.get("schema_version") != SCHEMA_VERSION or not isinstance(workstations, dict):
                raise ValueError(f"unknown layout (schema_version {data.get('schema_version')!r})")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CmdfedError(
                f"{self.path} is not a readable workstation tokens file ({exc}); "
                "give the file `cmdfed server telemetry add-workstation` writes"
            ) from exc
        return workstations

    def add(self, name: str, *, replace: bool = False, deliver: Callable[[str], None] | None = None) -> str:
        """Issue a token for ``name`` and return it; only its hash is written.

        ``deliver`` is called with the token *before* its hash is saved (e.g. to write the
        workstation's token file): if it fails, nothing is saved, so the token is never
        admitted without anyone holding it, and a rerun needs no --replace."""
        check_workstation_name(name)
        workstations = self.read()
        if name in workstations and not replace:
            raise CmdfedError(
                f"workstation {name} already has a token in {self.path}; pass --replace to issue a new one "
                "(its old token then stops working)"
            )
        token = secrets.token_urlsafe(TOKEN_BYTES)
        if deliver is not None:
            deliver(token)
        added_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        workstations[name] = {"sha256": token_sha256(token), "added_at": added_at}
        try:
            self._write(workstations)
        except OSError as exc:
            raise CmdfedError(
                f"cannot write {self.path} ({exc.strerror or exc}): the token for {name} was not recorded and will not "
                "be accepted; fix the problem and rerun the command"
            ) from exc
        return token

    def remove(self, name: str) -> None:
        workstations = self.read()
        if name not in workstations:
            known = ", ".join(sorted(workstations)) or "none"
            raise CmdfedError(f"{self.path} has no workstation {name!r} (it has: {known})")
        del workstations[name]
        self._write(workstations)

    def _write(self, workstations: dict[str, dict]) -> None:
        write_json_atomic(self.path, {"schema_version": SCHEMA_VERSION, "workstations": workstations})

    # -- the server's side

    def workstation_for(self, token: str) -> str | None:
        """The workstation ``token`` was issued for, or None; re-reads the file if it changed."""
        with self._lock:
            self._refresh()
            return self._names_by_hash.get(token_sha256(token))

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return
        workstations = self.read()  # raises on a damaged file: then no token is accepted
        self._names_by_hash = {entry["sha256"]: name for name, entry in workstations.items()}
        self._seen = seen


def write_token_file(path: str | Path, token: str) -> None:
    """The token for a workstation's ``--report-token``: readable by its owner only, written atomically."""
    try:
        with atomic_path(path) as tmp:
            os.chmod(tmp, 0o600)  # before writing: the token is a credential even for a moment
            tmp.write_text(token + "\n")
    except OSError as exc:
        raise CmdfedError(
            f"cannot write the token file {path} ({exc.strerror or exc}); choose another --token-out"
        ) from exc


def read_token_file(path: str | Path) -> str:
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CmdfedError(
            f"cannot read the telemetry token {path} ({exc.strerror}); the federation operator makes it with "
            "`cmdfed server telemetry add-workstation NAME --token-out FILE`"
        ) from exc
    if not token or any(c.isspace() for c in token):
        raise CmdfedError(
            f"{path} does not hold a telemetry token (one line, no spaces); ask the federation operator for it"
        )
    return token
