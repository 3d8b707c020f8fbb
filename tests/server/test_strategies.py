"""Strategies from the run config, and their state through a round checkpoint."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx, FedYogi
from flwr.supercore.task_identity import TaskIdentity

from cmdfed.errors import CmdfedError
from cmdfed.federation.checkpoints import last_complete_round, save_round
from cmdfed.federation.config import FederationConfig
from cmdfed.federation.wire import WEIGHTS_KEY
from server.strategies import build_strategy, restore_strategy_state, set_updates_averaged, strategy_state


@pytest.mark.parametrize(
    "name, kind", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)]
)
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
    strategy.m_t = {WEIGHTS_KEY: np.arange(4, dtype=np.float32)}  # moments of the packed weight vector
    strategy.v_t = {WEIGHTS_KEY: np.ones(4, dtype=np.float32)}
    save_round(
        tmp_path,
        round=1,
        phase="pretrain",
        phase_round=1,
        weights={},
        strategy_state=strategy_state(strategy),
        config={"model": {}},
        metrics={},
    )
    resumed = build_strategy(config, "pretrain")
    restore_strategy_state(resumed, last_complete_round(tmp_path).strategy_state)
    assert np.array_equal(resumed.m_t[WEIGHTS_KEY], strategy.m_t[WEIGHTS_KEY])
    assert np.array_equal(resumed.v_t[WEIGHTS_KEY], strategy.v_t[WEIGHTS_KEY])


def test_moments_saved_per_tensor_by_an_earlier_version_are_refused():
    per_tensor = {"m_t/stem.0.weight": torch.zeros(3), "v_t/stem.0.weight": torch.ones(3)}
    with pytest.raises(CmdfedError, match="written by an earlier cmdfed; start a new run folder"):
        restore_strategy_state(build_strategy(FederationConfig(strategy="fedadam"), "pretrain"), per_tensor)


def test_stateless_strategies_save_nothing():
    assert strategy_state(build_strategy(FederationConfig(), "pretrain")) == {}


@pytest.fixture
def task_identity():
    """What Flower sets in a ServerApp process before messages are built."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_the_central_dp_wrapper_is_told_how_many_updates_it_averages():
    central = build_strategy(FederationConfig(dp_mode="central", dp_noise_multiplier=0.5, min_sites=3), "pretrain")
    set_updates_averaged(central, 2)  # three sampled, one rejected
    assert central.num_sampled_clients == 2
    plain = build_strategy(FederationConfig(), "pretrain")
    set_updates_averaged(plain, 2)
    assert not hasattr(plain, "num_sampled_clients")


def test_central_dp_clips_each_site_update_and_noises_the_average(task_identity):
    config = FederationConfig(dp_mode="central", dp_noise_multiplier=0.5, dp_clip_norm=1.0, min_sites=2)
    strategy = build_strategy(config, "pretrain")
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) and strategy_state(strategy) == {}
    reference = {"w": np.zeros(10_000, np.float32)}
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in reference.items()})  # as configure_train records it

    def reply(update: float) -> Message:
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full(10_000, update, np.float32))}),
                "metrics": MetricRecord({"num-examples": 4}),
            }
        )
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

    aggregated, _ = strategy.aggregate_train(1, [reply(1.0), reply(1.0)])  # update norms 100, clipped to 1
    result = aggregated["w"].numpy()
    # mean of two clipped updates: 0.01 per entry; noise std 0.5 * 1.0 / 2 per entry
    assert abs(result.mean() - 0.01) < 0.02 and result.std() == pytest.approx(0.25, rel=0.05)
    with pytest.raises(CmdfedError, match="fedavg or fedprox"):
        FederationConfig(dp_mode="central", dp_noise_multiplier=1.0, strategy="fedadam")
    with pytest.raises(CmdfedError, match="needs dp-noise-multiplier"):
        FederationConfig(dp_mode="central")
