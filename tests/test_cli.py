"""The `cmdfed` command as a user runs it: a real subprocess, exit codes and output."""

import json
import subprocess
import sys

import pytest


def cmdfed(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmdfed", *args], capture_output=True, text=True, cwd=cwd)


def command_paths() -> list[list[str]]:
    from cmdfed.cli import _add_role_commands, app
    import typer.main

    _add_role_commands()
    root = typer.main.get_command(app)
    paths = []

    def walk(cmd, prefix):
        paths.append(prefix)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, prefix + [name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "cmdfed")
def test_help_on_every_level(path):
    result = cmdfed(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_synth_info_subset_json(tmp_path):
    store = tmp_path / "s.zarr"
    assert cmdfed("data", "synth", str(store), "--n", "6", "--tile", "64", "--site", "2").returncode == 0
    info = json.loads(cmdfed("data", "info", str(store), "--json").stdout)
    assert info["tiles"] == 6 and info["labelled_fraction"] == 1.0 and info["tile_size"] == 64
    result = cmdfed("data", "subset", str(store), str(tmp_path / "sub.zarr"), "--fraction", "0.5", "--json")
    assert json.loads(result.stdout)["tiles"] == 3


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    result = cmdfed("data", "info", str(tmp_path / "missing.zarr"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in result.stderr
    debug = cmdfed("--debug", "data", "info", str(tmp_path / "missing.zarr"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_usage_errors_exit_2():
    result = cmdfed("data", "synth")
    assert result.returncode == 2 and "Missing argument" in result.stderr and "internal error" not in result.stderr


def test_unknown_import_format(tmp_path):
    result = cmdfed("data", "import", "nope", str(tmp_path), str(tmp_path / "s.zarr"))
    assert result.returncode == 1 and "unknown format 'nope'" in result.stderr
