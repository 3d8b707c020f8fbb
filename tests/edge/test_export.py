"""Export: bundle files, checksums, manifest, ONNX agreement, TensorRT op allow-list."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cmdfed.checksums import sha256_of_file
from cmdfed.errors import CmdfedError
from cmdfed.model.checkpoint import resolve_checkpoint
from edge.export import check_onnx, export_bundle
from edge.trt_ops import unsupported_nodes


def test_bundle_has_every_file_with_its_checksum(signed_bundle):
    manifest = json.loads((signed_bundle / "manifest.json").read_text())
    names = {p.name for p in signed_bundle.iterdir()}
    assert names == {"manifest.json", "manifest.sig", "model.onnx", "model.pt2", "golden.npz"}
    assert set(manifest["files"]) == {"model.onnx", "model.pt2", "golden.npz"}
    for name, record in manifest["files"].items():
        assert sha256_of_file(signed_bundle / name) == record["sha256"]
        assert (signed_bundle / name).stat().st_size == record["bytes"]
    with tarfile.open(signed_bundle.with_name("cmd.tar")) as tar:
        assert sorted(tar.getnames()) == ["cmd", *sorted(f"cmd/{n}" for n in names)]


def test_manifest_describes_model_io_and_processing(signed_bundle, checkpoint):
    manifest = json.loads((signed_bundle / "manifest.json").read_text())
    model = manifest["model"]
    assert model["version"].startswith("ft-s000002-") and model["run"] == "ft" and model["step"] == 2
    assert model["class_names"] == ["background", "epithelial", "lymphocyte", "stromal"]
    assert manifest["software"]["opset"] >= 18 and manifest["software"]["torch"]
    [image] = manifest["graph"]["inputs"]
    assert image["name"] == "image" and image["min"] == [1, 3, 64, 64] and image["opt"][2:] == [128, 128]
    assert [o["name"] for o in manifest["graph"]["outputs"]] == ["np", "hv", "nc"]
    pre = manifest["preprocessing"]
    assert (pre["channel_order"], pre["tile_size"], pre["overlap"], pre["mpp"]) == ("RGB", 128, 32, 0.5)
    # The stains of the tiles the model trained on, which the workstation re-stains slides as.
    assert (
        pre["stain_reference"]
        == json.loads((resolve_checkpoint(checkpoint) / "config.json").read_text())["stain_reference"]
    )
    assert pre["stain_reference"]["method"] == "macenko"
    assert manifest["postprocessing"]["params"]["sobel_kernel_size"] == 11
    agreement = manifest["validation"]["onnxruntime_vs_torch"]
    assert agreement["max_abs_diff"] <= agreement["tolerance"]
    assert {tuple(s["shape"][:1]) for s in agreement["shapes"]} == {(1,), (2,), (3,)}


def test_onnx_is_one_file_with_a_shared_dynamic_batch(signed_bundle):
    model = onnx.load(str(signed_bundle / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    ]
    assert dims[0] == ["batch", 3, "height", "width"]
    assert all(d[0] == "batch" and d[-2:] == ["height", "width"] for d in dims)


def test_onnx_runtime_fuses_every_gelu_of_the_exported_graph(signed_bundle, tmp_path):
    import onnxruntime

    exported = onnx.load(str(signed_bundle / "model.onnx"))
    blocks = sum(node.op_type == "Erf" for node in exported.graph.node)
    assert blocks > 0  # one erf GELU per ConvNeXt block, written out by the exporter
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(signed_bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Erf" not in optimized
    assert sum(op in ("Gelu", "BiasGelu") for op in optimized) == blocks  # BiasGelu: with the Linear's bias added


def _gelu_graph(constant_shape, extra_output: bool) -> onnx.ModelProto:
    """x * (0.5 * (1 + erf(x / sqrt 2))), as the exporter writes it, with (1,)- or ()-shaped constants."""
    from onnx import helper, numpy_helper

    def constant(name, value):
        return numpy_helper.from_array(np.full(constant_shape, value, np.float32), name)

    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["half", "a"], ["h"]),
        helper.make_node("Mul", ["x", "h"], ["y"]),
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in (["y", "h"] if extra_output else ["y"])
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        outputs,
        [constant("sqrt2", 2**0.5), constant("one", 1.0), constant("half", 0.5)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("constant_shape", [(), (1,)])
def test_the_gelu_rewrite_keeps_every_output_the_same(constant_shape):
    import onnxruntime

    from edge.export import _gelu_in_fusable_order

    x = np.linspace(-3, 3, 4, dtype=np.float32)
    for extra_output, expected_rewrites in ((False, 1), (True, 0)):  # a used intermediate value is left alone
        model = _gelu_graph(constant_shape, extra_output)
        before = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})
        assert _gelu_in_fusable_order(model) == expected_rewrites
        after = onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": x})
        assert all(np.array_equal(b, a) for b, a in zip(before, after))


def test_golden_data_is_uint8_tiles_and_probabilities(signed_bundle):
    with np.load(signed_bundle / "golden.npz") as golden:
        assert golden["input"].dtype == np.uint8 and golden["input"].shape == (2, 128, 128, 3)
        assert np.allclose(golden["output_nc"].sum(1), 1, atol=1e-5)


def test_absurd_tolerance_fails_cleanly_and_leaves_nothing(checkpoint, tmp_path):
    with pytest.raises(CmdfedError, match="disagree"):
        export_bundle(checkpoint, tmp_path / "b", tile=64, overlap=16, tolerance=1e-30)
    assert list(tmp_path.iterdir()) == []


def test_bad_tile_settings_are_refused(checkpoint, tmp_path):
    with pytest.raises(CmdfedError, match="multiple of 32"):
        export_bundle(checkpoint, tmp_path / "b", tile=100)
    with pytest.raises(CmdfedError, match="overlap"):
        export_bundle(checkpoint, tmp_path / "b", tile=128, overlap=64)


def _resize_model(mode: str, domain: str = "") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode, domain=domain)
    graph = helper.make_graph([node], "g", [x], [y], initializer=[scales])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_allow_list_rejects_cubic_resize_and_custom_domains(tmp_path):
    assert unsupported_nodes(_resize_model("nearest")) == []
    assert unsupported_nodes(_resize_model("cubic")) == ["Resize with mode=cubic (parser supports nearest, linear) x1"]
    assert "custom domain" in unsupported_nodes(_resize_model("nearest", domain="com.example"))[0]
    path = tmp_path / "cubic.onnx"
    onnx.save(_resize_model("cubic"), str(path))
    with pytest.raises(CmdfedError, match="TensorRT's ONNX parser does not support: Resize with mode=cubic"):
        check_onnx(path)
