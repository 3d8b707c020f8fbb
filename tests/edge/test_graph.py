"""The edge graph: ConvNeXt blocks folded for the constant condition compute what the model does."""

from __future__ import annotations

import torch

from cmdfed.model.config import ModelConfig
from cmdfed.model.unet import ConvNeXtBlock, build_model
from edge.graph import EdgeGraph, FoldedConvNeXtBlock


def trained_like_model(**overrides) -> torch.nn.Module:
    """A tiny model whose zero-initialised parts (modulation, layer scales) are no longer zero."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", n_classes=3, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_folded_blocks_compute_what_the_model_does():
    model = trained_like_model(finetune_timestep=120)
    folded, reference = EdgeGraph(model).eval(), EdgeGraph(model, fold=False).eval()
    blocks = [m for m in folded.modules() if isinstance(m, ConvNeXtBlock | FoldedConvNeXtBlock)]
    assert blocks and all(isinstance(m, FoldedConvNeXtBlock) for m in blocks)
    assert not any(isinstance(m, FoldedConvNeXtBlock) for m in model.modules())  # the model is left as it was
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        outputs, expected = folded(x), reference(x)
    assert len(outputs) == len(expected) == 3
    for out, ref in zip(outputs, expected):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_the_fold_uses_the_models_own_timestep():
    model = trained_like_model(finetune_timestep=120)
    other = trained_like_model(finetune_timestep=0)  # same weights, another condition
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(EdgeGraph(model)(x)[1], EdgeGraph(other)(x)[1], atol=1e-4)
        torch.testing.assert_close(EdgeGraph(other)(x)[1], EdgeGraph(other, fold=False)(x)[1], atol=1e-5, rtol=1e-4)
