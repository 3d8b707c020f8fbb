"""Will TensorRT's ONNX parser take this graph? A static check at export time.

An engine is built on each workstation, long after export; a graph that the parser
rejects would only fail there, at a hospital. So export checks every node against the
operators the parser supports and refuses the bundle otherwise.

Source of the list: the operator support matrix of onnx/onnx-tensorrt,
``docs/operators.md`` as released with TensorRT 8.5 (opset <= 17; every operator marked
"Y"), plus ``LayerNormalization``, which the parser imports natively since TensorRT 8.6
(INormalizationLayer). Later TensorRT releases only add operators, so a graph that
passes here parses on 8.6 and later. The restrictions the matrix states for ``Resize``
are enforced too (modes nearest/linear only; cubic is refused). Only the default ONNX
domain ("" or "ai.onnx") is accepted: custom-domain operators would need plugins that a
workstation does not have.
"""

from __future__ import annotations

from collections import Counter

import onnx

TENSORRT_ONNX_OPS = frozenset(
    [
        "Abs",
        "Acos",
        "Acosh",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Asin",
        "Asinh",
        "Atan",
        "Atanh",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Celu",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "Cos",
        "Cosh",
        "CumSum",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Dropout",
        "Einsum",
        "Elu",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "EyeLike",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gemm",
        "GlobalAveragePool",
        "GlobalLpPool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "GRU",
        "HardSwish",
        "HardSigmoid",
        "Identity",
        "If",
        "ImageScaler",
        "InstanceNormalization",
        "IsNaN",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "Loop",
        "LRN",
        "LSTM",
        "LpNormalization",
        "LpPool",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "MeanVarianceNormalization",
        "Min",
        "Mod",
        "Mul",
        "Neg",
        "NonMaxSuppression",
        "NonZero",
        "Not",
        "OneHot",
        "Or",
        "Pad",
        "ParametricSoftplus",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "Reciprocal",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "Resize",
        "ReverseSequence",
        "RNN",
        "RoiAlign",
        "Round",
        "ScaledTanh",
        "Scan",
        "Scatter",
        "ScatterElements",
        "ScatterND",
        "Selu",
        "Shape",
        "Shrink",
        "Sigmoid",
        "Sign",
        "Sin",
        "Sinh",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Softsign",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tan",
        "Tanh",
        "ThresholdedRelu",
        "Tile",
        "TopK",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Upsample",
        "Where",
        "Xor",
    ]
)
DEFAULT_DOMAINS = ("", "ai.onnx")
RESIZE_MODES = ("nearest", "linear")
RESIZE_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")
RESIZE_NEAREST_MODES = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """One line per kind of problem (operator or attribute TensorRT's parser refuses), with counts."""
    problems: Counter[str] = Counter()
    for node in _all_nodes(model.graph):
        if node.domain not in DEFAULT_DOMAINS:
            problems[f"{node.domain}::{node.op_type} (custom domain)"] += 1
        elif node.op_type not in TENSORRT_ONNX_OPS:
            problems[f"{node.op_type} (not supported by the parser)"] += 1
        elif node.op_type == "Resize":
            problems.update(_resize_problems(node))
    return [f"{what} x{count}" for what, count in sorted(problems.items())]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in _all_nodes(model.graph)).items()))


def _resize_problems(node: onnx.NodeProto) -> list[str]:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    checks = (
        ("mode", b"nearest", RESIZE_MODES),
        ("coordinate_transformation_mode", b"half_pixel", RESIZE_COORDINATE_MODES),
        ("nearest_mode", b"round_prefer_floor", RESIZE_NEAREST_MODES),
    )
    problems = []
    for name, default, allowed in checks:
        value = attributes.get(name, default).decode()
        if value not in allowed:
            problems.append(f"Resize with {name}={value} (parser supports {', '.join(allowed)})")
    return problems


def _all_nodes(graph: onnx.GraphProto):
    """Nodes of the graph and of any subgraph (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _all_nodes(sub)
