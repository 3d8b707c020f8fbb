"""``cmdfed simulate``: the real apps on Flower's simulation engine (Ray) with virtual sites,
and the splits that give them their stain and label heterogeneity."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from cmdfed.data.store import SiteStore
from cmdfed.errors import CmdfedError
from cmdfed.federation.checkpoints import last_complete_round
from cmdfed.federation.simulated import Split, dominant_type, write_simulated_sites

pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation]")

QUICK = [
    "--set",
    "local-steps=1",
    "--set",
    "batch-size=2",
    "--set",
    "eval-tiles=2",
    "--set",
    "augment=false",
    "--set",
    "eval-every=0",
    "--set",
    'classes="epithelial,lymphocyte,stromal"',
]


def simulate(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path / "flwr-home")}
    command = [
        sys.executable,
        "-m",
        "cmdfed",
        "simulate",
        "--out",
        str(tmp_path / "sim"),
        "--tiles",
        "4",
        *QUICK,
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, check=False)


def test_dirichlet_split_skews_nucleus_types_across_sites(tmp_path):
    sites = write_simulated_sites(tmp_path, 4, Split.parse("dirichlet:0.1"), 8, seed=3)
    mixes = []
    for site in sites:
        store = SiteStore.open(site.store)
        assert len(store) >= 2
        kinds = [dominant_type(store.tile(i)) for i in range(len(store))]
        mixes.append(np.bincount(kinds, minlength=4) / len(kinds))
    assert sum(len(SiteStore.open(s.store)) for s in sites) == 32  # every pooled tile dealt once
    assert max(np.abs(a - b).sum() for a in mixes for b in mixes) > 0.5, mixes  # far from IID
    with pytest.raises(CmdfedError, match="dirichlet:ALPHA"):
        Split.parse("dirichlet:-1")


@pytest.mark.slow
def test_simulation_runs_both_phases_on_virtual_sites(tmp_path):
    result = simulate(
        tmp_path, "--sites", "3", "--split", "by-store", "--set", "pretrain-rounds=1", "--set", "finetune-rounds=1"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "simulation completed: 2 rounds" in " ".join(result.stderr.split())
    last = last_complete_round(tmp_path / "sim" / "run")
    assert (last.round, last.phase) == (2, "finetune")
    db = sqlite3.connect(tmp_path / "sim" / "run" / "telemetry.db")
    rows = db.execute("SELECT round, site, status FROM site_rounds ORDER BY round, site").fetchall()
    assert rows == [(r, f"site-0{k}", "trained") for r in (1, 2) for k in (1, 2, 3)]


@pytest.mark.slow
def test_local_dp_sites_report_epsilon_then_decline_and_the_run_stops(tmp_path):
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=2 / 4)
    one_round = accountant.get_epsilon(1e-5)
    accountant.step(noise_multiplier=1.0, sample_rate=2 / 4)
    budget = (one_round + accountant.get_epsilon(1e-5)) / 2  # room for one round of one step
    result = simulate(
        tmp_path,
        "--sites",
        "3",
        "--split",
        "by-stain",
        "--set",
        "pretrain-rounds=3",
        "--set",
        "finetune-rounds=1",
        "--set",
        'dp-mode="local"',
        "--set",
        "dp-noise-multiplier=1.0",
        "--set",
        f"dp-epsilon={budget}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "every site has spent its privacy budget" in " ".join(result.stderr.split())
    db = sqlite3.connect(tmp_path / "sim" / "run" / "telemetry.db")
    assert db.execute("SELECT round, status, COUNT(*) FROM site_rounds GROUP BY round, status").fetchall() == [
        (1, "trained", 3),
        (2, "declined_budget", 3),
    ]
    spent = db.execute("SELECT round, epsilon, budget_epsilon FROM privacy").fetchall()
    assert len(spent) == 3 and all(
        r[0] == 1 and r[1] == pytest.approx(one_round) and r[2] == pytest.approx(budget) for r in spent
    )
    assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    assert last_complete_round(tmp_path / "sim" / "run").round == 1
