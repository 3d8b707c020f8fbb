"""DP-SGD mechanics: each tile's gradient is its own, and noisy clipped training still learns."""

import numpy as np
import torch
from opacus import GradSampleModule

from cmdfed.data.dataset import SiteDataset
from cmdfed.federation.config import FederationConfig
from cmdfed.inference.segment import to_model_input
from cmdfed.model.config import DiffusionConfig
from cmdfed.model.diffusion import MaskedDiffusion, masked_diffusion_loss
from cmdfed.model.unet import build_model
from cmdfed.privacy.dpsgd import (
    check_private_model,
    per_sample_finetune_loss,
    per_sample_pretrain_loss,
    private_trainer,
)
from cmdfed.train.loop import TrainConfig, Trainer
from cmdfed.train.phases import batch_loader

CONFIG = FederationConfig(classes="epithelial,lymphocyte,stromal")


def test_per_tile_gradients_equal_each_tile_trained_alone(site_store):
    """Opacus's per-sample gradients (depthwise convs, LayerNorm, LayerScale, modulation)
    are exactly the gradients of each tile's loss on its own."""
    torch.manual_seed(0)
    model = build_model(CONFIG.model_config("pretrain"))
    check_private_model(model)
    model.freeze(("heads",))
    diffusion = MaskedDiffusion(DiffusionConfig())
    images = torch.from_numpy(np.stack([SiteDataset(site_store, augment=False)[(i, 0)]["image"] for i in range(3)]))
    hooked = GradSampleModule(model)
    torch.manual_seed(1)
    loss, _ = per_sample_pretrain_loss(model, diffusion)({"image": images})
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample.clone() for n, p in trainable}
    hooked.to_standard_module()
    assert {n for n, _ in trainable if ".layer_scale." in n} <= set(per_sample)

    torch.manual_seed(1)  # the same masks, timesteps and noise, drawn as the loss draws them
    x = to_model_input(images)
    mask, t = diffusion.sample_mask(3, 64, 64, None, x.device), diffusion.sample_timesteps(3, None, x.device)
    mixture, target = diffusion.training_pair(x, mask, t, torch.randn_like(x))
    for i in range(3):
        model.zero_grad(set_to_none=True)
        prediction = model(mixture[i : i + 1], t[i : i + 1], mask[i : i + 1], None).prediction
        masked_diffusion_loss(
            prediction, target[i : i + 1], mask[i : i + 1], diffusion.config.visible_loss_weight
        ).loss.backward()
        for name, param in trainable:
            torch.testing.assert_close(per_sample[name][i], param.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_private_head_finetuning_still_learns(site_store):
    torch.manual_seed(0)
    config = FederationConfig(classes="epithelial,lymphocyte,stromal")
    model = build_model(config.model_config("finetune"))
    model.freeze(("backbone", "modulation"))
    train = TrainConfig(
        steps=20,
        batch_size=4,
        lr=1e-2,
        weight_decay=0.0,
        warmup_steps=0,
        min_lr_ratio=1.0,
        grad_clip=0.0,
        augment=False,
        checkpoint_every=20,
        sample_every=0,
    )
    dataset = SiteDataset(site_store, augment=False, targets=True)
    trainer = Trainer(model, per_sample_finetune_loss(model), train, torch.device("cpu"))
    with private_trainer(trainer, noise_multiplier=0.5, max_grad_norm=1.0):
        losses = [result.loss for result in trainer.run(batch_loader(dataset, train), train.steps)]
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5]), losses
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_under_bf16_autocast_each_tile_is_clipped_to_the_bound_in_fp32(site_store):
    """bf16 per-tile gradients (LayerScale's sampler included) are clipped exactly: a tile's
    clipped gradient has norm max_grad_norm to fp32's rounding, not bf16's 2**-8."""
    torch.manual_seed(0)
    model = build_model(CONFIG.model_config("pretrain"))
    model.freeze(("heads",))
    diffusion = MaskedDiffusion(DiffusionConfig())
    loss_fn = per_sample_pretrain_loss(model, diffusion)
    images = torch.from_numpy(np.stack([SiteDataset(site_store, augment=False)[(i, 0)]["image"] for i in range(3)]))
    train = TrainConfig(steps=1, batch_size=1, grad_clip=0.0, precision="fp32")
    bound = 1e-3  # far below every tile's gradient norm, so each one is clipped
    with private_trainer(Trainer(model, loss_fn, train, torch.device("cpu")), 0.0, bound) as trainer:
        for i in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = loss_fn({"image": images[i : i + 1]})
            loss.backward()
            trainable = [p for p in model.parameters() if p.requires_grad]
            assert torch.bfloat16 in {p.grad_sample.dtype for p in trainable}
            trainer.optimizer.clip_and_accumulate()
            norm = torch.linalg.vector_norm(torch.cat([p.summed_grad.flatten() for p in trainable]))
            assert norm.dtype == torch.float32
            assert abs(float(norm) / bound - 1) < 1e-5
            trainer.optimizer.zero_grad(set_to_none=True)
