"""A site's local rounds: what they train, what they send, and that they are reproducible."""

import numpy as np
import pytest
import torch

from cmdfed.data.synth import write_synthetic_store
from cmdfed.errors import CmdfedError
from cmdfed.federation.local import local_evaluate, local_finetune_round, local_pretrain_round, round_seed
from cmdfed.model.config import build_model


def global_model(config, phase="pretrain"):
    torch.manual_seed(123)
    return build_model(config.model_config(phase))


def test_pretrain_round_trains_and_sends_exactly_backbone_and_modulation(quick_config, site_stores):
    config = quick_config()
    model = global_model(config)
    sent = model.state_dict_for(config.sent_groups("pretrain"))
    update = local_pretrain_round(sent, site_stores[0], config, 1, "site-1", device="cpu")
    assert set(update.weights) == set(sent)
    assert not any(key.startswith("heads.") for key in update.weights)
    changed = [k for k in sent if not torch.equal(sent[k], update.weights[k])]
    assert changed, "one local step changed nothing"
    assert update.n_examples == 6
    assert np.isfinite(update.metrics["loss"]) and "masked_mse" in update.metrics


def test_a_round_is_reproducible_and_seeded_per_site(quick_config, site_stores):
    config = quick_config()
    sent = global_model(config).state_dict_for(config.sent_groups("pretrain"))
    first = local_pretrain_round(sent, site_stores[0], config, 1, "site-1", device="cpu")
    again = local_pretrain_round(sent, site_stores[0], config, 1, "site-1", device="cpu")
    assert all(torch.equal(first.weights[k], again.weights[k]) for k in sent)
    assert round_seed(0, "pretrain", 1, "site-1") != round_seed(0, "pretrain", 1, "site-2")
    assert round_seed(0, "pretrain", 1, "site-1") != round_seed(0, "finetune", 1, "site-1")


def test_finetune_round_takes_and_sends_only_heads(quick_config, site_stores):
    config = quick_config()
    model = global_model(config, "finetune")
    heads = model.state_dict_for(("heads",))
    frozen = model.state_dict_for(config.frozen_groups("finetune"))
    update = local_finetune_round(heads, frozen, site_stores[1], config, 1, "site-2", device="cpu")
    assert set(update.weights) == set(heads) and all(k.startswith("heads.") for k in update.weights)
    assert any(not torch.equal(heads[k], update.weights[k]) for k in heads)
    assert {"np_ce", "hv_mse", "nc_ce"} <= set(update.metrics)
    with pytest.raises(CmdfedError, match="does not match groups"):
        local_finetune_round(model.state_dict(), frozen, site_stores[1], config, 1, "site-2", device="cpu")


def test_fedprox_adds_the_proximal_term(quick_config, site_stores):
    config = quick_config(local_steps=2)
    sent = global_model(config).state_dict_for(config.sent_groups("pretrain"))
    update = local_pretrain_round(sent, site_stores[0], config, 1, "site-1", device="cpu", proximal_mu=0.5)
    assert "proximal" in update.metrics and update.metrics["proximal"] > 0  # the second step starts away from w_global


def test_a_store_with_other_classes_is_refused(quick_config, site_stores, tmp_path):
    config = quick_config(classes="tumour,immune")
    model = global_model(config, "finetune")
    with pytest.raises(CmdfedError, match="the run classifies tumour,immune"):
        local_finetune_round(model.state_dict_for(("heads",)), model.state_dict_for(config.frozen_groups("finetune")),
                             site_stores[0], config, 1, "site-1", device="cpu")  # fmt: skip


def test_local_evaluation_scores_both_phases(quick_config, site_stores):
    config = quick_config()
    model = global_model(config, "finetune")
    tiles, metrics = local_evaluate(model.state_dict_for(("backbone", "modulation")), {}, "pretrain", site_stores[0], config, device="cpu")
    assert tiles == 2 and np.isfinite(metrics["masked_mse"])
    tiles, metrics = local_evaluate(model.state_dict_for(("heads",)), model.state_dict_for(("backbone", "modulation")),
                                    "finetune", site_stores[0], config, device="cpu")  # fmt: skip
    assert tiles == 2 and {"dice", "aji", "pq", "mpq"} <= set(metrics)
