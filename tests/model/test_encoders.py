"""Frozen FM encoders: the HuggingFace path for real (tiny random Dinov2), errors, timm if present."""

from __future__ import annotations

import json

import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.model import TIMM_PRESETS, DiffusionConfig, MaskedDiffusion, ModelConfig, build_encoder, build_model
from cmdfed.model.encoders import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def encoder(tiny_dinov2_dir):
    return build_encoder(f"hf:{tiny_dinov2_dir}")


def test_hf_encoder_features_and_shapes(encoder, make_images):
    x = make_images(2, 64)
    fm = encoder(x)
    assert encoder.feature_dim == 32 and encoder.input_size == 64
    assert fm.cls.shape == (2, 32) and fm.patch_mean.shape == (2, 32)
    assert fm.patch_grid.shape == (2, 32, 8, 8)
    # Same numbers as running the Dinov2 by hand: [0, 1] pixels, ImageNet normalisation, CLS first,
    # patch tokens row-major after it.
    pixels = ((x + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = encoder.backbone(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(fm.cls, tokens[:, 0])
    torch.testing.assert_close(fm.patch_grid[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])
    torch.testing.assert_close(fm.patch_mean, tokens[:, 1:].mean(dim=1))


def test_hf_encoder_is_frozen(encoder, make_images):
    encoder.train()
    assert not encoder.training and not encoder.backbone.training
    assert not any(p.requires_grad for p in encoder.parameters())
    x = make_images(1).requires_grad_(True)
    assert not encoder(x).cls.requires_grad


def test_larger_tiles_are_resized_to_the_fm_input(encoder, make_images):
    assert encoder(make_images(1, 128)).patch_grid.shape == (1, 32, 8, 8)


def test_fm_features_ignore_hidden_pixels(encoder, make_images):
    clean, other = make_images(2, 96, seed=0), make_images(2, 96, seed=1)
    mask = torch.zeros(2, 1, 96, 96)
    mask[..., 10:50, 20:70] = 1
    mixed = torch.where(mask.bool(), other, clean)
    a, b = encoder(clean, mask), encoder(mixed, mask)
    for field in ("cls", "patch_mean", "patch_grid"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(encoder(clean).cls, encoder(mixed).cls)  # without the mask they differ


def test_register_tokens_are_not_patches(tmp_path, make_images):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no Dinov2WithRegistersModel")
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=8,
        num_register_tokens=4,
    )
    transformers.Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    encoder = build_encoder(f"hf:{tmp_path}")
    x = make_images(1, 64)
    fm = encoder(x)
    pixels = ((x + 1) / 2 - encoder.mean) / encoder.std
    with torch.no_grad():
        tokens = encoder.backbone(pixel_values=pixels).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 64
    torch.testing.assert_close(fm.patch_grid[:, :, 0, 0], tokens[:, 5])


def test_preprocessor_config_sets_normalisation_and_size(tiny_dinov2_dir, tmp_path):
    for file in tiny_dinov2_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": [0.7, 0.6, 0.7], "image_std": [0.2, 0.2, 0.2], "crop_size": {"height": 32, "width": 32}}
        )
    )
    encoder = build_encoder(f"hf:{tmp_path}")
    assert encoder.input_size == 32
    torch.testing.assert_close(encoder.mean.flatten(), torch.tensor([0.7, 0.6, 0.7]))
    assert encoder(torch.zeros(1, 3, 64, 64)).patch_grid.shape == (1, 32, 4, 4)


def test_cmd_model_accepts_hf_features(encoder, make_images):
    config = ModelConfig.from_preset("tiny", fm_kind="hf:dir", fm_dim=encoder.feature_dim, use_patch_grid=True)
    model = build_model(config)
    x = make_images(2)
    outputs = model.segment(x, encoder(x))
    assert outputs["np"].shape == (2, 2, 64, 64)
    diffusion = MaskedDiffusion(DiffusionConfig())
    loss = diffusion.training_loss(model, x, encoder, generator=torch.Generator().manual_seed(0))
    loss.loss.backward()
    assert model.conditioning.fm_vector.mlp[0].weight.grad is not None


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(CmdfedError, match="config.json"):
        build_encoder(f"hf:{tmp_path / 'nowhere'}")


def test_garbage_weights_are_one_clear_error(tiny_dinov2_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dinov2_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CmdfedError, match="could not load"):
        build_encoder(f"hf:{tmp_path}")


def test_weights_missing_keys_are_named(tiny_dinov2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_text((tiny_dinov2_dir / "config.json").read_text())
    weights = load_file(str(tiny_dinov2_dir / "model.safetensors"))
    dropped = "encoder.layer.1.mlp.fc1.weight"
    del weights[dropped]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CmdfedError, match=dropped.replace(".", r"\.")):
        build_encoder(f"hf:{tmp_path}")


def test_factory_rejects_bad_kinds_and_missing_timm_weights(tmp_path):
    assert build_encoder("none")(torch.zeros(1, 3, 64, 64)) is None
    with pytest.raises(CmdfedError, match="unknown FM encoder kind"):
        build_encoder("uni")
    with pytest.raises(CmdfedError, match="unknown timm FM preset"):
        build_encoder("timm:resnet50", tmp_path / "w.safetensors")
    with pytest.raises(CmdfedError, match="needs a local weights file"):
        build_encoder("timm:uni")
    with pytest.raises(CmdfedError, match="not found"):
        build_encoder("timm:uni", tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_timm_preset_loads_its_own_weights(tmp_path, make_images):
    """Only where timm imports; builds a random ViT-L (300 M parameters, ~1.2 GB), hence slow and only UNI."""
    timm = pytest.importorskip("timm")
    name = "uni"
    from safetensors.torch import save_file

    preset = TIMM_PRESETS[name]
    kwargs = dict(preset.kwargs)
    if preset.swiglu:
        kwargs.update(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
    reference = timm.create_model(preset.architecture, pretrained=False, **kwargs)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    encoder = build_encoder(f"timm:{name}", weights)
    fm = encoder(make_images(1, 64))
    assert fm.cls.shape == (1, preset.feature_dim)
    assert fm.patch_grid.shape == (1, preset.feature_dim, 224 // preset.patch_size, 224 // preset.patch_size)
    save_file({"not.a.key": torch.zeros(1)}, str(weights))
    with pytest.raises(CmdfedError, match="missing"):
        build_encoder(f"timm:{name}", weights)
