"""Packing a model's weights into one vector and back, and the layout carried as config values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmdfed.errors import CmdfedError
from cmdfed.federation.wire import Layout
from cmdfed.model.config import ModelConfig
from cmdfed.model.unet import build_model


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return build_model(ModelConfig.from_preset("tiny")).state_dict_for(["backbone", "modulation"])


def test_pack_then_unpack_gives_back_every_tensor_in_order(weights):
    layout = Layout.of(weights)
    vector = layout.pack(weights)
    assert vector.dtype == np.float32 and vector.shape == (sum(v.numel() for v in weights.values()),)
    unpacked = layout.unpack(vector)
    assert list(unpacked) == list(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(unpacked[name], value.numpy())


def test_layout_survives_its_config_values(weights):
    layout = Layout.of(weights)
    values = layout.to_values("layout-")
    assert all(isinstance(v, list) for v in values.values()) and set(values) == {
        "layout-names",
        "layout-ndims",
        "layout-dims",
    }
    assert Layout.from_values(values, "layout-") == layout


def test_averaging_vectors_is_averaging_tensors(weights):
    # What FedAvg does to the packed vectors equals the tensor-by-tensor average.
    layout = Layout.of(weights)
    other = {k: v + 1.5 for k, v in weights.items()}
    mean = layout.unpack(0.25 * layout.pack(weights) + 0.75 * layout.pack(other))
    for name, value in weights.items():
        np.testing.assert_allclose(mean[name], (0.25 * value + 0.75 * other[name]).numpy(), rtol=1e-6, atol=1e-6)


def test_wrong_sizes_and_keys_are_one_clear_error(weights):
    layout = Layout.of(weights)
    with pytest.raises(CmdfedError, match=f"flat vector of {layout.size} values"):
        layout.unpack(np.zeros(layout.size - 1, np.float32))
    with pytest.raises(CmdfedError, match="flat vector"):
        layout.unpack(np.zeros((1, layout.size), np.float32))
    with pytest.raises(CmdfedError, match="1 missing"):
        layout.pack({k: v for k, v in list(weights.items())[1:]})
    first = next(iter(weights))
    with pytest.raises(CmdfedError, match=f"{first} has shape"):
        layout.pack({**weights, first: torch.zeros(3)})


def test_a_message_without_or_with_a_broken_layout_is_refused():
    with pytest.raises(CmdfedError, match="no valid weight layout"):
        Layout.from_values({"phase": "pretrain"}, "layout-")
    with pytest.raises(CmdfedError, match="inconsistent"):
        Layout.from_values({"layout-names": ["a", "b"], "layout-ndims": [1], "layout-dims": [3]}, "layout-")
    with pytest.raises(CmdfedError, match="inconsistent"):
        Layout.from_values({"layout-names": ["a"], "layout-ndims": [2], "layout-dims": [3]}, "layout-")
