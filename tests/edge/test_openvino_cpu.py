"""The bundle's bf16 variant (OpenVINO): exported with its gate where this machine can run it,
chosen only when its gate passed and it is the fastest CPU graph here, left out by
``--backend onnxruntime-cpu``, run by ``--backend openvino-cpu``, and refused with the reason
where the bundle has none or its gate failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cmdfed.errors import CmdfedError
from edge.bundle import ONNX_FILE
from edge.deploy import active_bundle, deploy, status
from edge.export import export_bundle
from edge.openvino_cpu import import_openvino, unavailable_reason
from edge.selection import select_backend

from .conftest import OVERLAP, TILE, tuned_params

NO_BF16 = unavailable_reason()
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=f"the bf16 variant cannot run here: {NO_BF16}")


def bf16_home(checkpoint, folder, **gate):
    export_bundle(
        checkpoint,
        folder / "bundle",
        tile=TILE,
        overlap=OVERLAP,
        mpp=0.5,
        postprocess=tuned_params(checkpoint),
        int8=False,
        **gate,
    )
    deploy(folder / "bundle", folder / "home")
    return folder / "home"


@pytest.fixture(scope="module")
def passing_home(checkpoint, tmp_path_factory):
    """A 2-step model's PQ is near zero and moves by chance: the gate is opened wide so that the
    choice between two sound graphs is what is tested."""
    if NO_BF16:
        pytest.skip(f"the bf16 variant cannot run here: {NO_BF16}")
    return bf16_home(checkpoint, tmp_path_factory.mktemp("bf16-pass"), max_pq_drop=1.0, bf16_tolerance=1.0)


@pytest.fixture(scope="module")
def failing_home(checkpoint, tmp_path_factory):
    """A golden tolerance no bf16 run meets: the variant fails its gate at export."""
    if NO_BF16:
        pytest.skip(f"the bf16 variant cannot run here: {NO_BF16}")
    return bf16_home(checkpoint, tmp_path_factory.mktemp("bf16-fail"), bf16_tolerance=1e-9)


def manifest_of(home):
    return json.loads((active_bundle(home) / "manifest.json").read_text())


@needs_bf16
def test_bf16_variant_is_the_fp32_graph_under_openvino_with_its_gate(passing_home):
    manifest = manifest_of(passing_home)
    variant = manifest["variants"]["bf16"]
    assert (variant["onnx"], variant["runtime"], variant["precision"]) == (ONNX_FILE, "openvino", "bf16")
    assert not any("bf16" in name for name in manifest["files"])  # no file of its own
    gate = variant["gate"]
    assert gate["passed"] and gate["reason"] is None
    assert set(gate["pq_fp32"]) == set(gate["pq_bf16"]) == {"08", "09", "10", "mean"}
    assert 0 < gate["golden_max_abs_diff"] <= gate["tolerance"]
    assert status(passing_home)["variants"]["bf16"]["passed"]


@needs_bf16
def test_the_cpu_runs_the_fastest_gated_graph_of_either_runtime(passing_home):
    selection = select_backend(active_bundle(passing_home), passing_home, threads=1)
    report = selection.report()
    variants = report["variants"]
    assert set(variants) == {"fp32", "bf16"}
    fastest = min(variants, key=lambda v: variants[v]["ms_per_tile"])
    (other,) = {"fp32", "bf16"} - {fastest}
    assert report["precision"] == fastest and variants[fastest]["used"] and not variants[other]["used"]
    assert report["backend"] == {"fp32": "onnxruntime-cpu", "bf16": "openvino-cpu"}[fastest]
    tiles = np.random.default_rng(0).integers(0, 256, (3, TILE, TILE, 3), dtype=np.uint8)
    assert selection.backend.run(tiles)["np"].shape == (3, TILE, TILE)


@needs_bf16
def test_each_runtime_can_be_forced_and_they_agree(passing_home):
    bundle = active_bundle(passing_home)
    onnxruntime = select_backend(bundle, passing_home, force="onnxruntime-cpu", threads=1)
    assert (onnxruntime.backend.name, onnxruntime.backend.precision) == ("onnxruntime-cpu", "fp32")
    left_out = onnxruntime.report()["variants"]["bf16"]
    assert not left_out["used"] and "leaves out openvino" in left_out["reason"]
    openvino = select_backend(bundle, passing_home, force="openvino-cpu", threads=1)
    assert (openvino.backend.name, openvino.backend.precision) == ("openvino-cpu", "bf16")
    tiles = np.random.default_rng(1).integers(0, 256, (2, 2 * TILE, TILE, 3), dtype=np.uint8)
    fp32, bf16 = onnxruntime.backend.run(tiles), openvino.backend.run(tiles)
    assert set(bf16) == set(fp32)
    tolerance = manifest_of(passing_home)["variants"]["bf16"]["gate"]["tolerance"]
    for name in fp32:
        assert bf16[name].dtype == np.float32 and bf16[name].shape == fp32[name].shape
        assert 0 < np.abs(bf16[name] - fp32[name]).max() <= tolerance


@needs_bf16
def test_bf16_that_failed_its_gate_is_not_used_and_not_forced(failing_home):
    gate = manifest_of(failing_home)["variants"]["bf16"]["gate"]
    assert not gate["passed"] and "golden outputs differ" in gate["reason"]
    selection = select_backend(active_bundle(failing_home), failing_home, threads=1)
    assert (selection.backend.name, selection.backend.precision) == ("onnxruntime-cpu", "fp32")
    bf16 = selection.report()["variants"]["bf16"]
    assert not bf16["used"] and "failed its gate at export" in bf16["reason"]
    with pytest.raises(CmdfedError, match="backend openvino-cpu cannot be used here: .*failed its gate at export"):
        select_backend(active_bundle(failing_home), failing_home, force="openvino-cpu")


def test_forcing_openvino_on_a_bundle_without_bf16_says_how_to_get_one(signed_bundle, tmp_path):
    with pytest.raises(CmdfedError, match="no bf16 variant .*export it where the openvino package is installed"):
        select_backend(signed_bundle, tmp_path, force="openvino-cpu")


def test_openvino_is_imported_with_its_usage_telemetry_declined(tmp_path):
    """A fresh process whose user never chose (no consent file: openvino-telemetry would send)."""
    pytest.importorskip("openvino")
    probe = (
        "from edge.openvino_cpu import import_openvino; import_openvino(); import openvino_telemetry; "
        "print(openvino_telemetry.Telemetry().consent)"
    )
    env = {**os.environ, "HOME": str(tmp_path), "CI": "false"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert not (tmp_path / "intel" / "openvino_ga_cid").exists() and not (tmp_path / "intel" / "stats").exists()
    assert import_openvino().__version__
