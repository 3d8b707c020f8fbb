"""adaLN-Zero: untrained modulation is exactly the identity; one optimizer step makes it matter."""

from __future__ import annotations

import pytest
import torch

from cmdfed.model import hovernet_loss
from cmdfed.model.conditioning import TimestepEmbedder

FM_DIM = 8


@pytest.fixture
def fm_model(make_tiny):
    return make_tiny(fm_kind="hf:/fm", fm_dim=FM_DIM, use_patch_grid=True, n_classes=3)


def block_outputs(model, x, t, mask, fm):
    """Output of one encoder block and one decoder block for the given conditioning."""
    captured = {}
    hooks = [
        model.stages[1][0].register_forward_hook(lambda m, i, o: captured.__setitem__("encoder", o)),
        model.decoder[2].blocks[0].register_forward_hook(lambda m, i, o: captured.__setitem__("decoder", o)),
    ]
    try:
        with torch.no_grad():
            model(x, t, mask, fm)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def test_untrained_modulation_ignores_timestep_and_fm(fm_model, make_images, make_fm):
    x, mask = make_images(2), torch.zeros(2, 1, 64, 64)
    reference = block_outputs(fm_model, x, torch.tensor([0, 0]), mask, make_fm(2, FM_DIM, seed=0))
    changed = block_outputs(fm_model, x, torch.tensor([999, 400]), mask, make_fm(2, FM_DIM, seed=1))
    for name in ("encoder", "decoder"):
        assert torch.equal(reference[name], changed[name])
    # The blocks do compute something (LayerScale is small, not zero), so equality is not vacuous.
    assert not torch.equal(reference["encoder"], fm_model.stages[1][0].dwconv.weight.new_zeros(1))
    with torch.no_grad():
        heads_a = fm_model.segment(x, make_fm(2, FM_DIM, seed=0))
        heads_b = fm_model.segment(x, make_fm(2, FM_DIM, seed=1))
    for key in ("np", "hv", "nc"):
        assert torch.equal(heads_a[key], heads_b[key])


def test_one_optimizer_step_makes_blocks_depend_on_timestep_and_fm(make_tiny, make_images, make_fm):
    # LayerScale starts at 1 here so a block's residual branch, and with it the modulation's effect,
    # is not scaled down by 1e-6. A fine-tuning step: the heads are random, so gradients reach every
    # modulation layer. (A pre-training step would not: the zero-initialised final layer blocks all
    # gradients upstream on the first step, as in DiT.)
    fm_model = make_tiny(fm_kind="hf:/fm", fm_dim=FM_DIM, use_patch_grid=True, n_classes=3, layer_scale_init=1.0)
    images, fm = make_images(2), make_fm(2, FM_DIM, seed=0)
    nuclei = (images[:, 0] > 0).long()
    targets = {"np": nuclei, "hv": images[:, 1:], "nc": nuclei * 2}
    optimizer = torch.optim.Adam(fm_model.parameters(), lr=1e-2)
    hovernet_loss(fm_model.segment(images, fm), targets)[0].backward()
    optimizer.step()

    x, mask = make_images(2, seed=1), torch.zeros(2, 1, 64, 64)
    reference = block_outputs(fm_model, x, torch.tensor([0, 0]), mask, fm)
    other_t = block_outputs(fm_model, x, torch.tensor([999, 400]), mask, fm)
    other_fm = block_outputs(fm_model, x, torch.tensor([0, 0]), mask, make_fm(2, FM_DIM, seed=1))
    for name in ("encoder", "decoder"):
        assert (reference[name] - other_t[name]).abs().max() > 1e-5
        assert (reference[name] - other_fm[name]).abs().max() > 1e-5


def test_patch_grid_alone_modulates_per_pixel(make_tiny, make_images, make_fm, perturb):
    model = perturb(make_tiny(fm_kind="hf:/fm", fm_dim=FM_DIM, fm_vector="none", use_patch_grid=True))
    x, mask = make_images(1), torch.zeros(1, 1, 64, 64)
    fm = make_fm(1, FM_DIM, seed=0)
    moved = make_fm(1, FM_DIM, seed=0)
    moved.patch_grid[:, :4, 0, 0] += 3.0  # change only the top-left FM patch (some channels: LN ignores uniform shifts)
    a = block_outputs(model, x, 0, mask, fm)["decoder"]
    b = block_outputs(model, x, 0, mask, moved)["decoder"]
    difference = (a - b).abs().amax(dim=1)[0]  # (16, 16) map at 1/4 resolution
    assert difference[:4, :4].max() > 1e-4  # the patch's own area changes...
    assert difference[-2:, -2:].max() < difference[:4, :4].max() / 10  # ...far more than the opposite corner


def test_timestep_embedding_distinguishes_timesteps():
    embedder = TimestepEmbedder(16)
    features = embedder.sinusoidal(torch.tensor([0, 1, 500, 999]))
    assert features.shape == (4, 256)
    assert torch.cdist(features, features).fill_diagonal_(1.0).min() > 0.1
