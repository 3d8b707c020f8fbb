"""A federated run with real processes on 127.0.0.1: a SuperLink, three SuperNodes (one of
them with a store that has gone missing), ``cmdfed federate`` as a user runs it, and a
SuperLink killed between rounds and restarted: the run resumes from its last complete round."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from client.supernode import SuperNode
from cmdfed.data.synth import write_synthetic_store
from cmdfed.federation.checkpoints import last_complete_round
from cmdfed.federation.processes import federate_command, free_port
from cmdfed.federation.site import SiteSettings
from cmdfed.inference.segment import load_model
from server.superlink import SuperLink

pytestmark = pytest.mark.slow

SETTINGS = [
    "pretrain-rounds=1",
    "finetune-rounds=1",
    "local-steps=1",
    "batch-size=2",
    "eval-tiles=2",
    "min-sites=3",
    'classes="epithelial,lymphocyte,stromal"',
    "round-timeout-s=300",
    "augment=false",
    "eval-every=0",  # evaluation messages are covered in process (tests/client); each exchange costs ~15 s here
]


def federate(superlink: SuperLink, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cmdfed", *federate_command(superlink.address, run_dir, SETTINGS)]


def wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"federate ended early:\n{process.communicate()[0]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout:.0f} s"
        time.sleep(0.3)


@pytest.fixture
def sites(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # the user's Flower config stays untouched
    settings = []
    for k in (1, 2):
        write_synthetic_store(tmp_path / f"site{k}.zarr", 8, site=k, seed=k, tile_size=64)
        settings.append(SiteSettings(tmp_path / f"site{k}.zarr", f"site-{k}", tmp_path / f"work{k}", device="cpu"))
    settings.append(SiteSettings(tmp_path / "gone" / "site3.zarr", "site-3", tmp_path / "work3", device="cpu"))
    return settings


def test_federated_run_completes_and_resumes_after_a_superlink_restart(tmp_path, sites):
    run_dir = tmp_path / "run"
    superlink = SuperLink(run_dir, port=free_port()).start()
    nodes = [SuperNode(site, superlink.address).start() for site in sites]
    try:
        first = subprocess.Popen(
            federate(superlink, run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        wait_for(run_dir / "round-0001", first, timeout=300)
        superlink.stop()  # mid-run: the ServerApp dies with it, round 2 is in flight
        output = first.communicate(timeout=120)[0]
        assert first.returncode != 0, output
        assert last_complete_round(run_dir).round == 1

        superlink.start()  # same database: the sites reconnect, nothing is registered again by hand
        second = subprocess.run(federate(superlink, run_dir), capture_output=True, text=True, timeout=400, check=False)
        assert second.returncode == 0, second.stdout + second.stderr
    finally:
        for node in nodes:
            node.stop()
        superlink.stop()
    output = second.stdout + second.stderr
    assert "resuming after round 1" in output and "federated run completed" in output
    assert "site-3: failed" in output

    last = last_complete_round(run_dir)
    assert (last.round, last.phase, last.phase_round) == (2, "finetune", 1)
    assert {p.name for p in run_dir.glob("round-*")} == {"round-0001", "round-0002"}
    assert load_model(run_dir, torch.device("cpu")).class_names[1:] == ["epithelial", "lymphocyte", "stromal"]

    db = sqlite3.connect(run_dir / "telemetry.db")
    rounds = db.execute(
        "SELECT phase, round, n_sites, n_failed, bytes_sent, bytes_received FROM rounds ORDER BY round"
    ).fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rounds] == [
        ("pretrain", 1, 3, 1),
        ("finetune", 2, 3, 1),
    ]  # none lost, none twice
    assert rounds[1][5] < rounds[0][5] / 10, "fine-tuning should send back the heads alone"
    site_rows = db.execute("SELECT round, site, status, error FROM site_rounds ORDER BY round, site").fetchall()
    assert [(r[0], r[1], r[2]) for r in site_rows] == [
        (1, "site-1", "trained"),
        (1, "site-2", "trained"),
        (1, "site-3", "failed"),
        (2, "site-1", "trained"),
        (2, "site-2", "trained"),
        (2, "site-3", "failed"),
    ]
    errors = [r[3] for r in site_rows if r[2] == "failed"]
    assert all("site3.zarr" in e and "/" not in e for e in errors), errors  # the site said what, not where
    assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    assert db.execute("SELECT round FROM model_versions").fetchall() == [(2,)]
    metrics = json.loads(db.execute("SELECT metrics FROM rounds WHERE round = 2").fetchone()[0])
    assert {"train_loss", "train_np_ce", "train_hv_mse"} <= set(metrics)

    # Everything the server received, as audited: model weights (float32 parameters of the
    # model, nothing else, nothing image-shaped), numbers, and the site's name.
    received = [json.loads(line) for line in (run_dir / "received.jsonl").read_text().splitlines()]
    assert {(r["phase"], r["site"]) for r in received} == {
        (p, s) for p in ("pretrain", "finetune") for s in ("site-1", "site-2")
    }
    for line in received:
        assert line["non_parameter_keys"] == [] and line["dtypes"] == ["float32"]
        assert all(isinstance(v, (int, float)) for v in line["metrics"].values())
        assert line["strings"] == {"site.name": line["site"]}
