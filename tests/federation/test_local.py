"""A site's local rounds: what they train, what they send, and that they are reproducible."""

import numpy as np
import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.federation.local import local_evaluate, local_finetune_round, local_pretrain_round, round_seed
from cmdfed.model.unet import build_model


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


def test_zoom_and_blur_jitter_change_fine_tuning_rounds_only(quick_config, site_stores):
    plain = quick_config(augment=True, finetune_scale_jitter=0.0, finetune_blur_sigma=0.0)
    jittered = quick_config(augment=True, finetune_scale_jitter=0.2, finetune_blur_sigma=1.0)  # the recipe's
    model = global_model(plain, "finetune")
    heads = model.state_dict_for(("heads",))
    frozen = model.state_dict_for(plain.frozen_groups("finetune"))
    tuned = [
        local_finetune_round(heads, frozen, site_stores[0], c, 1, "site-1", device="cpu") for c in (plain, jittered)
    ]
    assert any(not torch.equal(tuned[0].weights[k], tuned[1].weights[k]) for k in heads)
    sent = global_model(plain).state_dict_for(plain.sent_groups("pretrain"))
    pretrained = [local_pretrain_round(sent, site_stores[0], c, 1, "site", device="cpu") for c in (plain, jittered)]
    assert all(torch.equal(pretrained[0].weights[k], pretrained[1].weights[k]) for k in sent)


def test_fedprox_adds_the_proximal_term(quick_config, site_stores):
    config = quick_config(local_steps=2)
    sent = global_model(config).state_dict_for(config.sent_groups("pretrain"))
    update = local_pretrain_round(sent, site_stores[0], config, 1, "site-1", device="cpu", proximal_mu=0.5)
    assert "proximal" in update.metrics and update.metrics["proximal"] > 0  # the second step starts away from w_global


def test_a_store_with_other_classes_is_refused(quick_config, site_stores, tmp_path):
    config = quick_config(classes="tumour,immune")
    model = global_model(config, "finetune")
    with pytest.raises(CmdfedError, match="the run classifies tumour,immune"):
        local_finetune_round(
            model.state_dict_for(("heads",)),
            model.state_dict_for(config.frozen_groups("finetune")),
            site_stores[0],
            config,
            1,
            "site-1",
            device="cpu",
        )


def test_local_evaluation_scores_both_phases(quick_config, site_stores):
    config = quick_config()
    model = global_model(config, "finetune")
    tiles, metrics = local_evaluate(
        model.state_dict_for(("backbone", "modulation")), {}, "pretrain", site_stores[0], config, device="cpu"
    )
    assert tiles == 2 and np.isfinite(metrics["masked_mse"])
    tiles, metrics = local_evaluate(
        model.state_dict_for(("heads",)),
        model.state_dict_for(("backbone", "modulation")),
        "finetune",
        site_stores[0],
        config,
        device="cpu",
    )
    assert tiles == 2 and {"dice", "aji", "pq", "mpq"} <= set(metrics)


def unlabelled_store(path, n=6):
    """Tissue tiles without labels or classes, as `cmdfed data tile-slide` makes them."""
    from cmdfed.data.store import Tile, create_store
    from cmdfed.data.synth import synth_tiles

    with create_store(path, tile_size=64, mpp=0.5) as store, store.writer() as writer:
        writer.extend(
            Tile(image=t.image, source="slide", slide_id="slide-1", x=t.x) for t in synth_tiles(n, tile_size=64, seed=5)
        )
    return path


def test_local_dp_plans_noise_only_for_the_phases_a_site_can_take_part_in(quick_config, site_stores, tmp_path):
    from cmdfed.federation.local import open_privacy_ledger, sample_rate
    from cmdfed.privacy.accounting import noise_for_budget

    config = quick_config(dp_mode="local", dp_epsilon=4.0, pretrain_rounds=2, finetune_rounds=2)
    store = unlabelled_store(tmp_path / "slide-tiles.zarr")
    ledger = open_privacy_ledger(config, store, tmp_path / "work", "run-1")  # no labels, no classes: pretraining only
    pretraining_only = noise_for_budget(4.0, config.dp_delta, sample_rate(6, config.batch_size), config.local_steps * 2)
    assert ledger.noise_multiplier == pytest.approx(pretraining_only)
    no_classes = open_privacy_ledger(
        quick_config(dp_mode="local", dp_epsilon=4.0, classes=""), store, tmp_path / "work", "run-0"
    )
    assert no_classes.noise_multiplier == pytest.approx(pretraining_only)  # no labelled tiles to fine-tune on
    labelled = open_privacy_ledger(config, site_stores[0], tmp_path / "work", "run-2")  # plans both phases: more noise
    assert labelled.noise_multiplier > ledger.noise_multiplier

    update = local_pretrain_round(
        global_model(config).state_dict_for(config.sent_groups("pretrain")),
        store,
        config,
        1,
        "site-1",
        device="cpu",
        ledger=ledger,
    )
    spent = update.metrics["dp_epsilon"]
    assert 0 < spent <= 4.0 and ledger.epsilon == pytest.approx(spent)
    model = global_model(config, "finetune")
    with pytest.raises(CmdfedError, match="no nucleus types"):  # its fine-tuning fails before it spends anything
        local_finetune_round(
            model.state_dict_for(("heads",)),
            model.state_dict_for(config.frozen_groups("finetune")),
            store,
            config,
            1,
            "site-1",
            device="cpu",
            ledger=ledger,
        )
    assert ledger.epsilon == pytest.approx(spent)
    with pytest.raises(CmdfedError, match="no nucleus types"):  # a fine-tuning-only run: nothing it can take part in
        open_privacy_ledger(quick_config(dp_mode="local", pretrain_rounds=0), store, tmp_path / "work", "run-3")
