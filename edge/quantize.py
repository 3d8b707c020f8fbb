"""The bundle's INT8 variant: static QDQ quantisation of the fp32 ONNX graph, and its gate.

Why: on a CPU with VNNI (AVX-512 VNNI, AVX-VNNI) ONNX Runtime runs the quantised convolutions
and matrix products with 8-bit dot products, several times the fp32 arithmetic per cycle.

Quantisation (``onnxruntime.quantization.quantize_static``, QDQ format): Conv, MatMul and Gemm
weights int8 per output channel, their activations uint8 with one scale per tensor (the u8s8
pair VNNI multiplies). LayerNorm, GELU, the softmax heads and the resizes stay fp32. The
activation ranges (MinMax) are calibrated on real H&E: tiles of the tile size cut from the
CPM-15 training images (``cmdfed.data.cpm15``, shipped in the package, at the model's
resolution), keeping only tiles with tissue on them (a range measured on glass would clip
nuclei). A calibration set without tissue is refused with one error saying what to give.

Gate, at export (the result goes into the manifest, ``variants.int8``), both must hold:

* golden data: the INT8 graph's outputs on the golden tiles within ``tolerance_int8`` of
  PyTorch's fp32 outputs (checked again at every load, like the fp32 graph);
* quality: mean panoptic quality on the CPM-15 development test images (08-10, scored at the
  model's resolution with the bundle's post-processing) at most ``max_pq_drop`` below the fp32
  graph's on the same images.

A variant that fails is still written (so its numbers can be read) but marked failed with the
reason; the workstation then runs fp32 and says why (``edge.selection``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmdfed.data import cpm15
from cmdfed.errors import CmdfedError
from cmdfed.evaluate.metrics import evaluate_instances
from cmdfed.inference.postprocess import WatershedParams, postprocess
from cmdfed.inference.stain import HEStains, normalised
from cmdfed.inference.tissue import tissue_mask
from edge.windows import windowed_maps

INT8_FILE = "model.int8.onnx"
INT8_TOLERANCE = 0.35  # max abs difference of probabilities/HV on the golden tiles (8-bit activations)
MAX_PQ_DROP = 0.01
CALIBRATION_TILES = 24
MIN_TISSUE = 0.25  # fraction of a calibration tile that must be tissue
QUANTISED_OPS = ["Conv", "MatMul", "Gemm"]
QUALITY_MPP = 0.5  # CPM-15 is scored at 20x when the model does not state its resolution


def default_calibration_images(mpp: float | None) -> list[np.ndarray]:
    """The CPM-15 training images (never the test images the quality gate scores) at ``mpp``."""
    return [cpm15.load_pair(image_id, mpp or QUALITY_MPP)[0] for image_id in cpm15.TRAIN_IDS]


def calibration_tiles(images: list[np.ndarray], tile: int, count: int = CALIBRATION_TILES) -> np.ndarray:
    """Up to ``count`` uint8 (tile, tile, 3) tiles with tissue, spread evenly over all the
    tissue tiles of ``images``; CmdfedError when none has tissue."""
    found = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < tile or image.shape[1] < tile:
            continue
        for y in range(0, image.shape[0] - tile + 1, tile):
            for x in range(0, image.shape[1] - tile + 1, tile):
                piece = image[y : y + tile, x : x + tile]
                if tissue_mask(piece).mean() >= MIN_TISSUE:
                    found.append(piece)
    if not found:
        raise CmdfedError(
            f"the INT8 calibration set has no tissue: none of its {len(images)} image(s) has a {tile} px tile "
            f"that is at least {MIN_TISSUE:.0%} tissue (blank glass or background only); give RGB H&E images "
            f"with tissue, at least {tile} px a side, or export without the INT8 variant (--no-int8)"
        )
    picks = np.linspace(0, len(found) - 1, min(count, len(found))).round().astype(int)
    return np.stack([found[i] for i in picks])


def quantize(fp32_onnx: Path, out: Path, tiles: np.ndarray, to_input) -> None:
    """Write the QDQ INT8 model of ``fp32_onnx`` to ``out``, calibrated on ``tiles`` (uint8
    NHWC; ``to_input`` makes the graph's float input of them)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{"image": to_input(tiles[i : i + 1])} for i in range(len(tiles))])

        def get_next(self):
            return next(self._batches, None)

    try:
        quantize_static(
            str(fp32_onnx),
            str(out),
            Tiles(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTISED_OPS,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # MinMax keeps each tensor's min and max per tile (under 1 MB a tile), so all tiles are held at once;
            # CalibMaxIntermediateOutputs would drop the ranges of all but the last few tiles (onnxruntime 1.32).
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # onnxruntime's quantiser raises untyped errors
        raise CmdfedError(
            f"INT8 quantisation failed ({type(exc).__name__}: {str(exc)[:300]}); export with --no-int8"
        ) from exc


def dev_test_pq(
    run,
    *,
    tile: int,
    overlap: int,
    multiple: int,
    min_side: int,
    params: WatershedParams,
    mpp: float | None,
    stain_reference: HEStains | None = None,
) -> dict[str, float]:
    """PQ of each CPM-15 development test image (and their mean) segmented by ``run`` (a
    backend's ``run``) in windows of ``tile`` px, as the workstation segments a slide
    (stain-normalised to ``stain_reference`` when the model has one)."""
    scores = {}
    for image_id in cpm15.TEST_IDS:
        image, truth = cpm15.load_pair(image_id, mpp or QUALITY_MPP)
        image = normalised(image, stain_reference)
        maps = windowed_maps(run, image, window=tile, overlap=overlap, multiple=multiple, min_side=min_side, batch=8)
        instances = postprocess(maps["np"], maps["hv"], maps.get("nc"), params).instance_map
        scores[image_id] = float(evaluate_instances(truth, instances)["pq"])
    scores["mean"] = float(np.mean([scores[i] for i in cpm15.TEST_IDS]))
    return scores


def gate(
    golden_diff: float, tolerance: float, pq_fp32: dict, pq_variant: dict, max_pq_drop: float, variant: str = "int8"
) -> dict:
    """The manifest's record of a variant's gate (INT8 here, bf16 in :mod:`edge.openvino_cpu`):
    the numbers, passed or not, and why not."""
    drop = pq_fp32["mean"] - pq_variant["mean"]
    reasons = []
    if not golden_diff <= tolerance:
        reasons.append(f"golden outputs differ from PyTorch's by {golden_diff:.3g} (tolerance {tolerance:g})")
    if not drop <= max_pq_drop:
        reasons.append(f"PQ on the CPM-15 test images dropped by {drop:.4f} against fp32 (allowed {max_pq_drop:g})")
    return {
        "passed": not reasons,
        "reason": "; ".join(reasons) or None,
        "golden_max_abs_diff": golden_diff,
        "tolerance": tolerance,
        "pq_fp32": pq_fp32,
        f"pq_{variant}": pq_variant,
        "pq_drop": drop,
        "max_pq_drop": max_pq_drop,
        "quality_data": f"CPM-15 images {', '.join(cpm15.TEST_IDS)} (cmdfed.data.cpm15)",
    }
