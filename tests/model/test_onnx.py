"""The fine-tuning forward exports to ONNX with TensorRT-friendly ops and matches PyTorch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cmdfed.model import SegmentationGraph


@pytest.mark.slow
def test_segment_exports_to_onnx(make_tiny, make_images, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    graph = SegmentationGraph(make_tiny(n_classes=4)).eval()
    height, width = torch.export.Dim("h32", min=1, max=64), torch.export.Dim("w32", min=1, max=64)
    program = torch.onnx.export(
        graph,
        (make_images(2, 64),),
        dynamo=True,
        input_names=["image"],
        output_names=["np", "hv", "nc"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch", max=64), 2: 32 * height, 3: 32 * width}},
    )
    path = tmp_path / "cmd_tiny.onnx"
    program.save(str(path))

    nodes = onnx.load(str(path)).graph.node
    ops = Counter(node.op_type for node in nodes)
    assert ops["LayerNormalization"] >= 1
    resize_modes = {
        onnx.helper.get_attribute_value(attribute).decode()
        for node in nodes
        if node.op_type == "Resize"
        for attribute in node.attribute
        if attribute.name == "mode"
    }
    assert resize_modes and resize_modes <= {"nearest", "linear"}
    assert not {"ConvTranspose", "GridSample"} & set(ops)

    session = onnxruntime.InferenceSession(str(path))
    for size in ((64, 64), (96, 128)):
        image = make_images(2, size, seed=3)
        with torch.no_grad():
            expected = graph(image)
        actual = session.run(None, {"image": image.numpy()})
        assert len(actual) == 3
        for a, e in zip(actual, expected):
            torch.testing.assert_close(torch.from_numpy(a), e, rtol=1e-4, atol=1e-5)
