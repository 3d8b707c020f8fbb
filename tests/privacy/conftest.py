"""A small synthetic site store and quick private run configs (tiny model, 64 px tiles)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmdfed.data.synth import write_synthetic_store
from cmdfed.federation.config import FederationConfig

CLASSES = "epithelial,lymphocyte,stromal"


@pytest.fixture(scope="session")
def site_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("private-site") / "site.zarr"
    write_synthetic_store(path, 8, site=1, seed=1, tile_size=64)
    return path


@pytest.fixture
def private_config(tmp_path):
    def make(**overrides) -> FederationConfig:
        values = {
            "run_dir": str(tmp_path / "run"),
            "classes": CLASSES,
            "pretrain_rounds": 3,
            "finetune_rounds": 1,
            "local_steps": 2,
            "batch_size": 2,
            "eval_tiles": 2,
            "augment": False,
            "dp_mode": "local",
            "dp_epsilon": 50.0,
        }
        return FederationConfig(**{**values, **overrides})

    return make
