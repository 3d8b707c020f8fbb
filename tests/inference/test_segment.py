"""Image -> nuclei with a (briefly) trained checkpoint: shapes, sizes, files, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmdfed.errors import CmdfedError
from cmdfed.inference.segment import _window_weight, load_model, predict_files, predict_image_maps, to_model_input
from cmdfed.model.config import ModelConfig
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(synthetic_store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "ft"
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, sample_every=0)
    finetune(
        synthetic_store, run, init=None, model_config=ModelConfig.from_preset("tiny"), train_config=config, device="cpu"
    )
    return run


def test_to_model_input_range_and_validation():
    images = np.array([[[[0, 255, 128]]]], np.uint8)
    x = to_model_input(images)
    assert x.shape == (1, 3, 1, 1) and x.min() == -1 and x.max() == 1
    with pytest.raises(CmdfedError, match="uint8 RGB"):
        to_model_input(np.zeros((1, 4, 4, 4), np.uint8))


def test_any_image_size_gives_maps_of_that_size(checkpoint):
    loaded = load_model(checkpoint, CPU)
    assert loaded.class_names[1:] == ["epithelial", "lymphocyte", "stromal"]
    image = np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    maps = predict_image_maps(loaded, image)
    assert maps["np"].shape == (70, 100) and maps["hv"].shape == (2, 70, 100) and maps["nc"].shape == (4, 70, 100)
    assert 0 <= maps["np"].min() and maps["np"].max() <= 1
    assert np.allclose(maps["nc"].sum(0), 1, atol=1e-4)


def test_windowed_prediction_agrees_with_one_pass_away_from_seams(checkpoint):
    loaded = load_model(checkpoint, CPU)
    image = np.random.default_rng(1).integers(0, 255, (128, 192, 3), dtype=np.uint8)
    whole = predict_image_maps(loaded, image, window=1024)
    windows = predict_image_maps(loaded, image, window=128, overlap=64)
    # Blending only redistributes weight between windows: the maps stay probabilities and,
    # where a window covers the pixel with most of the weight, match the single pass closely.
    assert windows["np"].shape == whole["np"].shape
    assert np.abs(windows["np"] - whole["np"]).mean() < 0.05


def test_window_weight_falls_towards_the_edges():
    w = _window_weight(8, 4)
    assert w[4, 4] == 1 and w[0, 0] < w[1, 1] < w[3, 3] and np.allclose(w, w.T)


def test_predict_files_writes_uint16_instances_and_types(checkpoint, tmp_path):
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    results = predict_files([tmp_path / "a.png"], checkpoint, tmp_path / "out", CPU, mpp=0.5)
    inst = np.asarray(Image.open(tmp_path / "out" / "a_inst.png"))
    types = json.loads((tmp_path / "out" / "a_types.json").read_text())
    assert inst.shape == (64, 96) and inst.dtype == np.uint16
    assert len(types["nuclei"]) == results[0]["nuclei"] == len(np.unique(inst[inst > 0]))
    with pytest.raises(CmdfedError, match="not found"):
        predict_files([tmp_path / "missing.png"], checkpoint, tmp_path / "out", CPU)


def test_checkpoint_config_mismatch_is_one_clear_error(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    folder = next(bad.glob("step-*"))
    config = json.loads((folder / "config.json").read_text())
    config["model"]["head_width"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CmdfedError, match="weights do not match the config"):
        load_model(bad, CPU)


def test_a_16_bit_image_is_scaled_not_clipped(checkpoint, tmp_path):
    grey = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # same picture, 16 bits
    predict_files([tmp_path / "eight.png", tmp_path / "sixteen.png"], checkpoint, tmp_path / "out", CPU, mpp=0.5)
    eight, sixteen = (np.asarray(Image.open(tmp_path / "out" / f"{n}_inst.png")) for n in ("eight", "sixteen"))
    assert np.array_equal(eight, sixteen)


def test_images_with_the_same_name_are_refused_before_anything_is_written(checkpoint, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / folder / "tile.png")
    with pytest.raises(CmdfedError, match="several images are named tile"):
        predict_files([tmp_path / "a" / "tile.png", tmp_path / "b" / "tile.png"], checkpoint, tmp_path / "out", CPU)
    assert not (tmp_path / "out").exists()


def test_a_model_conditioned_on_a_foundation_model_predicts_and_evaluates(synthetic_store, tiny_dinov2_dir, tmp_path):
    from cmdfed.evaluate.run import evaluate_checkpoint

    config = ModelConfig.from_preset("tiny", fm_kind=f"hf:{tiny_dinov2_dir}", fm_dim=32)
    train = TrainConfig(steps=1, batch_size=2, warmup_steps=1, checkpoint_every=1, sample_every=0)
    finetune(synthetic_store, tmp_path / "ft", init=None, model_config=config, train_config=train, device="cpu")
    summary = evaluate_checkpoint(tmp_path / "ft", synthetic_store, device=CPU, batch_size=4)
    assert 0 <= summary["mean_dice"] <= 1 and summary["tiles"] > 0
    assert summary["postprocess"]["sobel_kernel_size"] == 11  # scaled to the store's 0.5 um/px
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert predict_files([tmp_path / "a.png"], tmp_path / "ft", tmp_path / "out", CPU, mpp=0.5)[0]["image"] == "a"


def test_evaluation_refuses_a_store_labelled_with_other_classes(checkpoint, tmp_path):
    from cmdfed.data.store import create_store
    from cmdfed.data.synth import synth_tiles
    from cmdfed.evaluate.run import evaluate_checkpoint

    other = tmp_path / "other.zarr"
    with (
        create_store(
            other, tile_size=64, class_names=["background", "tumour", "immune", "other"], has_types=True
        ) as store,
        store.writer() as writer,
    ):
        writer.extend(synth_tiles(2, 64, 0, 1))
    with pytest.raises(CmdfedError, match="type ids would be compared across different classes"):
        evaluate_checkpoint(checkpoint, other, device=CPU)
    with pytest.raises(CmdfedError, match="--batch-size must be at least 1"):
        evaluate_checkpoint(checkpoint, other, device=CPU, batch_size=0)
