"""The SuperNode's isolation modes: ``process`` runs each message through cmdfed's warm launcher
(``client/launcher.py``) instead of a fresh ``flwr-clientapp``, and trains like the default."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from client.supernode import SuperNode
from cmdfed.data.synth import write_synthetic_store
from cmdfed.errors import CmdfedError
from cmdfed.federation.processes import federate_command, free_port, serve_in_foreground, start_process
from cmdfed.federation.site import SiteSettings
from cmdfed.telemetry import TelemetryStore
from server.superlink import SuperLink


def test_an_unknown_isolation_is_refused_before_anything_starts(tmp_path):
    node = SuperNode(
        SiteSettings(tmp_path / "s.zarr", "site-a", tmp_path / "work"), "127.0.0.1:9092", isolation="thread"
    )
    with pytest.raises(CmdfedError, match="isolation must be one of subprocess, process"):
        node.start()
    assert node.process is None and not (tmp_path / "work").exists()


def test_a_launcher_that_exits_stops_the_supernode_and_is_reported(tmp_path):
    log = tmp_path / "supernode.log"
    supernode = start_process([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), log)
    launcher = start_process(
        [sys.executable, "-m", "client.launcher", "--bogus"], dict(os.environ), log
    )  # exits with a usage error
    with pytest.raises(CmdfedError, match="client.launcher stopped with code 2"):
        serve_in_foreground(supernode, log, companions=[launcher])
    assert supernode.poll() is not None


@pytest.mark.slow
def test_a_supernode_in_process_isolation_completes_a_round(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    write_synthetic_store(tmp_path / "site.zarr", 4, tile_size=64)
    site = SiteSettings(tmp_path / "site.zarr", "site-a", tmp_path / "work", device="cpu")
    run_dir = tmp_path / "run"
    superlink = SuperLink(run_dir, port=free_port()).start()
    node = SuperNode(site, superlink.address, isolation="process")
    try:
        node.start()
        assert node.launcher.poll() is None and node.ready_file.exists()
        settings = [
            "pretrain-rounds=1",
            "finetune-rounds=0",
            "local-steps=1",
            "batch-size=2",
            "min-sites=1",
            "eval-every=0",
            "augment=false",
            "round-timeout-s=300",
        ]
        command = [sys.executable, "-m", "cmdfed", *federate_command(superlink.address, run_dir, settings)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
    finally:
        node.stop()
        superlink.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.launcher.poll() is not None and node.process.poll() is not None  # stopped together
    log = node.log_path.read_text()
    assert (
        "cmdfed launcher: task" in log and "Starting Flower SuperExec" not in log
    )  # the launcher ran it, no flwr-clientapp
    with TelemetryStore.open(run_dir / "telemetry.db", readonly=True) as store:
        (run,) = store.runs()
        assert [(r["site"], r["status"]) for r in store.site_rounds(run["run_id"])] == [("site-a", "trained")]
