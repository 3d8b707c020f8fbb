"""Two small synthetic site stores with different stain styles, and quick run configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmdfed.data.synth import write_synthetic_store
from cmdfed.federation.config import FederationConfig

CLASSES = "epithelial,lymphocyte,stromal"


@pytest.fixture(scope="session")
def site_stores(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    paths = []
    for k in (1, 2):
        paths.append(root / f"site{k}.zarr")
        write_synthetic_store(paths[-1], 6, site=k, seed=k, tile_size=64)
    return paths


@pytest.fixture
def quick_config(tmp_path):
    """Run configs of one local step of two tiles on the tiny model: seconds per round on a CPU."""

    def make(**overrides) -> FederationConfig:
        values = {
            "run_dir": str(tmp_path / "run"),
            "classes": CLASSES,
            "pretrain_rounds": 2,
            "finetune_rounds": 2,
            "local_steps": 1,
            "batch_size": 2,
            "eval_tiles": 2,
            "augment": False,
        }
        return FederationConfig(**{**values, **overrides})

    return make
