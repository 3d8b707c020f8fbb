"""`cmdfed server telemetry`: workstation tokens, and the telemetry server as a real process on
127.0.0.1 serving HTTPS with `cmdfed certs init` certificates."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import ssl
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cmdfed.errors import CmdfedError
from cmdfed.telemetry import TelemetryStore
from server.certs import write_certificates
from server.telemetry import commands


def telemetry(*args: str):
    """`cmdfed server telemetry ARGS` in this process (a CmdfedError is result.exception)."""
    return CliRunner().invoke(commands, list(args))


def refused(result, message: str) -> bool:
    return isinstance(result.exception, CmdfedError) and message in str(result.exception)


def test_add_workstation_shows_the_token_once_and_keeps_only_its_hash(tmp_path):
    tokens = tmp_path / "workstations.json"
    added = telemetry("add-workstation", "scanner-1", "--tokens", str(tokens))
    assert added.exit_code == 0, added.output
    token = added.stdout.strip()
    assert len(token) >= 40 and token not in tokens.read_text()
    entry = json.loads(tokens.read_text())["workstations"]["scanner-1"]
    assert entry["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert refused(telemetry("add-workstation", "scanner-1", "--tokens", str(tokens)), "pass --replace")

    token_file = tmp_path / "scanner-2.token"
    written = telemetry("add-workstation", "scanner-2", "--tokens", str(tokens), "--token-out", str(token_file))
    assert written.exit_code == 0, written.output
    assert token_file.read_text().strip() not in written.output
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert refused(telemetry("add-workstation", "../etc", "--tokens", str(tokens)), "workstation name")

    assert telemetry("remove-workstation", "scanner-1", "--tokens", str(tokens)).exit_code == 0
    assert set(json.loads(tokens.read_text())["workstations"]) == {"scanner-2"}
    assert refused(
        telemetry("remove-workstation", "scanner-1", "--tokens", str(tokens)), "has no workstation 'scanner-1'"
    )


def test_a_token_file_that_cannot_be_written_leaves_no_token_behind(tmp_path):
    tokens = tmp_path / "workstations.json"
    (tmp_path / "not-a-folder").write_text("")
    failed = telemetry(
        "add-workstation", "scanner-1", "--tokens", str(tokens), "--token-out", str(tmp_path / "not-a-folder" / "t")
    )
    assert refused(failed, "cannot write the token file") and "choose another --token-out" in str(failed.exception)
    assert not tokens.exists()  # no hash of a token nobody holds
    token_file = tmp_path / "scanner-1.token"
    again = telemetry(
        "add-workstation", "scanner-1", "--tokens", str(tokens), "--token-out", str(token_file)
    )  # no --replace
    assert again.exit_code == 0, again.output
    token = token_file.read_text().strip()
    assert (
        json.loads(tokens.read_text())["workstations"]["scanner-1"]["sha256"]
        == hashlib.sha256(token.encode()).hexdigest()
    )
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600


def test_serve_refuses_plaintext_off_loopback_and_says_what_is_missing(tmp_path):
    db, tokens = str(tmp_path / "t.db"), str(tmp_path / "w.json")
    assert refused(telemetry("serve", "--listen", "10.1.2.3:9093", "--db", db, "--tokens", tokens), "pass --insecure")
    assert refused(
        telemetry("serve", "--listen", "127.0.0.1:0", "--db", db, "--tokens", tokens), "add-workstation NAME --tokens"
    )
    assert refused(
        telemetry("serve", "--db", db, "--tokens", tokens, "--certs", str(tmp_path / "none")), "lacks ca.crt"
    )
    assert not (tmp_path / "t.db").exists()


@pytest.mark.slow
def test_serve_over_tls_records_known_workstations_only_until_sigterm(tmp_path):
    certs, tokens, db = tmp_path / "certs", tmp_path / "workstations.json", tmp_path / "telemetry.db"
    write_certificates(certs, ["127.0.0.1"])
    token = telemetry("add-workstation", "scanner-1", "--tokens", str(tokens)).stdout.strip()
    command = [
        sys.executable,
        "-m",
        "cmdfed",
        "server",
        "telemetry",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        str(db),
        "--tokens",
        str(tokens),
        "--certs",
        str(certs),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started = None
        while started is None:
            line = process.stderr.readline()
            assert line, "the telemetry server exited before listening"
            started = re.search(r"listening on 127\.0\.0\.1:(\d+) \(HTTPS", line)
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        body = json.dumps(
            {"schema": 1, "reports": [{"kind": "heartbeat", "at": 1_700_000_000.0, "backend": "tensorrt", "gpu": "L4"}]}
        )

        def post(token: str) -> tuple[int, dict]:
            connection = http.client.HTTPSConnection("127.0.0.1", int(started.group(1)), context=context, timeout=30)
            try:
                connection.request(
                    "POST",
                    "/v1/reports",
                    body,
                    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        assert post("guess")[0] == 401
        assert post(token) == (200, {"recorded": 1, "workstation": "scanner-1"})
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    [beat] = TelemetryStore.open(db, readonly=True).heartbeats()
    assert (beat["workstation"], beat["backend"], beat["gpu"]) == ("scanner-1", "tensorrt", "L4")
