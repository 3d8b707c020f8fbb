"""CMD model core: ConvNeXt U-Net, FM conditioning, masked diffusion, task heads, FM encoders.

Conventions shared by every module here: images are float (B, C, H, W) tensors in
[-1, 1] with H and W multiples of 32; masks are (B, 1, H, W), nonzero = hidden.

Typical use::

    config = ModelConfig.from_preset("base", fm_kind="hf:/models/phikon-v2", fm_dim=1024)
    model, encoder = build_model(config), build_encoder(config.fm_kind)
    diffusion = MaskedDiffusion(DiffusionConfig())
    loss = diffusion.training_loss(model, images, encoder).loss          # pre-training
    outputs = model.segment(images, encoder(images))                     # fine-tuning
"""

from cmdfed.model.config import (
    MODEL_PRESETS,
    DiffusionConfig,
    ModelConfig,
    cmd_base,
    cmd_tiny,
)
from cmdfed.model.diffusion import (
    DiffusionLoss,
    MaskedDiffusion,
    cosine_alphas_cumprod,
    make_inpainting_grid,
    masked_diffusion_loss,
)
from cmdfed.model.encoders import TIMM_PRESETS, FMFeatures, FrozenEncoder, NoEncoder, build_encoder
from cmdfed.model.losses import hovernet_loss
from cmdfed.model.unet import (
    PARAMETER_GROUPS,
    ConvNeXtUNet,
    DiffusionOutput,
    SegmentationGraph,
    build_model,
    count_parameters,
)

__all__ = [
    "MODEL_PRESETS",
    "PARAMETER_GROUPS",
    "TIMM_PRESETS",
    "ConvNeXtUNet",
    "DiffusionConfig",
    "DiffusionLoss",
    "DiffusionOutput",
    "FMFeatures",
    "FrozenEncoder",
    "MaskedDiffusion",
    "ModelConfig",
    "NoEncoder",
    "SegmentationGraph",
    "build_encoder",
    "build_model",
    "cmd_base",
    "cmd_tiny",
    "cosine_alphas_cumprod",
    "count_parameters",
    "hovernet_loss",
    "make_inpainting_grid",
    "masked_diffusion_loss",
]
