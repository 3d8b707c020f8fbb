"""`cmdfed dashboard` becomes the right `streamlit run` (exec: stop signals reach Streamlit itself)
and passes the store and outputs on."""

from __future__ import annotations

import inspect
import os
import sys

import pytest
from typer.testing import CliRunner

from cmdfed.cli import _add_role_commands, app
from cmdfed.errors import CmdfedError
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
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"] and command[4].endswith("dashboard/app.py")
    options = dict(zip(command[5::2], command[6::2]))
    assert options == {
        "--server.headless": "true",
        "--browser.gatherUsageStats": "false",
        "--server.address": "127.0.0.1",
        "--server.port": "8600",
    }
    assert env["CMDFED_DASHBOARD_DB"] == str(tmp_path / "run" / "telemetry.db")
    assert env["CMDFED_DASHBOARD_OUTPUTS"] == str(tmp_path)
    assert env["CMDFED_DASHBOARD_FILES_ROOT"] == str(tmp_path.resolve())  # default: --outputs


def test_db_and_host_options(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, command, env: calls.append((command, env)) or sys.exit(0))
    with pytest.raises(SystemExit) as done:
        cli.dashboard(
            db="postgresql+psycopg://db/telemetry",
            runs=cli.Path("ignored"),
            outputs=None,
            files_root=None,
            port=8501,
            host="0.0.0.0",
        )
    assert done.value.code == 0
    ((command, env),) = calls
    assert command[command.index("--server.address") + 1] == "0.0.0.0"
    assert env["CMDFED_DASHBOARD_DB"] == "postgresql+psycopg://db/telemetry" and env["CMDFED_DASHBOARD_OUTPUTS"] == ""
    assert env["CMDFED_DASHBOARD_FILES_ROOT"] == str(tmp_path.resolve())  # default: here


def _invoke(args: list[str]):
    _add_role_commands()
    return CliRunner().invoke(app, ["dashboard", *args])


def test_files_root_must_be_a_folder_that_holds_the_outputs(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("started with bad options"))
    (tmp_path / "outputs").mkdir()
    (tmp_path / "slides").mkdir()
    result = _invoke(["--outputs", str(tmp_path / "outputs"), "--files-root", str(tmp_path / "slides")])
    assert isinstance(result.exception, CmdfedError)
    assert "is outside --files-root" in str(result.exception) and "give a --files-root that holds it" in str(
        result.exception
    )
    result = _invoke(["--files-root", str(tmp_path / "absent")])
    assert isinstance(result.exception, CmdfedError) and "is not a folder" in str(result.exception)


def test_host_help_warns_there_is_no_authentication():
    host = inspect.signature(cli.dashboard).parameters["host"].default
    assert "no authentication" in host.help and "reverse proxy" in host.help
