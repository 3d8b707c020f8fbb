"""Frozen pathology foundation-model (FM) encoders that produce CMD's conditioning features.

One factory, ``build_encoder(kind, weights_path=None, **overrides)``:

* ``none``: no FM; the U-Net is conditioned on the timestep only.
* ``timm:<preset>``: a timm ViT built with ``pretrained=False`` and loaded from a local
  weights file (``.safetensors``, or a torch pickle read with ``weights_only=True``).
  Presets carry each model's published timm kwargs and normalisation; sources:
  UNI (MahmoodLab/UNI model card), UNI2-h (MahmoodLab/UNI2-h card), Virchow2
  (paige-ai/Virchow2 card and its config.json ``model_args`` / ``pretrained_cfg``),
  H-optimus-0 (bioptimus/H-optimus-0 card and config.json). Values were checked against
  those cards and several independent loaders; nothing here was run against the real
  weights on this machine (timm does not import beside the CPU torch build).
* ``hf:<local dir>``: a HuggingFace model directory (e.g. Phikon-v2, a Dinov2) loaded with
  ``AutoModel.from_pretrained(dir, local_files_only=True)``; normalisation and input size
  come from the directory's ``preprocessor_config.json`` when present.

Nothing is ever downloaded. A missing file, a missing directory, unreadable weights or
weights that do not fit the architecture raise one ``CmdfedError`` naming what was
expected and a few of the offending keys.

Input contract: images are float tensors in [-1, 1], (B, 3, H, W), the same tensor the
U-Net sees. The encoder maps them to [0, 1], resizes to the FM's native input size
(bilinear with antialiasing; the model cards use bicubic or bilinear PIL resizes, and
the small difference is accepted to keep one resize path), and normalises with the FM's
mean/std. FM weights are frozen: eval mode always, ``requires_grad=False``, run under
``torch.no_grad``.

Masking (pre-training): pass ``mask`` (B, 1, H, W), 1 = hidden. Hidden pixels are set to
the FM's mean colour before anything else, i.e. to exactly zero after normalisation, so
the FM's features are a function of the visible pixels only. Without this the FM would
hand the U-Net a description of the very content it is asked to inpaint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmdfed.errors import CmdfedError
from cmdfed.model.checkpoint import state_dict_mismatch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FMFeatures:
    """Frozen-FM outputs for a batch: CLS token, mean patch token and the patch-token grid."""

    cls: Tensor  # (B, D)
    patch_mean: Tensor  # (B, D)
    patch_grid: Tensor  # (B, D, h, w)

    @property
    def feature_dim(self) -> int:
        return self.cls.shape[-1]


@dataclass(frozen=True)
class TimmPreset:
    """A timm ViT as its authors publish it: architecture, kwargs and normalisation."""

    architecture: str
    kwargs: dict[str, Any]
    feature_dim: int
    patch_size: int
    input_size: int = 224
    swiglu: bool = False  # mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU (needs timm)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    notes: str = field(default="", compare=False)


TIMM_PRESETS: dict[str, TimmPreset] = {
    "uni": TimmPreset(
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        feature_dim=1024,
        patch_size=16,
        notes="MahmoodLab/UNI; ViT-L/16, no register tokens",
    ),
    "uni2-h": TimmPreset(
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        feature_dim=1536,
        patch_size=14,
        swiglu=True,
        notes="MahmoodLab/UNI2-h; 8 register tokens",
    ),
    "virchow2": TimmPreset(
        "vit_huge_patch14_224",
        {
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        feature_dim=1280,
        patch_size=14,
        swiglu=True,
        notes="paige-ai/Virchow2; 4 register tokens; authors' tile embedding is CLS || mean patch",
    ),
    "h-optimus-0": TimmPreset(
        "vit_giant_patch14_reg4_dinov2",
        {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        feature_dim=1536,
        patch_size=14,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        notes="bioptimus/H-optimus-0; 4 register tokens; card: 224 px tiles at 0.5 um/px",
    ),
}


class NoEncoder(nn.Module):
    """The ``none`` encoder: no FM features, the U-Net is conditioned on the timestep only."""

    feature_dim = 0

    def forward(self, images: Tensor, mask: Tensor | None = None) -> None:
        return None


class FrozenEncoder(nn.Module):
    """A frozen FM backbone with its input handling; ``backend`` says how to read its tokens."""

    def __init__(
        self,
        backbone: nn.Module,
        backend: str,
        feature_dim: int,
        patch_size: int,
        input_size: int | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.backend = backend
        self.feature_dim = feature_dim
        self.patch_size = patch_size
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        # Frozen means frozen: dropout and friends stay off whatever the caller does.
        return super().train(False)

    def tokens(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, prefix + patches, D) final-layer tokens."""
        if self.backend == "timm":
            return self.backbone.forward_features(pixels)
        return self.backbone(pixel_values=pixels).last_hidden_state

    @torch.no_grad()
    def forward(self, images: Tensor, mask: Tensor | None = None) -> FMFeatures:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise CmdfedError(
                f"FM encoder expects float images of shape (B, 3, H, W) in [-1, 1], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if mask is not None and tuple(mask.shape) != (images.shape[0], 1, *images.shape[2:]):
            raise CmdfedError(
                f"mask must have shape {(images.shape[0], 1, *images.shape[2:])} "
                f"(nonzero = hidden), got {tuple(mask.shape)}"
            )
        pixels = (images.to(self.mean.dtype) + 1) / 2
        if mask is not None:
            pixels = torch.where(mask.bool(), self.mean, pixels)
        if self.input_size is not None and tuple(pixels.shape[-2:]) != (self.input_size,) * 2:
            pixels = F.interpolate(
                pixels, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        pixels = (pixels - self.mean) / self.std
        height, width = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        tokens = self.tokens(pixels.to(next(self.backbone.parameters()).dtype)).float()
        # Prefix = CLS (+ register tokens); patch tokens are the last h*w, row-major.
        patches = tokens[:, tokens.shape[1] - height * width :]
        grid = patches.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
        return FMFeatures(cls=tokens[:, 0], patch_mean=patches.mean(dim=1), patch_grid=grid)


def build_encoder(kind: str, weights_path: str | os.PathLike | None = None, input_size: int | None = None) -> nn.Module:
    """``none`` | ``timm:<uni|uni2-h|virchow2|h-optimus-0>`` (+ weights_path) | ``hf:<dir>``.

    ``input_size`` overrides the FM's native input side (tiles are resized to it).
    """
    if kind == "none":
        return NoEncoder()
    if kind.startswith("timm:"):
        return _build_timm(kind.removeprefix("timm:"), weights_path, input_size)
    if kind.startswith("hf:"):
        if weights_path is not None:
            raise CmdfedError("hf: encoders take their directory in the kind string (hf:<dir>), not weights_path")
        return _build_hf(Path(kind.removeprefix("hf:")), input_size)
    raise CmdfedError(f"unknown FM encoder kind {kind!r}; use none, timm:<preset> or hf:<directory>")


def frozen_encoder(kind: str, weights_path: str | os.PathLike | None, device: torch.device | str) -> nn.Module | None:
    """The frozen FM encoder a model config names (``fm_kind``) on ``device``; None for ``none``."""
    if kind == "none":
        return None
    return build_encoder(kind, weights_path).to(device)


def _build_timm(preset_name: str, weights_path: str | os.PathLike | None, input_size: int | None) -> FrozenEncoder:
    if preset_name not in TIMM_PRESETS:
        raise CmdfedError(f"unknown timm FM preset {preset_name!r}; choose one of {', '.join(TIMM_PRESETS)}")
    preset = TIMM_PRESETS[preset_name]
    weights = _require_file(weights_path, f"timm:{preset_name}")
    try:
        import timm  # lazy: timm pulls in torchvision, which the CPU torch build cannot import
    except ImportError as error:
        raise CmdfedError(f"timm:{preset_name} needs timm: pip install 'cmdfed[fm]'") from error
    kwargs = dict(preset.kwargs)
    if preset.swiglu:
        kwargs.update(mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU)
    backbone = timm.create_model(preset.architecture, pretrained=False, **kwargs)
    _load_exact(backbone, _read_state_dict(weights), f"timm:{preset_name}", weights)
    return FrozenEncoder(
        backbone,
        "timm",
        preset.feature_dim,
        preset.patch_size,
        input_size or preset.input_size,
        preset.mean,
        preset.std,
    )


def _build_hf(path: Path, input_size: int | None) -> FrozenEncoder:
    if not (path / "config.json").is_file():
        raise CmdfedError(
            f"hf:{path}: expected a HuggingFace model directory containing config.json and model "
            f"weights (save_pretrained output); nothing is downloaded"
        )
    try:
        from transformers import AutoModel  # lazy: slow to import and only this path needs it
    except ImportError as error:
        raise CmdfedError("hf: encoders need transformers: pip install transformers") from error
    try:
        backbone, info = AutoModel.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True, trust_remote_code=False
        )
    except Exception as error:  # any loader failure means a bad directory to the user
        raise CmdfedError(f"hf:{path}: could not load the model ({type(error).__name__}: {error})") from error
    # mask_token is only used for masked-image-modelling inputs, which are never passed.
    missing = sorted(k for k in info["missing_keys"] if not k.endswith("mask_token"))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    if missing or mismatched:
        raise CmdfedError(
            f"hf:{path}: weights do not match {type(backbone).__name__}: {len(missing)} missing "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(mismatched)} of the wrong shape "
            f"(e.g. {', '.join(mismatched[:3]) or '-'})"
        )
    config = backbone.config
    mean, std, processor_size = _read_preprocessor(path)
    return FrozenEncoder(
        backbone,
        "hf",
        config.hidden_size,
        config.patch_size,
        input_size or processor_size or config.image_size,
        mean,
        std,
    )


def _require_file(weights_path: str | os.PathLike | None, what: str) -> Path:
    if weights_path is None:
        raise CmdfedError(f"{what} needs a local weights file (weights_path); nothing is downloaded")
    path = Path(weights_path)
    if not path.is_file():
        raise CmdfedError(f"{what}: weights file {path} not found")
    return path


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable weights are a user error
        raise CmdfedError(f"could not read weights {path} ({type(error).__name__}: {error})") from error


def _load_exact(model: nn.Module, state_dict: dict[str, Tensor], what: str, path: Path) -> None:
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise CmdfedError(f"{what}: {path} does not match {type(model).__name__}: {mismatch}")
    model.load_state_dict(state_dict)


def _read_preprocessor(path: Path) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    config_file = path / "preprocessor_config.json"
    if not config_file.is_file():
        return IMAGENET_MEAN, IMAGENET_STD, None
    config = json.loads(config_file.read_text())
    crop = config.get("crop_size") if config.get("do_center_crop", True) else None
    size = crop if crop is not None else config.get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    return tuple(config.get("image_mean", IMAGENET_MEAN)), tuple(config.get("image_std", IMAGENET_STD)), size
