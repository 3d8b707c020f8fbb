"""Checkpoint -> verified bundle (`cmdfed edge export`).

Steps, all in a hidden folder beside the destination that is renamed into place only
when every check has passed (a failed export leaves nothing behind):

1. ``torch.export`` of :class:`edge.graph.EdgeGraph` (ConvNeXt blocks folded for the model's
   constant condition) with a dynamic batch and H, W
   dynamic in multiples of 32 (``32 * Dim``), saved as ``model.pt2`` (torch-tensorrt
   compiles this program).
2. ONNX from that same program through the dynamo exporter (opset 18; LayerNorm stays
   one ``LayerNormalization`` node, which TensorRT maps to one normalisation layer), one
   file (external data off: a bundle file is then a complete, checksummable model). The
   symbolic dims are renamed ``batch``, ``height``, ``width`` on every graph input and
   output, so the batch dimension is visibly shared. The exporter writes GELU as
   ``x * (0.5 * (1 + erf(x / sqrt 2)))``, an order ONNX Runtime's Gelu fusion does not
   match, so the two multiplications are swapped to ``((1 + erf) * x) * 0.5`` (exact: a
   product with 0.5 only moves the exponent); ONNX Runtime then runs one fused Gelu per
   block, 12-18 % less CPU time per tile (measured on the tiny model, batch 1 and 8).
   The ops are unchanged, so TensorRT parses the same graph.
3. ``onnx.checker.check_model(full_check=True)`` (also runs shape inference) and the
   TensorRT operator allow-list (``trt_ops``).
4. ONNX Runtime (CPU) against PyTorch's unfolded model at batch 1 with the tile size and at two other
   batch sizes and shapes: the largest absolute difference over all outputs must stay
   within ``tolerance`` (default 1e-3 on probabilities and HV values; measured ~1e-6
   for fp32 on CPU).
5. ``golden.npz``: two synthetic H&E tiles of the tile size (uint8, as a scanner gives
   them) and the unfolded model's outputs; every backend is checked against them at load.
6. ``model.int8.onnx`` (unless ``int8=False``): the graph statically quantised to INT8 (QDQ),
   calibrated on real H&E tiles with tissue, and its gate (golden data within
   ``tolerance_int8``; PQ on the CPM-15 development test images at most ``max_pq_drop`` below
   fp32's); the gate's numbers and verdict go into the manifest's ``variants.int8``
   (:mod:`edge.quantize`). A calibration set without tissue is refused before any work.
   The ``bf16`` variant (unless ``bf16=False``; where the ``openvino`` package is installed
   and this CPU computes bf16): the same graph run by OpenVINO in bf16, gated the same way
   (:mod:`edge.openvino_cpu`), recorded in ``variants.bf16``; elsewhere the export says why
   there is none.
7. ``manifest.json`` with checksums; optionally ``manifest.sig``; then the folder is
   renamed into place and a .tar of it written beside it.

Model version: ``<run>-<s|r><step|round>-<first 8 hex of the weights' sha256>``, so two
exports of the same weights share a version and different weights never do.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import cmdfed
from cmdfed.atomic import atomic_path, json_safe, write_bytes_atomic
from cmdfed.checksums import sha256_of_file
from cmdfed.data.slide import PLAUSIBLE_MPP
from cmdfed.data.synth import synth_tiles
from cmdfed.errors import CmdfedError
from cmdfed.inference.postprocess import WatershedParams
from cmdfed.inference.segment import load_model, to_model_input
from cmdfed.inference.stain import REFERENCE_KEY, HEStains, normalised
from cmdfed.progress import Progress, report
from edge import bundle, openvino_cpu, quantize, signing, trt_ops
from edge.backends import model_input
from edge.graph import INPUT_NAME, EdgeGraph

OPSET = 18
STRIDE = 32
MIN_SIDE, MAX_SIDE = 64, 1024
MAX_BATCH = 32
OPT_BATCH = 8
DEFAULT_TOLERANCE = 1e-3
FP16_TOLERANCE = 0.05  # max abs difference of probabilities/HV an FP16 engine may show on the golden tiles
DIM_NAMES = ("batch", "height", "width")
_STEPS = 7


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tile: int = bundle.DEFAULT_TILE,
    overlap: int = 64,
    mpp: float | None = None,
    sign_key: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    postprocess: WatershedParams | None = None,
    overwrite: bool = False,
    telemetry: str | Path | None = None,
    progress: Progress | None = None,
    int8: bool = True,
    calibration: list[np.ndarray] | None = None,
    int8_tolerance: float = quantize.INT8_TOLERANCE,
    max_pq_drop: float = quantize.MAX_PQ_DROP,
    bf16: bool = True,
    bf16_tolerance: float = openvino_cpu.BF16_TOLERANCE,
) -> dict:
    """Write the bundle folder ``out`` and ``out.tar``; returns what was made.

    ``postprocess``: the watershed settings the workstation will use with this model (tuned
    per model and magnification; by default HoVer-Net's scaled to ``mpp``).
    ``int8``: add the INT8 variant, calibrated on ``calibration`` (uint8 RGB H&E images at the
    model's resolution; default the CPM-15 training images) and gated by ``int8_tolerance``
    on the golden data and ``max_pq_drop`` on the CPM-15 test images.
    ``bf16``: add the bf16 variant (OpenVINO) where this machine can run it, gated by
    ``bf16_tolerance`` and ``max_pq_drop``; the result's ``bf16_skipped`` says why not otherwise.
    """
    check_settings(tile, overlap, tolerance, mpp)
    if (int8 or bf16) and not (int8_tolerance > 0 and bf16_tolerance > 0 and max_pq_drop >= 0):
        raise CmdfedError(
            f"the INT8 and bf16 gates need positive golden tolerances and a PQ drop of at least 0, "
            f"got {int8_tolerance}, {bf16_tolerance} and {max_pq_drop}"
        )
    bf16_skipped = (openvino_cpu.unavailable_reason() if bf16 else "not asked for (--no-bf16)") or None
    # Refused before the slow steps: a calibration set without tissue is the user's to fix.
    tiles = quantize.calibration_tiles(calibration or quantize.default_calibration_images(mpp), tile) if int8 else None
    postprocess = WatershedParams.for_mpp(mpp) if postprocess is None else postprocess
    out = Path(out)
    tar_path = out.with_name(out.name + ".tar")
    private_key = signing.load_private_key(sign_key) if sign_key else None
    if not overwrite and (out.exists() or tar_path.exists()):
        raise CmdfedError(f"{out} or {tar_path.name} already exists; pass --overwrite or choose another --out")
    loaded = load_model(checkpoint, torch.device("cpu"))
    if tiles is not None:  # calibrated on what the workstation will feed the graph
        tiles = np.stack([normalised(t, loaded.stain_reference) for t in tiles])
    graph = EdgeGraph(loaded.model).eval()
    reference = EdgeGraph(loaded.model, fold=False).eval()  # what the folded graph must agree with
    identity = _model_identity(loaded.checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        report(progress, 0, _STEPS, "torch.export")
        program = _torch_export(graph)
        torch.export.save(program, str(work / bundle.PT2_FILE))
        report(progress, 1, _STEPS, "ONNX export")
        _onnx_export(program, graph.output_names, work / bundle.ONNX_FILE)
        report(progress, 2, _STEPS, "ONNX checks")
        ops = check_onnx(work / bundle.ONNX_FILE)
        report(progress, 3, _STEPS, "ONNX Runtime vs PyTorch")
        agreement = _compare_with_torch(reference, work / bundle.ONNX_FILE, tile, tolerance)
        report(progress, 4, _STEPS, "golden data")
        _write_golden(reference, work / bundle.GOLDEN_FILE, tile)
        report(progress, 5, _STEPS, "variants and their gates" if int8 or not bf16_skipped else "bundle")
        manifest = _manifest(loaded, graph, identity, tile, overlap, mpp, tolerance, agreement, ops, postprocess)
        variants = {}
        if int8 or not bf16_skipped:
            scoring = _quality_scoring(manifest)
            pq_fp32 = quantize.dev_test_pq(_session_run(work / bundle.ONNX_FILE, graph.output_names), **scoring)
        if int8:
            variants["int8"] = _int8_variant(
                work, graph.output_names, tiles, scoring, pq_fp32, int8_tolerance, max_pq_drop
            )
        if not bf16_skipped:
            variants["bf16"] = _bf16_variant(work, graph.output_names, scoring, pq_fp32, bf16_tolerance, max_pq_drop)
        if variants:
            manifest["variants"] = variants
        manifest["files"] = bundle.file_records(work)
        manifest_bytes = _json_bytes(manifest)
        write_bytes_atomic(work / bundle.MANIFEST, manifest_bytes)
        if private_key is not None:
            write_bytes_atomic(work / bundle.SIGNATURE, _json_bytes(signing.sign(manifest_bytes, private_key)))
        report(progress, 6, _STEPS, "bundle")
        work.chmod(0o755)  # mkdtemp makes 0700; a bundle is meant to be shared
        tar_path.unlink(missing_ok=True)  # a stale tar must never sit beside the new folder
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with atomic_path(tar_path) as tmp:
        bundle.write_tar(out, tmp)
    tar_sha = sha256_of_file(tar_path)
    report(progress, _STEPS, _STEPS, "done")
    if telemetry:
        _record(telemetry, manifest, identity, tar_sha, signed=private_key is not None, tar_path=tar_path)
    return {
        "version": manifest["model"]["version"],
        "bundle": str(out),
        "tar": str(tar_path),
        "tar_sha256": tar_sha,
        "signed": private_key is not None,
        "max_abs_diff": agreement["max_abs_diff"],
        "opset": OPSET,
        "int8": manifest.get("variants", {}).get("int8", {}).get("gate"),
        "bf16": manifest.get("variants", {}).get("bf16", {}).get("gate"),
        "bf16_skipped": bf16_skipped,
    }


def trained_mpp(checkpoint: str | Path) -> float | None:
    """The resolution a checkpoint records it was trained at (None: not recorded, or a
    checkpoint that cannot be read, which the export itself then reports)."""
    from cmdfed.model.checkpoint import resolve_checkpoint

    try:
        mpp = json.loads((resolve_checkpoint(checkpoint) / "config.json").read_text()).get("mpp")
    except (CmdfedError, OSError, ValueError, AttributeError):
        return None
    return float(mpp) if isinstance(mpp, (int, float)) and not isinstance(mpp, bool) else None


def check_settings(tile: int, overlap: int, tolerance: float, mpp: float | None) -> None:
    if mpp is not None and not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        raise CmdfedError(
            f"--mpp must be a scan resolution in {PLAUSIBLE_MPP[0]}..{PLAUSIBLE_MPP[1]} um/px "
            f"(0.5 at 20x, 0.25 at 40x), got {mpp}"
        )
    if tile % STRIDE or not MIN_SIDE <= tile <= MAX_SIDE:
        raise CmdfedError(f"--tile must be a multiple of {STRIDE} in {MIN_SIDE}..{MAX_SIDE}, got {tile}")
    if overlap % 2 or not 0 <= overlap < tile // 2:
        raise CmdfedError(f"--overlap must be even and below half the tile ({tile // 2}), got {overlap}")
    if not tolerance > 0:
        raise CmdfedError(f"the ONNX/PyTorch tolerance must be positive, got {tolerance}")


def _model_identity(checkpoint: Path) -> dict:
    """Run, round/step and weights hash of a checkpoint folder, and the version made from them."""
    from cmdfed.model.checkpoint import load_checkpoint, model_version

    config = load_checkpoint(checkpoint).config
    weights_file = checkpoint / (
        "ema.safetensors" if (checkpoint / "ema.safetensors").exists() else "model.safetensors"
    )
    weights_sha = sha256_of_file(weights_file)
    run = str(config.get("name") or checkpoint.parent.name)
    round_ = config.get("round")
    step = int(config.get("step", 0))
    return {
        "version": model_version(run, weights_sha, round=round_, step=step),
        "run": run,
        "run_id": config.get("run_id"),
        "phase": config.get("phase"),
        "round": round_,
        "step": step,
        "checkpoint": checkpoint.name,
        "weights_file": weights_file.name,
        "weights_sha256": weights_sha,
        "metrics": config.get("metrics") or {},
    }


def _torch_export(graph: EdgeGraph) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("h32", min=MIN_SIDE // STRIDE, max=MAX_SIDE // STRIDE)
    width = torch.export.Dim("w32", min=MIN_SIDE // STRIDE, max=MAX_SIDE // STRIDE)
    example = torch.zeros(2, 3, 2 * MIN_SIDE, 2 * MIN_SIDE)
    shapes = {INPUT_NAME: {0: batch, 2: STRIDE * height, 3: STRIDE * width}}
    try:
        return torch.export.export(graph, (example,), dynamic_shapes=shapes)
    except Exception as exc:  # torch raises many types here; the user needs the message
        raise CmdfedError(f"torch.export failed for this model ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _onnx_export(program: torch.export.ExportedProgram, output_names: tuple[str, ...], path: Path) -> None:
    example = torch.zeros(2, 3, 2 * MIN_SIDE, 2 * MIN_SIDE)
    try:
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            opset_version=OPSET,
            verbose=False,
        )
    except Exception as exc:  # the exporter's own error types are internal
        raise CmdfedError(f"ONNX export failed ({type(exc).__name__}: {str(exc)[:300]})") from exc
    onnx_program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    _rename_dynamic_dims(model)
    _gelu_in_fusable_order(model)
    onnx.save(model, str(path))


def _rename_dynamic_dims(model: onnx.ModelProto) -> None:
    """Give the input's symbolic dims readable names and use them on every graph output."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    symbols = {dims[0].dim_param: DIM_NAMES[0], dims[2].dim_param: DIM_NAMES[1], dims[3].dim_param: DIM_NAMES[2]}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = symbols[dim.dim_param]


def _gelu_in_fusable_order(model: onnx.ModelProto) -> int:
    """Rewrite each ``Mul(Mul(0.5, 1 + erf(x / sqrt 2)), x)`` as ``Mul(Mul(1 + erf, x), 0.5)``
    in place (see the module docstring); returns how many GELUs were rewritten."""
    graph = model.graph
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {output.name: [None] for output in graph.output}  # a graph output is used too
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str):
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0] is not None and nodes[0].op_type == op_type else None

    def other_input_is(node, name: str, value: float) -> str | None:
        other = node.input[1] if node.input[0] == name else node.input[0]
        array = constants.get(other)
        return other if array is not None and array.size == 1 and abs(float(array.ravel()[0]) - value) < 1e-6 else None

    rewritten = 0
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        add = only_consumer(erf.output[0], "Add")
        half = add and only_consumer(add.output[0], "Mul")
        final = half and only_consumer(half.output[0], "Mul")
        if not (div and div.op_type == "Div" and final and div.input[0] in final.input):
            continue
        half_constant = other_input_is(half, add.output[0], 0.5)
        if not (
            half_constant and other_input_is(add, erf.output[0], 1.0) and other_input_is(div, div.input[0], 2**0.5)
        ):
            continue
        half.input[:] = [add.output[0], div.input[0]]
        final.input[:] = [half.output[0], half_constant]
        rewritten += 1
    return rewritten


def check_onnx(path: Path) -> dict[str, int]:
    """Operator counts of a valid ONNX file TensorRT's parser accepts; CmdfedError otherwise."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CmdfedError(f"the exported ONNX graph is invalid ({str(exc)[:300]})") from exc
    model = onnx.load(str(path))
    problems = trt_ops.unsupported_nodes(model)
    if problems:
        raise CmdfedError(
            f"the ONNX graph has operators TensorRT's ONNX parser does not support: {'; '.join(problems)}; "
            "change the model so it exports to supported ops"
        )
    return trt_ops.op_counts(model)


def validation_shapes(tile: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) checked at export: the deployment tile at batch 1, and other batches/shapes."""
    return [(1, tile, tile), (2, MIN_SIDE, MIN_SIDE + STRIDE), (3, MIN_SIDE + STRIDE, MIN_SIDE)]


def _compare_with_torch(graph: EdgeGraph, path: Path, tile: int, tolerance: float) -> dict:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst, per_shape = 0.0, []
    for batch, height, width in validation_shapes(tile):
        images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        x = to_model_input(images)
        with torch.no_grad():
            expected = [t.numpy() for t in graph(x)]
        actual = session.run(None, {INPUT_NAME: x.numpy()})
        diff = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))
        per_shape.append({"shape": [batch, 3, height, width], "max_abs_diff": diff})
        worst = max(worst, diff)
        if not diff <= tolerance:
            raise CmdfedError(
                f"ONNX Runtime and PyTorch disagree by {diff:.3g} at input shape {(batch, 3, height, width)} "
                f"(tolerance {tolerance:g}); the export is not faithful, nothing was written"
            )
    return {"max_abs_diff": worst, "shapes": per_shape, "tolerance": tolerance}


def _write_golden(graph: EdgeGraph, path: Path, tile: int) -> None:
    images = np.stack([t.image for t in synth_tiles(2, tile_size=tile, seed=0)])
    with torch.no_grad():
        outputs = graph(to_model_input(images))
    arrays = {"input": images, **{f"output_{n}": o.numpy() for n, o in zip(graph.output_names, outputs)}}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _quality_scoring(manifest: dict) -> dict:
    """How the variants' gates segment the CPM-15 test images: as the workstation will."""
    pre = manifest["preprocessing"]
    return {
        "tile": pre["tile_size"],
        "overlap": pre["overlap"],
        "multiple": STRIDE,
        "min_side": MIN_SIDE,
        "params": WatershedParams.from_manifest(manifest),
        "mpp": pre["mpp"],
        "stain_reference": HEStains.from_manifest(manifest),
    }


def _golden_diff(run, work: Path, output_names: tuple[str, ...]) -> float:
    with np.load(work / bundle.GOLDEN_FILE) as golden:
        actual = run(golden["input"])
        return max(float(np.abs(actual[n] - golden[f"output_{n}"]).max()) for n in output_names)


def _int8_variant(
    work: Path,
    output_names: tuple[str, ...],
    tiles: np.ndarray,
    scoring: dict,
    pq_fp32: dict,
    tolerance: float,
    max_pq_drop: float,
) -> dict:
    """Quantise the fp32 graph in ``work``, gate it, and return its manifest record."""
    quantize.quantize(work / bundle.ONNX_FILE, work / quantize.INT8_FILE, tiles, model_input)
    run = _session_run(work / quantize.INT8_FILE, output_names)
    golden_diff = _golden_diff(run, work, output_names)
    pq = quantize.dev_test_pq(run, **scoring)
    return {
        "onnx": quantize.INT8_FILE,
        "runtime": "onnxruntime",
        "precision": "int8",
        "format": "QDQ (onnxruntime.quantization.quantize_static): Conv/MatMul/Gemm weights int8 per channel, "
        "activations uint8",
        "calibration": {"tiles": len(tiles), "tile_size": int(tiles.shape[1]), "method": "MinMax"},
        "gate": quantize.gate(golden_diff, tolerance, pq_fp32, pq, max_pq_drop),
    }


def _bf16_variant(
    work: Path, output_names: tuple[str, ...], scoring: dict, pq_fp32: dict, tolerance: float, max_pq_drop: float
) -> dict:
    """Gate the fp32 graph in ``work`` run by OpenVINO in bf16, and return its manifest record."""
    openvino = openvino_cpu.import_openvino()
    compiled = openvino_cpu.compile_bf16((work / bundle.ONNX_FILE).read_bytes())
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in output_names]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({0: model_input(images)})
        return {name: result[output] for name, output in zip(output_names, outputs)}

    golden_diff = _golden_diff(run, work, output_names)
    pq = quantize.dev_test_pq(run, **scoring)
    return {
        "onnx": bundle.ONNX_FILE,
        "runtime": "openvino",
        "precision": "bf16",
        "format": f"the fp32 graph, OpenVINO {openvino.__version__} CPU plugin with INFERENCE_PRECISION_HINT bf16",
        "gate": quantize.gate(golden_diff, tolerance, pq_fp32, pq, max_pq_drop, variant="bf16"),
    }


def _session_run(path: Path, output_names: tuple[str, ...]):
    """A call running the ONNX graph at ``path`` on uint8 NHWC tiles, as a backend's ``run``."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(list(output_names), {INPUT_NAME: model_input(images)})))

    return run


def _io_specs(graph: EdgeGraph, tile: int, n_classes: int) -> tuple[list[dict], list[dict]]:
    def shapes(channels: int | None) -> dict:
        def shape(batch: int, side: int) -> list[int]:
            return [batch, side, side] if channels is None else [batch, channels, side, side]

        return {"min": shape(1, MIN_SIDE), "opt": shape(OPT_BATCH, tile), "max": shape(MAX_BATCH, MAX_SIDE)}

    inputs = [
        {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "dims": ["batch", 3, "height", "width"], **shapes(3)}
    ]
    channels = {"np": None, "hv": 2, "nc": n_classes}
    meaning = {"np": "nucleus probability", "hv": "horizontal/vertical distance maps", "nc": "class probabilities"}
    outputs = []
    for name in graph.output_names:
        dims = ["batch", "height", "width"] if channels[name] is None else ["batch", channels[name], "height", "width"]
        outputs.append(
            {"name": name, "dtype": "float32", "dims": dims, "meaning": meaning[name], **shapes(channels[name])}
        )
    return inputs, outputs


def _manifest(loaded, graph, identity, tile, overlap, mpp, tolerance, agreement, ops, postprocess) -> dict:
    inputs, outputs = _io_specs(graph, tile, loaded.config.n_classes)
    return {
        "schema_version": bundle.SCHEMA_VERSION,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {
            "name": "CMD",
            **{k: v for k, v in identity.items() if k != "metrics"},
            "config": loaded.config.to_dict(),
            "class_names": loaded.class_names,
        },
        "software": {
            "cmdfed": cmdfed.__version__,
            **_git_commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": OPSET,
        },
        "graph": {
            "onnx": bundle.ONNX_FILE,
            "pt2": bundle.PT2_FILE,
            "inputs": inputs,
            "outputs": outputs,
            "side_multiple_of": STRIDE,
            "ops": ops,
            "tensorrt_op_check": "passed (onnx-tensorrt operator matrix; see edge/trt_ops.py)",
        },
        "preprocessing": {
            "channel_order": "RGB",
            "source": "uint8 (B, H, W, 3)",
            "normalisation": "x / 255 * 2 - 1 (uint8 -> [-1, 1]), then NHWC -> NCHW",
            "tile_size": tile,
            "overlap": overlap,
            "mpp": mpp,
            "level": 0,
            # Images are re-stained as these first (Macenko, from a slide's or request's own stains;
            # cmdfed.inference.stain); null: they are fed as scanned.
            REFERENCE_KEY: None if loaded.stain_reference is None else loaded.stain_reference.to_dict(),
        },
        "postprocessing": {
            "method": "HoVer-Net marker-controlled watershed (cmdfed.inference.postprocess)",
            "params": postprocess.to_dict(),
            "max_nucleus_diameter_px": overlap,
        },
        "validation": {
            "golden": bundle.GOLDEN_FILE,
            "tolerance_fp32": tolerance,
            "tolerance_fp16": FP16_TOLERANCE,
            "onnxruntime_vs_torch": agreement,
        },
    }


def _git_commit() -> dict:
    source = Path(cmdfed.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"git_commit": None}
    if commit.returncode != 0:
        return {"git_commit": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


def _json_bytes(obj) -> bytes:
    return (json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _record(telemetry, manifest: dict, identity: dict, tar_sha: str, *, signed: bool, tar_path: Path) -> None:
    from cmdfed.telemetry import TelemetryStore

    with TelemetryStore.open(telemetry, create=True) as store:
        store.record_model_version(
            identity["version"],
            run_id=identity["run_id"] or identity["run"],
            round=identity["round"],
            metrics=identity["metrics"],
            checkpoint_sha256=identity["weights_sha256"],
        )
        store.record_bundle(manifest["model"]["version"], sha256=tar_sha, signed=signed, path=str(tar_path))
