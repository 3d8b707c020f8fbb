"""Model and diffusion settings as validated, JSON-serialisable dataclasses.

The CMD paper fixes the design (ConvNeXt U-Net, masked pixel-space diffusion, adaptive
normalisation on frozen FM features, small task heads) but few numbers, so every recipe
number is a field here, and each default says where it comes from:

* Presets are size factories, one function each (``cmd_tiny``, ``cmd_base``; by name in
  ``MODEL_PRESETS``), as DiT's ``DiT_S_2``... are. ``base`` = ConvNeXt-T encoder (widths
  96-192-384-768, depths 3-3-9-3; Liu et al. 2022), so its cost and behaviour are known;
  ``tiny`` (ModelConfig's defaults) exists for CPU tests and demos (< 5 M).
* ``decoder_depths`` (blocks per decoder level, listed finest first: 1/4, 1/8, 1/16) is
  2 in ``base``: two 7x7 blocks at 1/4 resolution reach +-24 px, enough to carry context
  into the middle of a 32-px hole.
* ``full_res_width``/``full_res_depth``: the last decoder level runs at full resolution
  so nuclear boundaries and HV maps are pixel-exact; it is narrow because its cost
  scales with H*W.
* ``drop_path`` 0.1 in ``base`` (ConvNeXt-T's ImageNet value); 0 in ``tiny``. It has no
  parameters, so fine-tuning with a frozen backbone should load the checkpoint with
  ``drop_path=0`` (dropping frozen branches only adds noise to the heads' inputs).
* ``layer_scale_init`` 1e-6 (ConvNeXt): residual branches start near zero, which is what
  keeps a from-scratch deep U-Net stable.
* ``cond_dim`` 32: the rank of every block's adaLN modulation; see conditioning.py for
  why it is small (the fine-tuning parameter budget).
* ``finetune_timestep`` 50: the fine-tuning/inference forward feeds the clean image with
  no mask at this t. With nothing masked the value only selects the modulation state;
  a small t matches "clean input" while Baranchuk et al. (2022, DDPM-Seg) found features
  at small-to-moderate t (50-250) better for segmentation than t = 0. A hyper-parameter.
* Diffusion: cosine schedule with s = 0.008 and T = 1000 (Nichol & Dhariwal 2021);
  x0-prediction by default, because the masked-pixel loss and the visible-pixel
  reconstruction term are then the same quantity; 60 % masking in 32-px blocks (ConvNeXt
  V2 FCMAE's ratio and patch); visible-pixel loss weight 0.1; 10 DDIM steps, eta = 0.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmdfed.errors import CmdfedError

FM_VECTORS = ("cls", "cls_mean", "none")
HEAD_CONVS = ("dense", "separable")
PREDICTIONS = ("x0", "eps", "v")
MASK_BLOCK_SIZES = (4, 8, 16, 32)  # divide the U-Net's 32-px granularity, multiples of the 4-px stem


class ConfigBase:
    """to_dict/from_dict and type coercion shared by the config dataclasses."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            object.__setattr__(
                self, field.name, _coerce(type(self).__name__, field.name, getattr(self, field.name), hints[field.name])
            )
        self.validate()  # each subclass's value checks beyond types

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise CmdfedError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CmdfedError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(names)}")
        return cls(**data)


def _coerce(owner: str, name: str, value: Any, hint: Any) -> Any:
    where = f"{owner}.{name}"
    if hint is bool:
        if not isinstance(value, bool):
            raise CmdfedError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CmdfedError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CmdfedError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise CmdfedError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise CmdfedError(f"{where} must be a list of integers, got {value!r}")
        return tuple(value)
    raise TypeError(f"{where}: unsupported field type {hint}")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CmdfedError(message)


@dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """Architecture of the ConvNeXt U-Net, its conditioning and its task heads."""

    # The sizes' defaults are the ``tiny`` preset's; other presets are factories below.
    preset: str = "tiny"  # the preset these sizes came from; informational
    widths: tuple[int, ...] = (32, 64, 128, 256)  # encoder stage widths at 1/4..1/32
    depths: tuple[int, ...] = (2, 2, 2, 2)  # ConvNeXt blocks per encoder stage
    decoder_depths: tuple[int, ...] = (1, 1, 1)  # at 1/4, 1/8, 1/16
    full_res_width: int = 16
    full_res_depth: int = 1
    in_channels: int = 3  # image channels; the binary mask is appended, so the stem sees in_channels + 1
    drop_path: float = 0.0
    layer_scale_init: float = 1e-6
    cond_dim: int = 32
    fm_kind: str = "none"  # encoder kind for build_encoder: none | timm:<preset> | hf:<dir>
    fm_dim: int = 0  # FM token width (0 with fm_kind none)
    fm_vector: str = "cls_mean"  # FM summary fed to adaLN: cls | cls_mean | none
    use_patch_grid: bool = False  # per-pixel scale/shift from the FM patch-token grid
    grid_dim: int = 16
    head_width: int = 32
    head_stride: int = 1  # 1: task heads at full resolution; 2: at half, outputs upsampled (heads.py)
    head_conv: str = "dense"  # dense: 3x3 convs; separable: depthwise 3x3 + pointwise 1x1 (heads.py)
    head_scales: int = 4  # decoder maps the heads fuse, finest first: 4 = all, 1 = the full-resolution one only
    np_channels: int = 2  # 2 = background/nucleus softmax (HoVer-Net), 1 = one sigmoid logit
    n_classes: int = 0  # NC channels including background; 0 = no NC head
    finetune_timestep: int = 50

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset ``name`` (a key of ``MODEL_PRESETS``) with ``overrides`` replacing single settings."""
        if name not in MODEL_PRESETS:
            raise CmdfedError(f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
        if overrides.get("preset", name) != name:
            raise CmdfedError(f"preset {name!r} was asked for but the overrides say preset={overrides['preset']!r}")
        return MODEL_PRESETS[name](**{k: v for k, v in overrides.items() if k != "preset"})

    def validate(self) -> None:
        require(
            len(self.widths) == 4 and min(self.widths) > 0, f"widths must be 4 positive integers, got {self.widths}"
        )
        require(
            len(self.depths) == 4 and min(self.depths) > 0, f"depths must be 4 positive integers, got {self.depths}"
        )
        require(
            len(self.decoder_depths) == 3 and min(self.decoder_depths) >= 0,
            f"decoder_depths must be 3 non-negative integers (1/4, 1/8, 1/16), got {self.decoder_depths}",
        )
        for name in ("full_res_width", "in_channels", "cond_dim", "grid_dim", "head_width"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        require(self.full_res_depth >= 0, f"full_res_depth must be >= 0, got {self.full_res_depth}")
        require(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}")
        require(self.layer_scale_init > 0, f"layer_scale_init must be positive, got {self.layer_scale_init}")
        require(
            self.fm_kind == "none" or self.fm_kind.startswith(("timm:", "hf:")),
            f"fm_kind must be none, timm:<preset> or hf:<dir>, got {self.fm_kind!r}",
        )
        require(
            (self.fm_kind == "none") == (self.fm_dim == 0),
            f"fm_dim must be 0 exactly when fm_kind is none (got fm_kind={self.fm_kind!r}, fm_dim={self.fm_dim}); "
            f"set fm_dim to the encoder's feature_dim",
        )
        require(self.fm_vector in FM_VECTORS, f"fm_vector must be one of {FM_VECTORS}, got {self.fm_vector!r}")
        require(not self.use_patch_grid or self.fm_dim > 0, "use_patch_grid needs an FM (fm_kind and fm_dim)")
        require(
            self.fm_dim == 0 or self.fm_vector != "none" or self.use_patch_grid,
            "an FM is configured but neither fm_vector nor use_patch_grid uses it",
        )
        require(self.np_channels in (1, 2), f"np_channels must be 1 or 2, got {self.np_channels}")
        require(
            self.n_classes == 0 or self.n_classes >= 2,
            f"n_classes counts NC channels including background: 0 (no NC head) or >= 2, got {self.n_classes}",
        )
        require(self.head_stride in (1, 2, 4), f"head_stride must be 1, 2 or 4, got {self.head_stride}")
        require(1 <= self.head_scales <= 4, f"head_scales must be 1 to 4, got {self.head_scales}")
        require(self.head_conv in HEAD_CONVS, f"head_conv must be one of {HEAD_CONVS}, got {self.head_conv!r}")
        require(self.finetune_timestep >= 0, f"finetune_timestep must be >= 0, got {self.finetune_timestep}")


def cmd_tiny(**overrides: Any) -> ModelConfig:
    """Under 5 M parameters, for CPU tests and demos: ModelConfig's default sizes."""
    return ModelConfig.from_dict({**overrides, "preset": "tiny"})


def cmd_base(**overrides: Any) -> ModelConfig:
    """ConvNeXt-T's encoder (widths 96-192-384-768, depths 3-3-9-3; Liu et al. 2022) with two
    blocks per decoder level and its ImageNet drop-path rate (see the module docstring)."""
    sizes = {
        "widths": (96, 192, 384, 768),
        "depths": (3, 3, 9, 3),
        "decoder_depths": (2, 2, 2),
        "full_res_width": 32,
        "full_res_depth": 2,
        "drop_path": 0.1,
        "cond_dim": 32,
        "head_width": 64,
    }
    return ModelConfig.from_dict({**sizes, **overrides, "preset": "base"})


# Preset name (as configs and the CLI give it) -> its factory.
MODEL_PRESETS: dict[str, Callable[..., ModelConfig]] = {"tiny": cmd_tiny, "base": cmd_base}


@dataclass(frozen=True)
class DiffusionConfig(ConfigBase):
    """Masked pixel-space diffusion: schedule, masking, loss and sampler settings."""

    timesteps: int = 1000
    cosine_offset: float = 0.008  # s in Nichol & Dhariwal's cosine schedule
    prediction: str = "x0"  # network output: x0 | eps | v
    mask_ratio: float = 0.6  # the largest share of blocks hidden
    mask_ratio_min: float = 0.0  # > 0: each tile hides a share drawn uniformly from [mask_ratio_min, mask_ratio]
    mask_block_size: int = 32
    visible_loss_weight: float = 0.1
    sampling_steps: int = 10
    sampling_eta: float = 0.0  # 0 = deterministic DDIM
    clip_x0: bool = True  # clamp predicted x0 to the data range [-1, 1] while sampling

    def validate(self) -> None:
        require(self.timesteps >= 2, f"timesteps must be >= 2, got {self.timesteps}")
        require(self.cosine_offset >= 0, f"cosine_offset must be >= 0, got {self.cosine_offset}")
        require(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        require(0.0 < self.mask_ratio < 1.0, f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        require(
            0.0 <= self.mask_ratio_min <= self.mask_ratio,
            f"mask_ratio_min must be 0 (every tile hides mask_ratio) or in (0, mask_ratio], got "
            f"{self.mask_ratio_min} with mask_ratio {self.mask_ratio}",
        )
        require(
            self.mask_block_size in MASK_BLOCK_SIZES,
            f"mask_block_size must be one of {MASK_BLOCK_SIZES}, got {self.mask_block_size}",
        )
        require(self.visible_loss_weight >= 0, f"visible_loss_weight must be >= 0, got {self.visible_loss_weight}")
        require(
            1 <= self.sampling_steps <= self.timesteps,
            f"sampling_steps must be in [1, timesteps], got {self.sampling_steps}",
        )
        require(self.sampling_eta >= 0, f"sampling_eta must be >= 0, got {self.sampling_eta}")
