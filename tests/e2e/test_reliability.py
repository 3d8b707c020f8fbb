"""Sites that fail while a federated run goes on, with real processes on 127.0.0.1.

One run of three pretraining rounds on a SuperLink and four SuperNodes, each scenario in
the rounds where it can be told apart from the others:

* site-3's store is damaged after its SuperNode started: it fails round 1 with the store's
  own words and no path, and the others train;
* in round 2, site-2's SuperNode is killed (SIGKILL, helpers included) as its round
  begins: the round ends once the SuperLink has declared it offline (missed heartbeats),
  well before the round timeout; site-3's admin stops its SuperNode (SIGTERM) at the same
  point and re-imports the store. Both are started again with the same settings, get new
  Flower node ids, and train in round 3 under their names;
* a second SuperNode started as site-1 is refused in every round, recorded under its node
  id and not as site-1, so site-1's telemetry and updates stay one node's.

Every ClientApp message costs a process start (~15 s on a small machine), so the scenarios
share one run rather than paying for a run each. Sites are stopped only when the server is
not about to collect a reply from them: Flower's SuperLink answers a message whose node has
gone offline with NODE_UNAVAILABLE even when the node's reply is already stored.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.supernode import SuperNode
from cmdfed.data.synth import write_synthetic_store
from cmdfed.federation.checkpoints import last_complete_round
from cmdfed.federation.processes import federate_command, free_port
from cmdfed.federation.site import SiteSettings
from server.superlink import SuperLink

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # four sites' ClientApps on two cores: minutes

ROUND_TIMEOUT_S = 300
SETTINGS = [
    "pretrain-rounds=3",
    "finetune-rounds=0",
    "local-steps=1",
    "batch-size=2",
    "eval-tiles=2",
    "min-sites=4",
    'classes="epithelial,lymphocyte,stromal"',
    f"round-timeout-s={ROUND_TIMEOUT_S}",
    "augment=false",
    "eval-every=0",
]


def federate(superlink: SuperLink, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cmdfed", *federate_command(superlink.address, run_dir, SETTINGS)]


def store(tmp_path: Path, k: int) -> Path:
    """Site k's store, as `cmdfed data` would (re-)import it: 8 synthetic tiles in one shard."""
    path = tmp_path / f"site{k}.zarr"
    write_synthetic_store(path, 8, site=k, seed=k, tile_size=64, overwrite=True)
    return path


def damage_shard(store_path: Path) -> None:
    """Overwrite the back half of the image shard (its index included), as a failing disk would."""
    shard = store_path / "images" / "c" / "0" / "0" / "0" / "0"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))


def log_count(node: SuperNode, text: str) -> int:
    return node.log_path.read_text(errors="replace").count(text) if node.log_path.exists() else 0


def wait_until(condition, what: str, run: subprocess.Popen, timeout: float = 450) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"federate ended before {what}:\n{run.communicate()[0]}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.3)


def node_id(node: SuperNode) -> int:
    match = re.search(r"SuperNode ID: (\d+)", node.log_path.read_text(errors="replace"))
    assert match, f"no node id in {node.log_path}"
    return int(match.group(1))


def kill(node: SuperNode) -> None:
    """SIGKILL the SuperNode and the helpers it started (its session), as a crash or power cut would."""
    os.killpg(node.process.pid, signal.SIGKILL)
    node.process.wait(30)


def test_run_survives_a_killed_site_a_restarted_site_a_damaged_store_and_a_duplicate_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # the user's Flower config stays untouched
    sites = {k: SiteSettings(store(tmp_path, k), f"site-{k}", tmp_path / f"work{k}", device="cpu") for k in (1, 2, 3)}
    duplicate = SiteSettings(store(tmp_path, 4), "site-1", tmp_path / "work-duplicate", device="cpu")
    run_dir = tmp_path / "run"
    superlink = SuperLink(run_dir, port=free_port()).start()
    nodes = {k: SuperNode(site, superlink.address).start() for k, site in sites.items()}
    first, twin = nodes[1], SuperNode(duplicate, superlink.address).start()
    started = [*nodes.values(), twin]
    damage_shard(sites[3].store)  # after its SuperNode started: nothing checked it since
    try:
        run = subprocess.Popen(
            federate(superlink, run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        wait_until(lambda: (run_dir / "round-0001").exists(), "round 1", run)

        # Round 2, as the messages reach the sites: site-2 crashes, site-3 is stopped to repair its store.
        def both_received() -> bool:
            return all(log_count(nodes[k], "Receiving: train message") >= 2 for k in (2, 3))

        wait_until(both_received, "sites 2 and 3 receiving round 2", run)
        kill(nodes[2])
        killed_at = time.time()
        nodes[3].stop()
        store(tmp_path, 3)  # re-imported from its source
        for k in (2, 3):  # the site admins start them again, same settings
            nodes[k] = SuperNode(sites[k], superlink.address).start()
            started.append(nodes[k])

        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, output
    finally:
        for node in started:
            node.stop()
        superlink.stop()
    assert "federated run completed" in output

    last = last_complete_round(run_dir)
    assert (last.round, last.phase) == (3, "pretrain")
    db = sqlite3.connect(run_dir / "telemetry.db")
    assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    rounds = db.execute("SELECT round, n_sites, n_failed, finished_at FROM rounds ORDER BY round").fetchall()
    assert [r[:3] for r in rounds] == [(1, 4, 2), (2, 4, 3), (3, 4, 1)]

    rows = db.execute("SELECT round, site, status, error FROM site_rounds ORDER BY round, site").fetchall()
    named = [(r[0], r[1], r[2]) for r in rows if not r[1].startswith("node-")]
    assert named == [
        (1, "site-1", "trained"),
        (1, "site-2", "trained"),
        (1, "site-3", "failed"),
        (2, "site-1", "trained"),
        (2, "site-2", "failed"),
        (2, "site-3", "failed"),
        (3, "site-1", "trained"),
        (3, "site-2", "trained"),
        (3, "site-3", "trained"),
    ]
    errors = {(r[0], r[1]): r[3] for r in rows}

    # The damaged store: the site's own words, no path (the store's folder name at most).
    assert "damaged" in errors[1, "site-3"] and "site3.zarr" in errors[1, "site-3"], errors[1, "site-3"]
    assert "/" not in errors[1, "site-3"] and str(tmp_path) not in errors[1, "site-3"], errors[1, "site-3"]

    # Gone mid-round: declared offline by the SuperLink, not waited for until the round timeout.
    assert "went offline" in errors[2, "site-2"] and "went offline" in errors[2, "site-3"], errors
    assert rounds[1][3] - killed_at < ROUND_TIMEOUT_S / 2, (
        f"round 2 ended {rounds[1][3] - killed_at:.0f} s after the kill"
    )

    # The duplicate: one node holds the name; the other is refused in every round under its node id.
    twin_rows = [r for r in rows if r[1].startswith("node-")]
    assert [r[0] for r in twin_rows] == [1, 2, 3] and len({r[1] for r in twin_rows}) == 1, twin_rows
    assert int(twin_rows[0][1].removeprefix("node-")) in {node_id(first), node_id(twin)}
    assert all(r[2] == "failed" and "already takes part as site 'site-1'" in r[3] for r in twin_rows), twin_rows
