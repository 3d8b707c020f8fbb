"""Fixtures shared by all test folders."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_files() -> dict[str, Path]:
    """The real sample images, fetched once per machine into the user cache (needs the index)."""
    from cmdfed.data.samples import fetch_samples

    return fetch_samples()


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """A small labelled synthetic store (12 tiles of 64 px, shards of 4)."""
    from cmdfed.data.store import create_store
    from cmdfed.data.synth import CLASS_NAMES, synth_tiles

    path = tmp_path_factory.mktemp("stores") / "synthetic.zarr"
    with (
        create_store(path, tile_size=64, class_names=CLASS_NAMES, has_types=True, mpp=0.5, shard_tiles=4) as store,
        store.writer() as writer,
    ):
        writer.extend(synth_tiles(12, tile_size=64, site=0, seed=0))
    return path


@pytest.fixture
def flower_task_identity():
    """What Flower sets in a ServerApp or ClientApp process before it builds messages
    (for tests that call the apps in this process)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Dinov2 saved with save_pretrained (64 px input, 8 px patches)."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=8
    )
    directory = tmp_path_factory.mktemp("tiny_dinov2")
    transformers.Dinov2Model(config).save_pretrained(directory)
    return directory
