"""The server's bookkeeping: a new run, a completed round, and resuming the run folder."""

import json
import sqlite3

import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from cmdfed.federation.coordinator import RoundReport, RunCoordinator, SiteNames, SiteReport


def complete(coordinator, phase, phase_round):
    sent = coordinator.sent_weights(phase)
    aggregated = {k: v + 0.01 for k, v in sent.items()}
    report = RoundReport(
        0.0,
        [SiteReport("site-1", "trained", 6, {"loss": 1.0}, 2.0), SiteReport("site-2", "failed", error="boom")],
        bytes_sent=10,
        bytes_received=5,
        train_metrics={"loss": 1.0},
    )
    return coordinator.complete_round(phase, phase_round, aggregated, {}, report)


def test_rounds_are_checkpointed_recorded_and_resumed_after(quick_config, capsys):
    config = quick_config(eval_every=0)
    coordinator = RunCoordinator(config)
    assert list(coordinator.remaining("pretrain")) == [1, 2] and list(coordinator.remaining("finetune")) == [1, 2]
    complete(coordinator, "pretrain", 1)
    complete(coordinator, "pretrain", 2)
    path = complete(coordinator, "finetune", 1)
    assert path.name == "round-0003"
    weights = coordinator.sent_weights("finetune")

    resumed = RunCoordinator(config)  # a restarted server on the same run folder
    assert list(resumed.remaining("pretrain")) == [] and list(resumed.remaining("finetune")) == [2]
    assert resumed.run_id == coordinator.run_id
    assert all(np.array_equal(resumed.sent_weights("finetune")[k], v) for k, v in weights.items())
    complete(resumed, "finetune", 2)
    resumed.finish("completed")

    db = sqlite3.connect(config.run_dir + "/telemetry.db")
    assert db.execute("SELECT round, n_sites, n_failed FROM rounds ORDER BY round").fetchall() == [
        (1, 2, 1),
        (2, 2, 1),
        (3, 2, 1),
        (4, 2, 1),
    ]
    assert db.execute("SELECT COUNT(*) FROM site_rounds").fetchone() == (8,)
    assert db.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    events = [
        json.loads(line.split(" ", 1)[1])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("cmdfed-event ")
    ]
    assert [e["event"] for e in events].count("round") == 4 and events[-1] == {
        **events[-1],
        "event": "finish",
        "status": "completed",
    }


def test_resuming_with_other_settings_is_refused(quick_config):
    RunCoordinator(quick_config())
    with pytest.raises(CmdfedError, match="differ in local_steps"):
        RunCoordinator(quick_config(local_steps=5))
    RunCoordinator(quick_config(round_timeout_s=99.0))  # a timeout is no part of the run's result


def test_the_frozen_fingerprint_names_exactly_the_frozen_weights(quick_config):
    coordinator = RunCoordinator(quick_config())
    sha = coordinator.frozen_fingerprint("finetune")
    assert len(sha) == 64 and not any(k.startswith("heads.") for k in coordinator.frozen_weights("finetune"))
    assert set(coordinator.sent_weights("finetune")) == {k for k in coordinator.weights if k.startswith("heads.")}


def test_a_site_name_is_held_by_one_connected_node():
    sites = SiteNames()
    assert sites.claim(11, "site-a", connected={11, 12}) is None
    assert sites.claim(12, "site-b", connected={11, 12}) is None
    assert sites.claim(11, "site-a", connected={11, 12}) is None  # every round again: still its own
    reason = sites.claim(13, "site-a", connected={11, 12, 13})  # a second SuperNode started as site-a
    assert reason is not None and "node (11) already takes part as site 'site-a'" in reason and "restart" in reason
    assert (sites.name(11), sites.name(13)) == ("site-a", "node-13")  # the refused node is not named after site-a
    assert sites.claim(13, "site-a", connected={11, 13}) is not None  # refused for as long as the holder is connected


def test_a_restarted_site_takes_its_name_back_once_its_old_node_is_gone():
    sites = SiteNames()
    sites.claim(11, "site-a", connected={11})
    assert sites.claim(21, "site-a", connected={21}) is None  # node 11 went offline; Flower gave the restart id 21
    assert (sites.name(21), sites.name(11)) == ("site-a", "node-11")
    sites.claim(21, "site-c", connected={21})  # restarted under a new name (an authenticated node keeps its id)
    assert sites.claim(31, "site-a", connected={21, 31}) is None and sites.name(21) == "site-c"


def test_keep_rounds_keeps_the_newest_and_the_pretrained_backbone_and_still_resumes(quick_config):
    config = quick_config(eval_every=0, pretrain_rounds=3, finetune_rounds=3, keep_rounds=2)
    coordinator = RunCoordinator(config)
    for phase in ("pretrain", "finetune"):
        for phase_round in (1, 2, 3):
            complete(coordinator, phase, phase_round)
            if (phase, phase_round) == ("finetune", 1):
                kept = sorted(p.name for p in coordinator.run_dir.glob("round-*"))
                assert kept == ["round-0003", "round-0004"]
    kept = sorted(p.name for p in coordinator.run_dir.glob("round-*"))
    assert kept == ["round-0003", "round-0005", "round-0006"]  # round 3 ends pretraining
    resumed = RunCoordinator(config)
    assert list(resumed.remaining("finetune")) == []
    for bad in (-1, 1):
        with pytest.raises(CmdfedError, match="keep-rounds must be 0"):
            quick_config(keep_rounds=bad)


DP = {
    "dp_epsilon": 1.5,
    "dp_delta": 1e-5,
    "dp_noise_multiplier": 1.1,
    "dp_max_grad_norm": 1.0,
    "dp_budget_epsilon": 8.0,
}


def test_privacy_is_recorded_whenever_a_site_reports_its_spend(quick_config):
    coordinator = RunCoordinator(quick_config(dp_mode="local"))
    coordinator.record_sites(
        "pretrain",
        1,
        [
            SiteReport("trained", "trained", 6, dict(DP)),
            SiteReport("rejected", "failed", 6, {**DP, "dp_epsilon": 2.5}, error="update rejected: update norm ..."),
            SiteReport(
                "declined",
                "declined_budget",
                0,
                {"declined-budget": 1, "dp_epsilon": 8.0, "dp_budget_epsilon": 8.0, "dp_delta": 1e-5},
            ),
            SiteReport(
                "partial", "failed", 6, {"dp_epsilon": 3.0}, error="malformed"
            ),  # not a whole report: not recorded, no crash
            SiteReport("errored", "failed", error="boom"),
        ],
    )
    db = sqlite3.connect(coordinator.run_dir / "telemetry.db")
    assert db.execute("SELECT site, epsilon FROM privacy ORDER BY site").fetchall() == [
        ("rejected", 2.5),
        ("trained", 1.5),
    ]


def test_a_server_eval_store_that_cannot_score_the_run_is_refused_before_any_round(quick_config, site_stores, tmp_path):
    with pytest.raises(
        CmdfedError,
        match="server-eval-store: site store .*typo.zarr does not exist; set server-eval-store to a labelled",
    ):
        RunCoordinator(quick_config(server_eval_store=str(tmp_path / "typo.zarr")))
    with pytest.raises(CmdfedError) as refused:
        RunCoordinator(quick_config(server_eval_store=str(site_stores[0]), classes="tumour,immune"))
    message = str(refused.value)
    assert "the run classifies tumour,immune" in message and "leave server-eval-store empty" in message
    assert "start the run without classes" not in message
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run began
    RunCoordinator(
        quick_config(server_eval_store=str(tmp_path / "typo.zarr"), server_eval_every=0)
    )  # never used: not checked
    RunCoordinator(quick_config(server_eval_store=str(site_stores[0])))
