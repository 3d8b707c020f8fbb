"""Masked diffusion: schedule, conversions, masks, loss weighting, leak prevention, DDIM sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmdfed.errors import CmdfedError
from cmdfed.model import DiffusionConfig, MaskedDiffusion, make_inpainting_grid, masked_diffusion_loss
from cmdfed.model.diffusion import cosine_alphas_cumprod


def test_cosine_schedule_is_monotone_from_clean_to_noise():
    abar = cosine_alphas_cumprod(1000)
    assert abar.shape == (1000,)
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[0] > 0.9999 and abar[-1] < 1e-6
    assert abs(abar[499].item() - 0.5) < 0.02  # the cosine schedule crosses 1/2 near the middle


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_parametrisations_round_trip(prediction):
    diffusion = MaskedDiffusion(DiffusionConfig(prediction=prediction))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 500, 998, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    recovered_x0, recovered_eps = diffusion.split(x_t, t, diffusion.target(x0, noise, t))
    torch.testing.assert_close(recovered_x0, x0, rtol=0, atol=1e-7)
    torch.testing.assert_close(recovered_eps, noise, rtol=0, atol=1e-9)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), noise, rtol=0, atol=1e-9)


def test_v_is_alpha_eps_minus_sigma_x0():
    diffusion = MaskedDiffusion(DiffusionConfig(prediction="v"))
    x0, noise, t = (
        torch.ones(1, 1, 1, 1, dtype=torch.float64),
        torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64),
        torch.tensor([300]),
    )
    abar = cosine_alphas_cumprod(1000)[300]
    expected = abar.sqrt() * 2.0 - (1 - abar).sqrt() * 1.0
    assert diffusion.target(x0, noise, t).item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_training_pair_keeps_visible_pixels_clean_and_targets_consistent(prediction):
    diffusion = MaskedDiffusion(DiffusionConfig(prediction=prediction))
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :16, :16] = 1
    t = torch.tensor([10, 700])
    mixture, target = diffusion.training_pair(images, mask, t, noise)
    hidden = mask.bool().expand_as(images)
    assert torch.equal(mixture[~hidden], images[~hidden])
    assert torch.equal(mixture[hidden], diffusion.q_sample(images, t, noise)[hidden])
    # Read as a prediction at (mixture, t), the target decodes to the clean image everywhere.
    x0, _ = diffusion.split(mixture, t, target)
    torch.testing.assert_close(x0, images, rtol=0, atol=1e-9)


def test_loss_weights_hidden_and_visible_pixels_separately():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :1, :] = 1  # 4 hidden pixels, 12 visible
    target = torch.zeros(1, 3, 4, 4)
    prediction = torch.where(mask.bool(), 2.0, 1.0).expand(1, 3, 4, 4)  # squared error 4 hidden, 1 visible
    loss = masked_diffusion_loss(prediction, target, mask, visible_weight=0.1)
    assert loss.masked_mse.item() == pytest.approx(4.0)
    assert loss.visible_mse.item() == pytest.approx(1.0)
    assert loss.loss.item() == pytest.approx(4.1)
    # Each term is a mean over its own pixels, so the balance does not move with the mask ratio.
    mask[..., :3, :] = 1
    prediction = torch.where(mask.bool(), 2.0, 1.0).expand(1, 3, 4, 4)
    assert masked_diffusion_loss(prediction, target, mask, 0.1).loss.item() == pytest.approx(4.1)


@pytest.mark.parametrize(("block", "size"), [(32, 256), (16, 64)])
def test_mask_ratio_and_block_alignment(block, size):
    diffusion = MaskedDiffusion(DiffusionConfig(mask_block_size=block))
    masks = diffusion.sample_mask(400, size, size, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, size, size)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert abs(masks.mean().item() - 0.6) < 0.01
    cells = masks.unfold(2, block, block).unfold(3, block, block)  # (B, 1, rows, cols, block, block)
    assert torch.all(cells.amax(dim=(-1, -2)) == cells.amin(dim=(-1, -2)))  # every block wholly in or out
    per_image = masks.mean(dim=(1, 2, 3))
    assert per_image.min() > 0 and per_image.max() < 1


def test_mask_rejects_sides_that_are_not_block_multiples():
    with pytest.raises(CmdfedError, match="mask_block_size"):
        MaskedDiffusion(DiffusionConfig(mask_block_size=32)).sample_mask(1, 48, 64)


def _encoder_outputs(model, x, t, mask):
    """Outputs of the four encoder stages, as the decoder and the next stage receive them."""
    captured = []
    modules = [*model.downsamples, model.decoder[0]]
    hooks = [m.register_forward_pre_hook(lambda m, args: captured.append(args[0])) for m in modules]
    try:
        with torch.no_grad():
            out = model(x, t, mask)
    finally:
        for hook in hooks:
            hook.remove()
    return captured, out


@pytest.mark.parametrize(
    "hole", [(slice(0, 32), slice(0, 32)), (slice(3, 30), slice(1, 26))], ids=["aligned", "unaligned"]
)
def test_hidden_content_never_reaches_the_context_encoder(make_tiny, perturb, make_images, hole):
    """The leak guarantee: encoder features and the decoder's 1/8 and 1/16 maps are exact functions of
    the visible pixels and the mask, for any mask (the unaligned hole cuts through stem cells);
    hidden content reaches outputs only near the hole."""
    model = perturb(make_tiny()).eval()
    clean = make_images(1, 96, seed=0)
    mask = torch.zeros(1, 1, 96, 96)
    mask[(..., *hole)] = 1
    hidden = mask.bool().expand_as(clean)
    t = torch.tensor([0])  # the worst case: x_t at t = 0 is the clean image up to 0.6 % noise
    revealing = clean  # the hidden region carries the true content
    unrelated = torch.where(hidden, make_images(1, 96, seed=1), clean)

    encoder_a, out_a = _encoder_outputs(model, revealing, t, mask)
    encoder_b, out_b = _encoder_outputs(model, unrelated, t, mask)

    assert len(encoder_a) == 4
    for a, b in zip(encoder_a, encoder_b):
        assert torch.equal(a, b)
    for a, b in zip(out_a.features[2:], out_b.features[2:]):
        assert torch.equal(a, b)
    # Far from the hole (> 32 px away) the predicted image does not move either...
    torch.testing.assert_close(out_a.prediction[..., 64:, 64:], out_b.prediction[..., 64:, 64:], rtol=0, atol=1e-6)
    # ...while inside the hole it does: the denoising path does read x_t.
    assert (out_a.prediction - out_b.prediction)[hidden].abs().max() > 1e-3
    # Control: without the mask the same two inputs give different encoder features.
    unmasked_a, _ = _encoder_outputs(model, revealing, t, None)
    unmasked_b, _ = _encoder_outputs(model, unrelated, t, None)
    assert not torch.equal(unmasked_a[0], unmasked_b[0])


def test_fully_hidden_cells_stay_zero_in_the_encoder(make_tiny, perturb, make_images):
    model = perturb(make_tiny()).eval()
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :32] = 1
    encoder, _ = _encoder_outputs(model, make_images(1), torch.tensor([500]), mask)
    stage1 = encoder[0]  # 1/4 resolution: the hole is cells [0:8, 0:8]
    assert torch.all(stage1[..., :8, :8] == 0)
    assert (stage1[..., 8:, :] != 0).float().mean() > 0.99


class _RecordingModel(nn.Module):
    """Wraps a model and keeps every input the sampler feeds it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, mask=None, fm=None):
        self.inputs.append(x.clone())
        return self.model(x, t, mask, fm)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_keeps_visible_pixels_exactly_at_every_step(make_tiny, perturb, make_images, eta):
    diffusion = MaskedDiffusion(DiffusionConfig(sampling_steps=5, sampling_eta=eta, mask_block_size=16))
    model = _RecordingModel(perturb(make_tiny()))
    model.train()
    images = make_images(2)
    mask = diffusion.sample_mask(2, 64, 64, generator=torch.Generator().manual_seed(0))
    visible = ~mask.bool().expand_as(images)

    result = diffusion.inpaint(model, images, mask, generator=torch.Generator().manual_seed(0))

    assert model.training  # restored after sampling in eval mode
    assert len(model.inputs) == 5
    for step_input in model.inputs:
        assert torch.equal(step_input[visible], images[visible])
    assert torch.equal(result[visible], images[visible])
    assert result[~visible].abs().max() <= 1.0
    assert not torch.allclose(result[~visible], images[~visible])


def test_sampling_timesteps_span_the_schedule():
    diffusion = MaskedDiffusion(DiffusionConfig())
    steps = diffusion.sampling_timesteps()
    assert steps[0] == 999 and steps[-1] == 0 and len(steps) == 10
    assert steps == sorted(steps, reverse=True)


def test_inpainting_grid_layout(make_tiny, make_images):
    diffusion = MaskedDiffusion(DiffusionConfig(sampling_steps=2))
    images = make_images(2)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 32:, :] = 1
    grid = make_inpainting_grid(make_tiny(), images, diffusion, mask=mask, generator=torch.Generator().manual_seed(0))
    assert grid.shape == (3 * 64 + 2 * 2, 2 * 64 + 2, 3) and grid.dtype.name == "uint8"
    original = ((images[1] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert (grid[:64, 66:] == original).all()  # row 1, column 2: the original
    assert (grid[66:98, 66:] == original[:32]).all()  # row 2 keeps the visible half
    assert (grid[66 + 32 : 130, :64] == 128).all()  # hidden half shown grey
    assert (grid[64:66] == 255).all()  # white gap between rows


def test_mask_ratio_range_draws_a_ratio_per_tile():
    diffusion = MaskedDiffusion(DiffusionConfig(mask_ratio=0.6, mask_ratio_min=0.1, mask_block_size=16))
    masks = diffusion.sample_mask(400, 128, 128, generator=torch.Generator().manual_seed(0))
    per_image = masks.mean(dim=(1, 2, 3))
    # 64 cells a tile: ratios spread over [0.1, 0.6], mean near 0.35 (a fixed ratio gives 0.6 +- 1/64)
    assert per_image.min() < 0.15 and per_image.max() > 0.55
    assert abs(per_image.mean().item() - 0.35) < 0.03


def test_fixed_ratio_masks_are_unchanged_by_the_range_option():
    """Runs made before the option (mask_ratio_min 0) draw the very same masks."""
    fixed = MaskedDiffusion(DiffusionConfig()).sample_mask(
        8,
        64,
        64,
        generator=torch.Generator().manual_seed(3),
    )
    same = MaskedDiffusion(DiffusionConfig(mask_ratio_min=0.6)).sample_mask(
        8, 64, 64, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(fixed, same)


def test_mask_ratio_min_above_the_ratio_is_refused():
    with pytest.raises(CmdfedError, match="mask_ratio_min"):
        DiffusionConfig(mask_ratio=0.5, mask_ratio_min=0.6)
