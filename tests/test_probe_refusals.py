"""Issue 14's probe of the command line, kept as a fault-injection test: each broken input a user
or an attacker gave, and the one-line refusal it must get, with nothing written (findings 7
and 8; the service's and the ingest server's refusals are in tests/edge/test_service_limits.py
and tests/telemetry/remote/test_ingest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def cmdfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmdfed", *map(str, args)], capture_output=True, text=True, check=False
    )


def refused(result: subprocess.CompletedProcess, *phrases: str) -> bool:
    """Exit 1 with one line naming every phrase, and no traceback or 'internal error'."""
    lines = result.stderr.strip().splitlines()
    return (
        result.returncode == 1
        and len(lines) == 1
        and all(phrase in lines[0] for phrase in phrases)
        and "internal error" not in result.stderr
    )


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "config, phrases",
    [
        ({"train": [1]}, ["'train' section must be a JSON object", "not list"]),
        ({"model": "tiny"}, ["'model' section must be a JSON object", "not str"]),
        ({"optimiser": {}}, ["does not use the 'optimiser' section"]),
        ([1, 2], ["must be a JSON object with optional sections"]),
    ],
    ids=["train-list", "model-text", "unknown-section", "not-object"],
)
def test_a_config_file_of_the_wrong_shape_is_refused_before_training(tmp_path, config, phrases):
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    before = files_under(tmp_path)
    result = cmdfed(
        "train",
        "pretrain",
        "--store",
        tmp_path / "s.zarr",
        "--out",
        tmp_path / "run",
        "--config",
        tmp_path / "cfg.json",
    )
    assert refused(result, *phrases), result.stderr
    assert files_under(tmp_path) == before


def test_finetune_from_a_pretraining_run_refuses_a_model_section_it_would_ignore(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"model": {"n_classes": 7}, "train": {"steps": 1}}))
    before = files_under(tmp_path)
    result = cmdfed(
        "train",
        "finetune",
        "--store",
        tmp_path / "s.zarr",
        "--init",
        tmp_path / "pretrained",
        "--out",
        tmp_path / "run",
        "--config",
        tmp_path / "cfg.json",
    )
    assert refused(result, "does not use the 'model' section with --init", "pretraining run"), result.stderr
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("tile", ["0", "-32", "100"])
def test_a_tile_size_that_is_not_a_positive_multiple_of_32_says_so(tmp_path, tile):
    slide = tmp_path / "slide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)).save(slide)
    result = cmdfed("data", "tile-slide", slide, tmp_path / "s.zarr", "--tile", tile)
    assert refused(result, "tile size must be a positive multiple of 32", f"got {tile}"), result.stderr
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("mask", ["a_inst.jpg", "a_inst.JPEG", "a_types.jpg"])
def test_a_lossy_mask_is_refused_by_name_even_with_allow_unlabelled(tmp_path, mask):
    folder = tmp_path / "site"
    folder.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    Image.fromarray(image).save(folder / "a.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / mask, format="JPEG")
    result = cmdfed("data", "import", "folder", folder, tmp_path / "s.zarr", "--tile", "64", "--allow-unlabelled")
    assert refused(result, mask, "lossy", ".png"), result.stderr
    assert not (tmp_path / "s.zarr").exists()
