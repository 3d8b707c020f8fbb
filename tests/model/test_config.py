"""ModelConfig / DiffusionConfig: presets, JSON round trip, validation."""

from __future__ import annotations

import json

import pytest

from cmdfed.errors import CmdfedError
from cmdfed.model import MODEL_PRESETS, DiffusionConfig, ModelConfig, cmd_base, cmd_tiny


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig.from_preset("base", fm_kind="timm:uni", fm_dim=1024, use_patch_grid=True, n_classes=6),
        ModelConfig(),
        DiffusionConfig(prediction="v", mask_block_size=16),
    ],
)
def test_json_round_trip(config):
    text = json.dumps(config.to_dict())
    assert type(config).from_dict(json.loads(text)) == config


def test_presets():
    base = ModelConfig.from_preset("base")
    assert base.widths == (96, 192, 384, 768) and base.depths == (3, 3, 9, 3) and base.preset == "base"
    assert ModelConfig() == ModelConfig.from_preset("tiny")
    assert set(MODEL_PRESETS) == {"tiny", "base"}
    with pytest.raises(CmdfedError, match="unknown model preset"):
        ModelConfig.from_preset("huge")
    assert ModelConfig.from_preset("base", **base.to_dict()) == base  # a saved config re-applied
    with pytest.raises(CmdfedError, match="unknown ModelConfig keys"):
        ModelConfig.from_preset("tiny", depth=3)
    with pytest.raises(CmdfedError, match="overrides say preset='tiny'"):
        ModelConfig.from_preset("base", **ModelConfig().to_dict())


def test_presets_are_factories_with_overrides():
    assert cmd_base(n_classes=5) == ModelConfig.from_preset("base", n_classes=5)
    assert cmd_tiny() == ModelConfig() and cmd_tiny(drop_path=0.2).drop_path == 0.2
    assert {name: factory().preset for name, factory in MODEL_PRESETS.items()} == {"tiny": "tiny", "base": "base"}


def test_unknown_keys_are_rejected():
    data = ModelConfig().to_dict() | {"width": 64}
    with pytest.raises(CmdfedError, match=r"unknown ModelConfig keys \['width'\]"):
        ModelConfig.from_dict(data)
    with pytest.raises(CmdfedError, match="unknown DiffusionConfig keys"):
        DiffusionConfig.from_dict({"steps": 10})


def test_json_numbers_are_coerced_where_safe():
    config = DiffusionConfig.from_dict({"mask_ratio": 1 / 2, "visible_loss_weight": 0})
    assert config.visible_loss_weight == 0.0 and isinstance(config.visible_loss_weight, float)
    assert ModelConfig.from_dict({"widths": [8, 16, 32, 64]}).widths == (8, 16, 32, 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"widths": [32, 64, 128]}, "widths must be 4"),
        ({"depths": "2222"}, "list of integers"),
        ({"cond_dim": 32.0}, "must be an integer"),
        ({"use_patch_grid": 1}, "true or false"),
        ({"drop_path": 1.0}, "drop_path"),
        ({"fm_dim": 1024}, "fm_dim must be 0 exactly when fm_kind is none"),
        ({"fm_kind": "timm:uni"}, "fm_dim must be 0 exactly"),
        ({"fm_kind": "uni", "fm_dim": 8}, "fm_kind must be"),
        ({"use_patch_grid": True}, "use_patch_grid needs an FM"),
        ({"fm_kind": "hf:x", "fm_dim": 8, "fm_vector": "none"}, "neither fm_vector nor use_patch_grid"),
        ({"fm_vector": "mean"}, "fm_vector must be one of"),
        ({"np_channels": 3}, "np_channels"),
        ({"n_classes": 1}, "n_classes"),
    ],
)
def test_model_config_validation(overrides, message):
    with pytest.raises(CmdfedError, match=message):
        ModelConfig.from_dict(ModelConfig().to_dict() | overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prediction": "score"}, "prediction must be one of"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_block_size": 24}, "mask_block_size"),
        ({"sampling_steps": 0}, "sampling_steps"),
        ({"timesteps": 1}, "timesteps"),
        ({"clip_x0": "yes"}, "true or false"),
    ],
)
def test_diffusion_config_validation(overrides, message):
    with pytest.raises(CmdfedError, match=message):
        DiffusionConfig(**overrides)
