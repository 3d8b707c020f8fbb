"""The run config: validation, Flower's hyphenated keys, and pyproject's defaults."""

import tomllib
from pathlib import Path

import pytest

from cmdfed.errors import CmdfedError
from cmdfed.federation.config import FederationConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_defaults_are_the_dataclass_defaults():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert table == FederationConfig().to_run_config()


def test_run_config_round_trips_through_flower_keys():
    config = FederationConfig(strategy="fedprox", pretrain_rounds=3, classes="a,b")
    run_config = config.to_run_config()
    assert run_config["pretrain-rounds"] == 3 and "pretrain_rounds" not in run_config
    assert FederationConfig.from_run_config(run_config) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ({"strategy": "fedsgd"}, "strategy must be one of"),
        ({"local-steps": 0}, "local-steps must be positive"),
        ({"label-fraction": 0.0}, "label-fraction"),
        ({"pretrain-rounds": 0, "finetune-rounds": 0}, "at least one round"),
        ({"classes": "a,a"}, "distinct"),
        ({"rounds": 3}, "unknown FederationConfig keys"),
        ({"min-sites": "2"}, "must be an integer"),
    ],
)
def test_bad_run_configs_are_refused_with_a_clear_message(override, message):
    with pytest.raises(CmdfedError, match=message):
        FederationConfig.from_run_config({**FederationConfig().to_run_config(), **override})


def test_phases_send_disjoint_groups_and_finetuning_freezes_the_rest():
    config = FederationConfig()
    assert config.sent_groups("pretrain") == ("backbone", "modulation") and config.frozen_groups("pretrain") == ()
    assert config.sent_groups("finetune") == ("heads",) and config.frozen_groups("finetune") == (
        "backbone",
        "modulation",
    )
    with_modulation = FederationConfig(finetune_trainable="heads+modulation")
    assert with_modulation.sent_groups("finetune") == ("heads", "modulation")
    assert with_modulation.frozen_groups("finetune") == ("backbone",)
    assert config.global_round("finetune", 1) == config.pretrain_rounds + 1
