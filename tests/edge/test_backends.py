"""The backends' common run() API and the bundle data they load."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from edge.backends import BundleModel, model_input
from edge.selection import select_backend


def test_run_takes_uint8_or_float_and_splits_large_batches(signed_bundle, tmp_path):
    backend = select_backend(signed_bundle, tmp_path, force="onnxruntime-cpu").backend
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    from_uint8 = backend.run(images)
    from_float = backend.run(model_input(images))
    assert from_uint8["np"].shape == (3, 64, 96) and from_uint8["nc"].shape == (3, 4, 64, 96)
    assert all(np.array_equal(from_uint8[k], from_float[k]) for k in from_uint8)
    backend.max_shape = [2, *backend.max_shape[1:]]  # as if the graph allowed batches of 2
    split = backend.run(images)
    assert all(np.allclose(split[k], from_uint8[k], atol=1e-6) for k in split)
    with pytest.raises(CmdfedError, match="multiples of 32"):
        backend.run(np.zeros((1, 70, 64, 3), np.uint8))


def test_golden_data_loads_in_manifest_order(signed_bundle):
    images, outputs = BundleModel.load(signed_bundle).golden()
    assert list(outputs) == ["np", "hv", "nc"] and images.shape[0] == 2


def _page_faults(run) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_without_a_kept_arena_only_one_window_runs_stay_warm(signed_bundle, tmp_path):
    # What the edge service asks for: ONNX Runtime's memory goes back after every run (the next
    # run of that shape page-faults it in again), except after a run of one model window, the
    # shape a one-tile request gives, whose memory stays for the next one.
    backend = select_backend(signed_bundle, tmp_path, force="onnxruntime-cpu", memory_arena=False).backend
    window = backend.model.manifest["preprocessing"]["tile_size"]
    one = np.full((1, window, window, 3), 200, np.uint8)
    two = np.full((2, window, window, 3), 200, np.uint8)
    for _ in range(3):
        backend.run(one)
    warm = min(_page_faults(lambda: backend.run(one)) for _ in range(3))
    backend.run(two)
    given_back = min(_page_faults(lambda: backend.run(two)) for _ in range(3))
    assert given_back > 10 * max(warm, 10), (warm, given_back)
