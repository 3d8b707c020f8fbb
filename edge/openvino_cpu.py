"""The bundle's bf16 variant: its fp32 ONNX graph run by OpenVINO's CPU plugin in bfloat16.

Why: on a CPU that computes bf16 natively (AVX512-BF16, AMX) OpenVINO runs the convolutions in
bf16 with fp32 accumulation, which ONNX Runtime's CPU build does not. On this project's 2-core
EPYC it ran a 256 px tile of the released nuclei model in 48 ms against ONNX Runtime fp32's 56
ms, and a batch of 8 in 390 against 490 ms (``benchmarks/README.md``, edge_tile_throughput);
in fp32 OpenVINO was slower than ONNX Runtime, so only bf16 is offered.

The variant adds no file: it is the exported graph under another runtime and precision, so its
manifest record (``variants.bf16``) names ``model.onnx`` and the gate. The gate is made at
export, where the ``openvino`` package is installed and the CPU computes bf16, the same way as
the INT8 one (:mod:`edge.quantize`): golden outputs within ``BF16_TOLERANCE`` of PyTorch's
fp32, and PQ on the CPM-15 development test images at most ``max_pq_drop`` below fp32's. A
workstation without the package or without native bf16 runs ONNX Runtime and says why
(``edge.selection``).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from edge.backends import Backend, BackendUnavailable, BundleModel, DamagedBundle

VARIANT = "bf16"
# Max abs difference of probabilities/HV on the golden tiles: bf16 keeps 8 bits of mantissa
# (measured 0.02 for the released nuclei model, 0.0002 for a random one); PQ is the real check.
BF16_TOLERANCE = 0.1


def import_openvino():
    """The ``openvino`` module, imported with its usage telemetry off.

    ``import openvino`` sends a usage event to Google Analytics unless the user opted out
    (openvino-telemetry's consent file; sending is the default): a scanner workstation must not
    report to a third party, so its telemetry singleton is made, declined, before the import
    (as cmdfed switches Flower's telemetry off)."""
    import openvino_telemetry

    # Made as openvino's own import makes it (which then reuses it), with an empty tracking id and no consent.
    telemetry = openvino_telemetry.Telemetry(
        app_name="OpenVINO", app_version="", tid="", backend="ga4", enable_opt_in_dialog=True
    )
    telemetry.consent = False
    import openvino

    return openvino


def unavailable_reason() -> str | None:
    """Why this machine cannot run the bf16 variant, or None when it can."""
    try:
        openvino = import_openvino()
    except ImportError:
        return "the openvino package is not installed (install cmdfed with its openvino extra)"
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "this CPU does not compute bf16 natively (AVX512-BF16 or AMX)"
    return None


def compile_bf16(onnx_bytes: bytes, threads: int | None = None):
    """The ONNX graph compiled by OpenVINO for this CPU in bf16, latency-tuned on ``threads``."""
    openvino = import_openvino()
    core = openvino.Core()
    return core.compile_model(
        core.read_model(onnx_bytes, openvino.Tensor(np.empty(0, np.uint8))),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "bf16",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads or len(os.sched_getaffinity(0)),
        },
    )


class OpenVinoCpuBackend(Backend):
    name = "openvino-cpu"
    device = "cpu"
    precision = VARIANT

    def __init__(self, model: BundleModel, threads: int | None = None):
        super().__init__(model)
        gate = model.variant_gates().get(VARIANT)
        if gate is None:
            raise BackendUnavailable(
                "the bundle has no bf16 variant (export it where the openvino package is installed on a CPU "
                "with native bf16)"
            )
        if not gate["passed"]:
            raise BackendUnavailable(f"the bundle's bf16 variant failed its gate at export: {gate['reason']}")
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
        try:
            compiled = compile_bf16(model.read_verified(model.variant_onnx(VARIANT)), threads)
        except DamagedBundle:
            raise
        except Exception as exc:  # OpenVINO raises its own untyped errors
            raise BackendUnavailable(f"OpenVINO could not load the model ({str(exc)[:200]})") from exc
        self.request = compiled.create_infer_request()
        self.outputs = [compiled.output(name) for name in model.output_names]
        self.lock = threading.Lock()  # one infer request: calls from several threads take turns

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        with self.lock:
            result = self.request.infer({0: x})  # copies the outputs out of the request's buffers
        return [result[output] for output in self.outputs]
