"""`cmdfed dashboard` becomes the right `streamlit run` (exec: stop signals reach Streamlit itself)
and passes the store and outputs on."""

from __future__ import annotations

import os
import sys

import pytest
from typer.testing import CliRunner

from cmdfed.cli import _add_role_commands, app
from dashboard import cli


def test_dashboard_runs_streamlit_headless_on_localhost(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, command, env: calls.append((command, env)) or sys.exit(0))
    _add_role_commands()
    result = CliRunner().invoke(
        app,
        [
            "dashboard",
            "--runs",
            str(tmp_path / "run"),
            "--outputs",
            str(tmp_path),
            "--port",
            "8600",
        ],
    )
    assert result.exit_code == 0, result.output
    ((command, env),) = calls
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"] and command[4].endswith(
        "dashboard/app.py"
    )
    options = dict(zip(command[5::2], command[6::2]))
    assert options == {
        "--server.headless": "true", "--browser.gatherUsageStats": "false",
        "--server.address": "127.0.0.1", "--server.port": "8600",
    }  # fmt: skip
    assert env["CMDFED_DASHBOARD_DB"] == str(tmp_path / "run" / "telemetry.db")
    assert env["CMDFED_DASHBOARD_OUTPUTS"] == str(tmp_path)


def test_db_and_host_options(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, command, env: calls.append((command, env)) or sys.exit(0))
    with pytest.raises(SystemExit) as done:
        cli.dashboard(
            db="postgresql+psycopg://db/telemetry",
            runs=cli.Path("ignored"),
            outputs=None,
            port=8501,
            host="0.0.0.0",
        )
    assert done.value.code == 0
    ((command, env),) = calls
    assert command[command.index("--server.address") + 1] == "0.0.0.0"
    assert (
        env["CMDFED_DASHBOARD_DB"] == "postgresql+psycopg://db/telemetry"
        and env["CMDFED_DASHBOARD_OUTPUTS"] == ""
    )
