"""Backend selection on this machine (CPU only) and the common run() API."""

from __future__ import annotations

import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from edge.backends import BundleModel, model_input
from edge.selection import select_backend

TORCH_CUDA = pytest.importorskip("torch").cuda.is_available()


@pytest.mark.skipif(TORCH_CUDA, reason="checks the CPU-only fallback")
def test_cpu_machine_selects_onnxruntime_cpu_and_says_why(signed_bundle, tmp_path):
    selection = select_backend(signed_bundle, tmp_path)
    report = selection.report()
    assert report["backend"] == "onnxruntime-cpu" and report["golden_max_abs_diff"] < 1e-3
    assert set(report["skipped"]) == {"tensorrt", "onnxruntime-cuda"}
    assert "CUDAExecutionProvider" in report["skipped"]["onnxruntime-cuda"]
    assert "tensorrt" in report["skipped"]["tensorrt"] or "GPU" in report["skipped"]["tensorrt"]


@pytest.mark.skipif(TORCH_CUDA, reason="checks the CPU-only fallback")
def test_forcing_an_unavailable_backend_is_a_clear_error(signed_bundle, tmp_path):
    with pytest.raises(CmdfedError, match="backend onnxruntime-cuda cannot be used here"):
        select_backend(signed_bundle, tmp_path, force="onnxruntime-cuda")
    with pytest.raises(CmdfedError, match="unknown backend"):
        select_backend(signed_bundle, tmp_path, force="openvino")


@pytest.mark.skipif(TORCH_CUDA, reason="checks the CPU-only fallback")
def test_a_runtime_failing_mid_validation_is_reported_not_raised(signed_bundle, tmp_path, monkeypatch):
    import onnxruntime

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", fail)
    with pytest.raises(CmdfedError, match=r"no backend can run this model here .*onnxruntime-cpu: failed while "
                                          r"loading or validating \(RuntimeError: CUDA out of memory"):
        select_backend(signed_bundle, tmp_path)
    with pytest.raises(CmdfedError, match="backend onnxruntime-cpu cannot be used here: failed while loading"):
        select_backend(signed_bundle, tmp_path, force="onnxruntime-cpu")


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
