"""Shared edge fixtures: a briefly trained tiny checkpoint, a signed bundle of it (exported
once per session: export is the slow step), keys, and a small pyramid TIFF slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmdfed.data.synth import synth_tiles
from cmdfed.inference.postprocess import WatershedParams
from cmdfed.inference.segment import load_model, predict_maps
from cmdfed.model.config import ModelConfig
from cmdfed.train.loop import TrainConfig
from cmdfed.train.phases import finetune
from edge.deploy import deploy
from edge.export import export_bundle
from edge.signing import generate_key_pair

TILE, OVERLAP = 128, 32


@pytest.fixture(scope="session")
def checkpoint(synthetic_store, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("edge-runs") / "ft"
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=2, sample_every=0)
    finetune(
        synthetic_store, run, init=None, model_config=ModelConfig.from_preset("tiny"), train_config=config, device="cpu"
    )
    return run


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return generate_key_pair(tmp_path_factory.mktemp("keys") / "signer")


def tuned_params(checkpoint: Path) -> WatershedParams:
    """A 2-step model's nucleus probabilities sit just around 0.5, slightly higher on nuclei; a
    threshold at their upper quartile (what tuning would pick) makes it find nucleus-like blobs."""
    loaded = load_model(checkpoint, torch.device("cpu"))
    image = next(iter(synth_tiles(1, tile_size=TILE, seed=5))).image
    np_prob = predict_maps(loaded.model, image[None], torch.device("cpu"))["np"]
    return WatershedParams(
        foreground_threshold=float(np.percentile(np_prob, 75)), sobel_kernel_size=11, marker_opening_size=3
    )


@pytest.fixture(scope="session")
def signed_bundle(checkpoint, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "cmd"
    # fp32 only: the INT8 and bf16 variants' exports and choices are tested on their own bundles
    # (test_quantize.py, test_openvino_cpu.py).
    export_bundle(
        checkpoint,
        out,
        tile=TILE,
        overlap=OVERLAP,
        mpp=0.5,
        sign_key=keys[0],
        postprocess=tuned_params(checkpoint),
        int8=False,
        bf16=False,
    )
    return out


def int8_bundle(checkpoint, out, **gate):
    export_bundle(
        checkpoint, out, tile=TILE, overlap=OVERLAP, mpp=0.5, postprocess=tuned_params(checkpoint), bf16=False, **gate
    )
    return out


@pytest.fixture(scope="module")
def int8_home(checkpoint, tmp_path_factory):
    """A 2-step model's PQ is near zero and moves by chance with 8-bit activations: the gate is
    opened wide here so that the choice between two sound graphs is what is tested."""
    folder = tmp_path_factory.mktemp("int8-pass")
    deploy(int8_bundle(checkpoint, folder / "bundle", max_pq_drop=1.0, int8_tolerance=1.0), folder / "home")
    return folder / "home"


@pytest.fixture(scope="module")
def int8_failing_home(checkpoint, tmp_path_factory):
    """A golden tolerance no 8-bit graph meets: the INT8 variant fails its gate at export."""
    folder = tmp_path_factory.mktemp("int8-fail")
    deploy(int8_bundle(checkpoint, folder / "bundle", int8_tolerance=1e-9), folder / "home")
    return folder / "home"


def write_pyramid_tiff(path: Path, image: np.ndarray, mpp: float = 0.5) -> Path:
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (64, 64), "resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
        tif.write(image, subifds=1, **options)
        tif.write(image[::2, ::2], subfiletype=1, tile=(64, 64))
    return path


def synthetic_slide_image(rows: int = 2, cols: int = 3, seed: int = 1) -> np.ndarray:
    """Synthetic H&E tiles (128 px) side by side on white glass, with a margin."""
    tiles = [t.image for t in synth_tiles(rows * cols, tile_size=TILE, seed=seed)]
    image = np.full((rows * TILE + 60, cols * TILE + 70, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        image[30 + r * TILE : 30 + (r + 1) * TILE, 35 + c * TILE : 35 + (c + 1) * TILE] = tile
    return image


@pytest.fixture(scope="session")
def slide_tiff(tmp_path_factory) -> Path:
    return write_pyramid_tiff(tmp_path_factory.mktemp("slides") / "case-001.tif", synthetic_slide_image())


@pytest.fixture(scope="module")
def home(signed_bundle, tmp_path_factory) -> Path:
    """An edge home with the signed bundle deployed and active, one per test module."""
    home = tmp_path_factory.mktemp("edge-home")
    deploy(signed_bundle, home)
    return home
