"""TensorRT backend: needs the tensorrt package and an NVIDIA GPU; skipped elsewhere."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorrt")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def test_engine_is_built_cached_validated_and_reused(signed_bundle, tmp_path):
    from edge.selection import select_backend

    first = select_backend(signed_bundle, tmp_path, force="tensorrt")
    assert first.backend.precision == "fp16" and not first.backend.from_cache
    [engine_dir] = (tmp_path / "engines").iterdir()
    meta = json.loads((engine_dir / "meta.json").read_text())
    assert meta["gpu"] == torch.cuda.get_device_name(0)
    second = select_backend(signed_bundle, tmp_path, force="tensorrt")
    assert second.backend.from_cache and second.max_abs_diff <= 0.05


def test_engine_from_another_gpu_is_rebuilt(signed_bundle, tmp_path):
    from edge.selection import select_backend

    select_backend(signed_bundle, tmp_path, force="tensorrt")
    [engine_dir] = (tmp_path / "engines").iterdir()
    meta = json.loads((engine_dir / "meta.json").read_text())
    (engine_dir / "meta.json").write_text(json.dumps({**meta, "gpu": "Some Other GPU"}))
    assert not select_backend(signed_bundle, tmp_path, force="tensorrt").backend.from_cache
