"""``cmdfed client start`` / ``cmdfed server start`` refuse what cannot work, before starting anything."""

import subprocess
import sys

from cmdfed.data.store import SiteStore


def cmdfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmdfed", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_client_start_refuses_a_missing_store(tmp_path):
    result = cmdfed("client", "start", "--store", str(tmp_path / "nowhere.zarr"), "--name", "site-a")
    assert result.returncode == 1 and "nowhere.zarr" in result.stderr and "Traceback" not in result.stderr


def test_client_start_refuses_a_store_without_tiles(tmp_path):
    SiteStore.create(tmp_path / "empty.zarr", tile_size=64)
    result = cmdfed("client", "start", "--store", str(tmp_path / "empty.zarr"), "--name", "site-a")
    assert result.returncode == 1 and "has no tiles" in result.stderr


def test_client_start_refuses_a_name_that_is_a_path(synthetic_store):
    result = cmdfed("client", "start", "--store", str(synthetic_store), "--name", "../site-a")
    assert result.returncode == 1 and "must not be a path" in " ".join(result.stderr.split())


def test_plaintext_off_loopback_needs_insecure(tmp_path):
    result = cmdfed("server", "start", "--run-dir", str(tmp_path), "--host", "10.1.2.3")
    assert result.returncode == 1 and "--insecure" in result.stderr
