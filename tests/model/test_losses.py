"""HoVer-Net losses: NP, HV (MSE + MSGE inside nuclei), NC, and target checks."""

from __future__ import annotations

import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.model import hovernet_loss
from cmdfed.model.losses import hv_gradients, hv_loss, np_loss


def nuclei_map() -> torch.Tensor:
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 3:12] = 1
    return target


def test_np_loss_is_small_for_confident_correct_logits_and_large_for_wrong():
    target = nuclei_map()
    correct = torch.stack([(1 - target) * 10.0, target * 10.0], dim=1)
    ce, dice = np_loss(correct, target)
    assert ce < 1e-3 and dice < 1e-3
    ce_wrong, dice_wrong = np_loss(correct.flip(1), target)
    assert ce_wrong > 5 and dice_wrong > 1.5


def test_one_logit_np_matches_two_logit_softmax():
    target = nuclei_map()
    logit = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    two = torch.cat([torch.zeros_like(logit), logit], dim=1)  # softmax([0, z]) = sigmoid(z)
    for a, b in zip(np_loss(logit, target), np_loss(two, target)):
        torch.testing.assert_close(a, b)


def test_hv_gradients_differentiate_horizontal_along_x_and_vertical_along_y():
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    hv = torch.stack([cols / 15, rows / 15])[None]  # both maps increase along their own axis
    gradients = hv_gradients(hv)[0, :, 4:-4, 4:-4]
    assert torch.all(gradients > 0)
    torch.testing.assert_close(gradients[0], gradients[1])
    swapped = hv_gradients(torch.stack([rows / 15, cols / 15])[None])[0, :, 4:-4, 4:-4]
    assert swapped.abs().max() < 1e-6  # a map varying only across its axis has no gradient along it


def test_msge_counts_only_nuclear_pixels():
    nuclei = nuclei_map()
    target = torch.zeros(2, 2, 16, 16)
    outside = torch.zeros(2, 2, 16, 16)
    outside[..., 13:, 13:] = torch.randn(2, 2, 3, 3)  # error far (> 2 px) from any nucleus
    mse, msge = hv_loss(outside, target, nuclei)
    assert mse > 0 and msge == 0
    inside = torch.zeros(2, 2, 16, 16)
    inside[..., 6, 6] = 1.0
    assert hv_loss(inside, target, nuclei)[1] > 0


def test_hovernet_loss_sums_its_terms_and_checks_targets():
    nuclei = nuclei_map()
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "np": torch.randn(2, 2, 16, 16, generator=generator),
        "hv": torch.randn(2, 2, 16, 16, generator=generator),
        "nc": torch.randn(2, 4, 16, 16, generator=generator),
    }
    targets = {"np": nuclei, "hv": torch.zeros(2, 2, 16, 16), "nc": nuclei * 3}
    total, terms = hovernet_loss(outputs, targets)
    assert set(terms) == {"np_ce", "np_dice", "hv_mse", "hv_msge", "nc_ce", "nc_dice"}
    torch.testing.assert_close(total, sum(terms.values()))
    doubled, _ = hovernet_loss(outputs, targets, weights={"hv_mse": 2.0})
    torch.testing.assert_close(doubled - total, terms["hv_mse"])
    with pytest.raises(CmdfedError, match="missing target 'nc'"):
        hovernet_loss(outputs, {"np": nuclei, "hv": targets["hv"]})
    with pytest.raises(CmdfedError, match="target 'hv' must have shape"):
        hovernet_loss(outputs, targets | {"hv": torch.zeros(2, 16, 16)})
    _, terms = hovernet_loss(outputs | {"nc": None}, {"np": nuclei, "hv": targets["hv"]})
    assert "nc_ce" not in terms
