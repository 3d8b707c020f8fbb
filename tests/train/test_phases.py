"""Both training phases on a tiny synthetic store (64 px tiles, a few steps)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmdfed.data.store import SiteStore, Tile
from cmdfed.errors import CmdfedError
from cmdfed.inference.stain import REFERENCE_KEY, HEStains
from cmdfed.model.checkpoint import load_checkpoint, resolve_checkpoint
from cmdfed.model.config import ModelConfig
from cmdfed.train.loop import NonFiniteLoss, TrainConfig
from cmdfed.train.phases import finetune, pretrain

TINY = ModelConfig.from_preset("tiny")


def quick(**kw) -> TrainConfig:
    return TrainConfig(
        **{"steps": 4, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2, "sample_every": 2, **kw}
    )


@pytest.fixture(scope="module")
def pretrained(synthetic_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "pre"
    result = pretrain([synthetic_store], run, model_config=TINY, train_config=quick(), device="cpu")
    return run, result


def test_pretrain_writes_checkpoints_grids_and_metrics(pretrained):
    run, result = pretrained
    assert result.steps == 4 and np.isfinite(result.final_loss)
    assert resolve_checkpoint(run).name == "step-000004"
    grid = np.asarray(Image.open(run / "samples" / "step-000004.png"))
    assert grid.shape == (3 * 64 + 4, 4 * 64 + 6, 3)  # original | masked | inpainted rows, 4 preview tiles
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 4 and "masked_mse" in logged[-1]
    assert load_checkpoint(run).config["stores"] == ["synthetic"]  # store names only, no paths


def test_interrupted_pretraining_resumes_to_the_same_weights(synthetic_store, tmp_path, pretrained):
    class Interrupt(Exception):
        pass

    def stop_at_3(done, total, what):
        if done == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(
            [synthetic_store],
            tmp_path / "run",
            model_config=TINY,
            train_config=quick(),
            device="cpu",
            progress=stop_at_3,
        )
    assert resolve_checkpoint(tmp_path / "run").name == "step-000002"
    pretrain([synthetic_store], tmp_path / "run", model_config=TINY, train_config=quick(), device="cpu")
    resumed, straight = load_checkpoint(tmp_path / "run"), load_checkpoint(pretrained[0])
    assert resumed.step == straight.step == 4
    for key, value in straight.weights.items():
        assert torch.equal(value, resumed.weights[key]), key


def test_resume_with_other_settings_is_refused(synthetic_store, pretrained, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(pretrained[0], run)
    with pytest.raises(CmdfedError, match=r"differs in train\.lr"):
        pretrain([synthetic_store], run, model_config=TINY, train_config=quick(lr=0.5), device="cpu")
    with pytest.raises(CmdfedError, match="differs in stores"):
        pretrain([synthetic_store, synthetic_store], run, model_config=TINY, train_config=quick(), device="cpu")
    # How many loader workers (or checkpoints kept) does not change what is trained.
    pretrain(
        [synthetic_store], run, model_config=TINY, train_config=quick(num_workers=1, keep_checkpoints=5), device="cpu"
    )


def test_a_run_from_before_a_setting_existed_resumes_with_its_default_only(synthetic_store, pretrained, tmp_path):
    import shutil

    run = tmp_path / "older"
    shutil.copytree(pretrained[0], run)
    for config_file in run.glob("*/config.json"):  # as cmdfed wrote it before blur_sigma existed
        config = json.loads(config_file.read_text())
        del config["train"]["blur_sigma"]
        config_file.write_text(json.dumps(config))
    with pytest.raises(CmdfedError, match=r"differs in train\.blur_sigma"):
        pretrain([synthetic_store], run, model_config=TINY, train_config=quick(blur_sigma=1.0), device="cpu")
    pretrain([synthetic_store], run, model_config=TINY, train_config=quick(), device="cpu")


def test_a_run_saved_before_a_model_setting_existed_resumes_with_its_default(synthetic_store, tmp_path):
    run = tmp_path / "ft"
    config = quick(steps=2, checkpoint_every=1, sample_every=0)
    finetune(synthetic_store, run, init=None, model_config=TINY, trainable="all", train_config=config, device="cpu")
    config_file = resolve_checkpoint(run) / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["model"]["head_stride"]  # what a run saved before the setting existed holds
    config_file.write_text(json.dumps(saved))
    result = finetune(
        synthetic_store, run, init=None, model_config=TINY, trainable="all", train_config=config, device="cpu"
    )
    assert result.steps == 2 and load_checkpoint(run).step == 2  # the finished run, resumed: nothing to do
    with pytest.raises(CmdfedError, match=r"differs in model\.head_stride"):
        finetune(
            synthetic_store,
            run,
            init=None,
            model_config=ModelConfig.from_preset("tiny", head_stride=2),
            trainable="all",
            train_config=config,
            device="cpu",
        )


def test_finetune_resume_is_refused_with_other_labels_or_trainable_groups(synthetic_store, pretrained, tmp_path):
    run = tmp_path / "ft"
    finetune(synthetic_store, run, init=pretrained[0], train_config=quick(steps=2, sample_every=0), device="cpu")
    same = quick(steps=2, sample_every=0)
    with pytest.raises(CmdfedError, match="differs in label_fraction"):
        finetune(synthetic_store, run, init=pretrained[0], label_fraction=0.5, train_config=same, device="cpu")
    with pytest.raises(CmdfedError, match="differs in trainable"):
        finetune(
            synthetic_store, run, init=pretrained[0], trainable="heads+modulation", train_config=same, device="cpu"
        )


def test_a_resumed_run_logs_each_step_once(synthetic_store, tmp_path):
    class Interrupt(Exception):
        pass

    def stop_at_35(done, total, what):
        if done == 35:
            raise Interrupt

    # Logged every 10 steps, checkpointed every 20: step 30 is logged, then the run resumes from 20.
    config = quick(steps=40, checkpoint_every=20, sample_every=0)
    with pytest.raises(Interrupt):
        pretrain(
            [synthetic_store],
            tmp_path / "run",
            model_config=TINY,
            train_config=config,
            device="cpu",
            progress=stop_at_35,
        )
    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:
        log.write('{"step": 3')  # a line a crash cut short
    pretrain([synthetic_store], tmp_path / "run", model_config=TINY, train_config=config, device="cpu")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_exploding_training_stops_and_keeps_the_last_good_checkpoint(synthetic_store, tmp_path):
    config = quick(steps=30, lr=1e30, checkpoint_every=1, sample_every=0, warmup_steps=0)
    with pytest.raises(NonFiniteLoss) as raised:
        pretrain([synthetic_store], tmp_path / "run", model_config=TINY, train_config=config, device="cpu")
    step = raised.value.step
    assert 0 < step < 30 and resolve_checkpoint(tmp_path / "run").name == f"step-{step:06d}"
    assert all(torch.isfinite(w).all() for w in load_checkpoint(tmp_path / "run").weights.values())


def test_finetune_trains_only_heads_over_the_frozen_backbone(synthetic_store, pretrained, tmp_path):
    result = finetune(
        synthetic_store, tmp_path / "ft", init=pretrained[0], train_config=quick(sample_every=0), device="cpu"
    )
    assert result.trainable_parameters / result.total_parameters < 0.05
    pre, ft = load_checkpoint(pretrained[0]), load_checkpoint(tmp_path / "ft")
    assert ft.config["model"]["n_classes"] == 4 and ft.config["class_names"][1] == "epithelial"
    backbone = [k for k in pre.weights if not k.startswith("heads.")]
    assert backbone and all(torch.equal(pre.weights[k], ft.weights[k]) for k in backbone)
    heads = [k for k in ft.weights if k.startswith("heads.")]
    assert heads and not all(k in pre.weights and torch.equal(pre.weights[k], ft.weights[k]) for k in heads)


def test_finetune_may_change_the_timestep_the_heads_read_but_not_the_weights_shapes(
    synthetic_store, pretrained, tmp_path
):
    finetune(
        synthetic_store,
        tmp_path / "ft",
        init=pretrained[0],
        model_overrides={"finetune_timestep": 0},
        train_config=quick(steps=1, sample_every=0),
        device="cpu",
    )
    assert load_checkpoint(pretrained[0]).config["model"]["finetune_timestep"] == 50
    assert load_checkpoint(tmp_path / "ft").config["model"]["finetune_timestep"] == 0
    with pytest.raises(CmdfedError, match="cannot change the model's widths"):
        finetune(
            synthetic_store,
            tmp_path / "wide",
            init=pretrained[0],
            model_overrides={"widths": (64, 128, 256, 512)},
            train_config=quick(steps=1, sample_every=0),
            device="cpu",
        )
    assert not (tmp_path / "wide").exists()


def test_finetune_starts_from_a_pretraining_saved_before_the_heads_changed(synthetic_store, pretrained, tmp_path):
    import shutil

    old = tmp_path / "old-pre"
    shutil.copytree(pretrained[0], old)
    config_path = resolve_checkpoint(old) / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "format": 1}))
    finetune(synthetic_store, tmp_path / "ft", init=old, train_config=quick(steps=1, sample_every=0), device="cpu")
    pre, ft = load_checkpoint(old, backbone_only=True), load_checkpoint(tmp_path / "ft")
    assert ft.config["format"] == 2
    assert all(torch.equal(pre.weights[k], ft.weights[k]) for k in pre.weights if not k.startswith("heads."))


def test_finetune_starts_from_the_ema_weights_when_pretraining_kept_them(synthetic_store, tmp_path):
    pretrain(
        [synthetic_store], tmp_path / "pre", model_config=TINY, train_config=quick(steps=2, ema_decay=0.5), device="cpu"
    )
    finetune(
        synthetic_store,
        tmp_path / "ft",
        init=tmp_path / "pre",
        train_config=quick(steps=1, sample_every=0),
        device="cpu",
    )
    pre, ft = load_checkpoint(tmp_path / "pre"), load_checkpoint(tmp_path / "ft")
    backbone = [k for k in pre.ema if not k.startswith("heads.") and pre.ema[k].is_floating_point()]
    assert all(torch.equal(pre.ema[k], ft.weights[k]) for k in backbone)
    assert not all(torch.equal(pre.weights[k], ft.weights[k]) for k in backbone)


def test_label_fraction_and_random_init_baseline(synthetic_store, tmp_path):
    result = finetune(
        synthetic_store,
        tmp_path / "ft",
        init=None,
        model_config=TINY,
        trainable="all",
        label_fraction=0.25,
        train_config=quick(sample_every=0),
        device="cpu",
    )
    config = load_checkpoint(tmp_path / "ft").config
    assert config["labelled_tiles"] == 3 and config["trainable"] == "all"
    assert config["mpp"] == 0.5  # the store's resolution: edge export's default --mpp
    assert result.trainable_parameters == result.total_parameters


def test_finetune_needs_labels(tmp_path, pretrained):
    store = SiteStore.create(tmp_path / "unlabelled.zarr", tile_size=64)
    with store.writer() as writer:
        writer.add(Tile(image=np.zeros((64, 64, 3), np.uint8)))
    with pytest.raises(CmdfedError, match="no labelled tiles; fine-tuning needs instance labels"):
        finetune(tmp_path / "unlabelled.zarr", tmp_path / "ft", init=pretrained[0], device="cpu")
    with pytest.raises(CmdfedError, match="trainable must be one of"):
        finetune(tmp_path / "unlabelled.zarr", tmp_path / "ft", init=pretrained[0], trainable="backbone")


def test_training_resolution_is_one_when_the_stores_agree_within_five_percent():
    from cmdfed.train.phases import training_mpp

    assert training_mpp([0.5, 0.499]) == 0.5  # CPM-15 tiles beside the 0.499 um/px sample slide
    assert training_mpp([0.25, 0.5]) is None and training_mpp([0.5, float("nan")]) is None and training_mpp([]) is None


def test_training_records_the_stains_of_the_tiles_it_trained_on(synthetic_store, pretrained, tmp_path):
    """Inference re-stains images as these (cmdfed.inference.stain): fine-tuning records its own
    training tiles' stains, the half it trains on, not the store's; pretraining its stores'."""
    site = SiteStore.open(synthetic_store)
    finetune(
        synthetic_store,
        tmp_path / "ft",
        init=pretrained[0],
        label_fraction=0.5,
        train_config=quick(sample_every=0),
        device="cpu",
    )
    trained_on = site.labelled_subset(0.5, seed=0)
    recorded = HEStains.from_dict(load_checkpoint(tmp_path / "ft").config[REFERENCE_KEY], "ft")
    np.testing.assert_allclose(
        recorded.vectors, HEStains.of([site.image(int(i)) for i in trained_on]).vectors, atol=1e-5
    )
    pretrained_on = HEStains.of([site.image(i) for i in range(len(site))])
    recorded = HEStains.from_dict(load_checkpoint(pretrained[0]).config[REFERENCE_KEY], "pre")
    np.testing.assert_allclose(recorded.max_concentrations, pretrained_on.max_concentrations, rtol=1e-5)
