"""Local DP at a site: epsilon as Opacus accounts it, a ledger that outlives the process,
and a site that declines once its budget is spent; the server records both."""

import json
import sqlite3
import subprocess
import sys

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from cmdfed.errors import CmdfedError
from cmdfed.federation.coordinator import RoundReport, RunCoordinator, SiteReport
from cmdfed.federation.local import local_pretrain_round, open_privacy_ledger
from cmdfed.model.unet import build_model
from cmdfed.privacy.accounting import BudgetExhausted, PrivacyLedger, PrivateSteps

RUN_ID = "0123abcd"


def sent_weights(config):
    torch.manual_seed(0)
    return build_model(config.model_config("pretrain")).state_dict_for(config.sent_groups("pretrain"))


def opacus_epsilon(noise_multiplier, sample_rate, steps, delta):
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def test_epsilon_grows_every_round_as_opacus_accounts_it(private_config, site_store, tmp_path):
    config = private_config()
    weights = sent_weights(config)
    epsilons = []
    for round in (1, 2, 3):
        ledger = open_privacy_ledger(config, site_store, tmp_path / "work", RUN_ID)  # as a fresh ClientApp does
        update = local_pretrain_round(weights, site_store, config, round, "site-a", device="cpu", ledger=ledger)
        epsilons.append(update.metrics["dp_epsilon"])
        weights = update.weights
    planned = get_noise_multiplier(
        target_epsilon=50.0, target_delta=1e-5, sample_rate=2 / 8, steps=2 * 4, accountant="rdp"
    )
    assert update.metrics["dp_noise_multiplier"] == pytest.approx(planned)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 50.0
    for rounds, epsilon in enumerate(epsilons, start=1):
        assert epsilon == pytest.approx(opacus_epsilon(planned, 2 / 8, 2 * rounds, 1e-5), rel=1e-9)
    saved = json.loads((tmp_path / "work" / "privacy" / f"{RUN_ID}.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2, 3] and saved["epsilon"] == pytest.approx(epsilons[-1])


LEDGER_ROUND = """
import sys
from pathlib import Path
from cmdfed.federation.config import FederationConfig
from cmdfed.federation.local import open_privacy_ledger
from cmdfed.privacy.accounting import PrivateSteps
config = FederationConfig.from_run_config(__import__("json").loads(sys.argv[1]))
ledger = open_privacy_ledger(config, sys.argv[2], Path(sys.argv[3]), "0123abcd")
print(ledger.record(PrivateSteps("pretrain", int(sys.argv[4]), ledger.noise_multiplier, 0.25, config.local_steps)))
"""


def test_the_ledger_survives_new_processes(private_config, site_store, tmp_path):
    config = private_config(dp_noise_multiplier=1.1)
    for round in (1, 2):
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                LEDGER_ROUND,
                json.dumps(config.to_run_config()),
                str(site_store),
                str(tmp_path / "work"),
                str(round),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    ledger = open_privacy_ledger(config, site_store, tmp_path / "work", RUN_ID)
    assert [r.round for r in ledger.rounds] == [1, 2] and ledger.noise_multiplier == 1.1
    assert ledger.epsilon == pytest.approx(opacus_epsilon(1.1, 0.25, 4, 1e-5), rel=1e-9)
    assert float(result.stdout) == pytest.approx(ledger.epsilon)


def test_a_site_declines_the_round_that_would_exceed_its_budget(private_config, site_store, tmp_path):
    one_round, two_rounds = opacus_epsilon(1.0, 2 / 8, 2, 1e-5), opacus_epsilon(1.0, 2 / 8, 4, 1e-5)
    config = private_config(dp_noise_multiplier=1.0, dp_epsilon=(one_round + two_rounds) / 2)  # room for one round
    weights = sent_weights(config)
    first = open_privacy_ledger(config, site_store, tmp_path / "work", RUN_ID)
    local_pretrain_round(weights, site_store, config, 1, "site-a", device="cpu", ledger=first)
    again = open_privacy_ledger(config, site_store, tmp_path / "work", RUN_ID)
    with pytest.raises(BudgetExhausted, match="privacy budget spent") as declined:
        local_pretrain_round(weights, site_store, config, 2, "site-a", device="cpu", ledger=again)
    assert declined.value.spent == pytest.approx(one_round) and declined.value.would_be > config.dp_epsilon
    assert len(open_privacy_ledger(config, site_store, tmp_path / "work", RUN_ID).rounds) == 1


def test_a_ledger_of_other_privacy_settings_is_refused(private_config, site_store, tmp_path):
    config = private_config(dp_noise_multiplier=1.0)
    open_privacy_ledger(config, site_store, tmp_path, RUN_ID).record(PrivateSteps("pretrain", 1, 1.0, 0.25, 2))
    with pytest.raises(CmdfedError, match="cannot change"):
        open_privacy_ledger(private_config(dp_noise_multiplier=1.0, dp_epsilon=99.0), site_store, tmp_path, RUN_ID)
    (tmp_path / "privacy" / f"{RUN_ID}.json").write_text("{")
    with pytest.raises(CmdfedError, match="unreadable"):
        PrivacyLedger.open(
            tmp_path, RUN_ID, budget_epsilon=50.0, delta=1e-5, max_grad_norm=1.0, noise_multiplier=lambda: 1.0
        )


def test_the_server_records_spend_and_declines_apart_from_failures(private_config):
    config = private_config(eval_every=0)
    coordinator = RunCoordinator(config)
    sent = coordinator.sent_weights("pretrain")
    spend = {
        "dp_epsilon": 2.5,
        "dp_delta": 1e-5,
        "dp_noise_multiplier": 1.2,
        "dp_max_grad_norm": 1.0,
        "dp_budget_epsilon": 50.0,
    }
    report = RoundReport(
        0.0,
        [
            SiteReport("site-a", "trained", 8, {"loss": 1.0, **spend}, 2.0),
            SiteReport("site-b", "declined_budget", 0, {"dp_epsilon": 49.0}, error="privacy budget spent"),
        ],
        bytes_sent=1,
        bytes_received=1,
    )
    coordinator.complete_round("pretrain", 1, sent, {}, report)
    coordinator.finish("completed")
    db = sqlite3.connect(config.run_dir + "/telemetry.db")
    assert db.execute("SELECT n_sites, n_failed FROM rounds").fetchall() == [(2, 0)]
    assert db.execute("SELECT site, status FROM site_rounds ORDER BY site").fetchall() == [
        ("site-a", "trained"),
        ("site-b", "declined_budget"),
    ]
    assert db.execute("SELECT site, epsilon, noise_multiplier, budget_epsilon FROM privacy").fetchall() == [
        ("site-a", 2.5, 1.2, 50.0)
    ]
