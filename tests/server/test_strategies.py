"""Strategies from the run config, and their state through a round checkpoint."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from cmdfed.federation.checkpoints import last_complete_round, save_round
from cmdfed.federation.config import FederationConfig
from server.strategies import build_strategy, restore_strategy_state, strategy_state


@pytest.mark.parametrize("name, kind", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)])
def test_the_run_config_chooses_the_strategy(name, kind):
    strategy = build_strategy(FederationConfig(strategy=name, min_sites=3, fraction_sites=0.5), "pretrain")
    assert type(strategy) is kind
    assert (strategy.min_train_nodes, strategy.fraction_train, strategy.weighted_by_key) == (3, 0.5, "num-examples")


def test_fedprox_sends_its_mu():
    assert build_strategy(FederationConfig(strategy="fedprox", proximal_mu=0.3), "finetune").proximal_mu == 0.3


def test_fedadam_moments_survive_a_checkpoint(tmp_path):
    config = FederationConfig(strategy="fedadam")
    strategy = build_strategy(config, "pretrain")
    assert strategy_state(strategy) == {}
    strategy.m_t = {"w": np.arange(4, dtype=np.float32)}
    strategy.v_t = {"w": np.ones(4, dtype=np.float32)}
    save_round(tmp_path, round=1, phase="pretrain", phase_round=1, weights={}, strategy_state=strategy_state(strategy),
               config={"model": {}}, metrics={})  # fmt: skip
    resumed = build_strategy(config, "pretrain")
    restore_strategy_state(resumed, last_complete_round(tmp_path).strategy_state)
    assert np.array_equal(resumed.m_t["w"], strategy.m_t["w"]) and np.array_equal(resumed.v_t["w"], strategy.v_t["w"])


def test_stateless_strategies_save_nothing():
    assert strategy_state(build_strategy(FederationConfig(), "pretrain")) == {}
