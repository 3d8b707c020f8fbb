"""Fault injection on an edge home (issue #14, findings 2 and 3): each broken input, the
refusal it gets, and nothing written or lost."""

from __future__ import annotations

import json
import shutil

import pytest

from cmdfed.errors import CmdfedError
from edge.deploy import deploy, read_state, status
from edge.infer import infer_slide
from edge.service import EdgeService


def _flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def own_home(signed_bundle, tmp_path):
    home = tmp_path / "home"
    deploy(signed_bundle, home)
    return home


# -- finding 3: the installed model is verified at every load -----------------------------


def test_a_flipped_byte_in_the_installed_model_is_refused_by_infer_and_serve(own_home, slide_tiff, tmp_path):
    version = read_state(own_home)["active"]
    onnx = own_home / "models" / version / "model.onnx"
    _flip_byte(onnx)
    assert "model.onnx" in status(own_home)["problem"]
    out = tmp_path / "out"
    with pytest.raises(CmdfedError, match=r"model\.onnx.*cmdfed edge status --home"):
        infer_slide(slide_tiff, own_home, out)
    assert not out.exists()
    with pytest.raises(CmdfedError, match=r"model\.onnx.*cmdfed edge status --home"):
        EdgeService(own_home, port=0)
    for forced in ("onnxruntime-cpu",):  # a forced backend gets the same refusal, not a fallback
        with pytest.raises(CmdfedError, match="damaged"):
            infer_slide(slide_tiff, own_home, out, backend=forced)
    assert read_state(own_home)["active"] == version  # nothing changed in the home
