"""Fixtures shared by the model tests: factories for tiny models, inputs and FM features.

The suite runs with --import-mode=importlib, so helpers are handed out as session-scoped
fixtures that return plain functions rather than imported from a helper module.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cmdfed.model import ConvNeXtUNet, FMFeatures, ModelConfig, build_model


def _tiny_model(seed: int = 0, **overrides) -> ConvNeXtUNet:
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset("tiny", **overrides))


def _perturb_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so no output is trivially zero: the zero-initialised final
    layer, adaLN-Zero and LayerScale 1e-6 would otherwise let invariance checks pass vacuously."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def _images(batch: int = 2, size: int | tuple[int, int] = 64, seed: int = 0) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def _fm(batch: int, dim: int, grid: int = 4, seed: int = 0) -> FMFeatures:
    generator = torch.Generator().manual_seed(seed)
    return FMFeatures(
        cls=torch.randn(batch, dim, generator=generator),
        patch_mean=torch.randn(batch, dim, generator=generator),
        patch_grid=torch.randn(batch, dim, grid, grid, generator=generator),
    )


@pytest.fixture(scope="session")
def make_tiny() -> Callable[..., ConvNeXtUNet]:
    """make_tiny(seed=0, **ModelConfig overrides) -> a freshly initialised tiny model."""
    return _tiny_model


@pytest.fixture(scope="session")
def perturb() -> Callable[..., torch.nn.Module]:
    """perturb(model, seed=0, std=0.05) -> the model with noise added to every parameter."""
    return _perturb_weights


@pytest.fixture(scope="session")
def make_images() -> Callable[..., torch.Tensor]:
    """make_images(batch=2, size=64, seed=0) -> images uniform in [-1, 1]."""
    return _images


@pytest.fixture(scope="session")
def make_fm() -> Callable[..., FMFeatures]:
    """make_fm(batch, dim, grid=4, seed=0) -> random FMFeatures."""
    return _fm
