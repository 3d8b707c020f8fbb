"""Backend selection on this machine (CPU only): the fallback order and its reasons."""

from __future__ import annotations

import pytest

from cmdfed.errors import CmdfedError
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
    with pytest.raises(
        CmdfedError,
        match=r"no backend can run this model here .*onnxruntime-cpu: failed while "
        r"loading or validating \(RuntimeError: CUDA out of memory",
    ):
        select_backend(signed_bundle, tmp_path)
    with pytest.raises(CmdfedError, match="backend onnxruntime-cpu cannot be used here: failed while loading"):
        select_backend(signed_bundle, tmp_path, force="onnxruntime-cpu")
