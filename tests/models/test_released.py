"""The released models as a user meets them: listed, carded, and taken by name."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.model.checkpoint import load_checkpoint, resolve_checkpoint
from cmdfed.models import released_model

NAMES = ("cmd-tiny-he", "cmd-tiny-he-nuclei", "cmd-tiny-he-nuclei-dev")


def cmdfed(*args):
    return subprocess.run([sys.executable, "-m", "cmdfed", *args], capture_output=True, text=True, check=False)


def test_the_released_models_are_listed_with_their_cards():
    listed = json.loads(cmdfed("models", "list", "--json").stdout)["models"]
    assert [m["name"] for m in listed] == list(NAMES)
    for name in NAMES:
        card = json.loads(cmdfed("models", "show", name, "--json").stdout)
        for key in ("summary", "data", "origin_and_terms", "command", "commit", "steps", "mpp", "good_for", "not_for"):
            assert card[key], (name, key)
        assert card["command"].startswith("python -m benchmarks.release_models")
    for segmenter in ("cmd-tiny-he-nuclei", "cmd-tiny-he-nuclei-dev"):
        assert released_model(segmenter).card["dev_split_scores"]["rows"]  # the recipe's measured scores


def test_an_unknown_name_lists_the_released_ones():
    result = cmdfed("models", "show", "cmd-huge")
    assert result.returncode == 1 and "no released model named 'cmd-huge'" in result.stderr
    assert all(name in result.stderr for name in NAMES)
    with pytest.raises(CmdfedError, match="cmd-tiny-he-nuclei"):
        resolve_checkpoint("cmd-tny-he")


def test_a_path_wins_over_a_released_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cmd-tiny-he").mkdir()
    with pytest.raises(CmdfedError, match="neither a checkpoint"):
        resolve_checkpoint("cmd-tiny-he")  # the user's folder, not the package's model


def test_released_weights_load_and_carry_their_resolution():
    backbone = load_checkpoint("cmd-tiny-he")
    nuclei = load_checkpoint("cmd-tiny-he-nuclei")
    assert backbone.config["phase"] == "pretrain" and nuclei.config["phase"] == "finetune"
    assert backbone.config["mpp"] == nuclei.config["mpp"] == 0.5
    assert backbone.trainer is None and not (backbone.path / "trainer.pt").exists()  # weights only
    assert not (nuclei.path / "postprocess.json").exists()  # untuned: scaled settings (see its card)
    assert sum(v.numel() for v in nuclei.weights.values()) > 2e6
    assert all(torch.isfinite(v).all() for v in nuclei.weights.values())


def test_finetuning_by_default_is_end_to_end_and_init_takes_the_released_backbone(synthetic_store, tmp_path):
    common = ["--store", str(synthetic_store), "--steps", "1", "--batch-size", "2", "--device", "cpu", "--json"]
    default = cmdfed("train", "finetune", "--out", str(tmp_path / "ft"), *common)
    assert default.returncode == 0, default.stderr
    config = json.loads((tmp_path / "ft" / "step-000001" / "config.json").read_text())
    assert config["init"] is None and config["trainable"] == "all" and config["model"]["preset"] == "tiny"
    from_backbone = cmdfed("train", "finetune", "--out", str(tmp_path / "ft2"), "--init", "cmd-tiny-he", *common)
    assert from_backbone.returncode == 0, from_backbone.stderr
    config = json.loads((tmp_path / "ft2" / "step-000001" / "config.json").read_text())
    assert config["init"].startswith("cmd-tiny-he/") and config["trainable"] == "all"
    started = load_checkpoint(tmp_path / "ft2").weights
    backbone = load_checkpoint("cmd-tiny-he").weights
    key = next(k for k in backbone if k.startswith("stem"))
    # one warm-up step (LR 1e-5) away from the backbone's weights, far from any random draw
    assert np.allclose(started[key].numpy(), backbone[key].numpy(), atol=1e-3)
