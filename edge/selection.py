"""Choosing the runtime for a bundle: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU.

Selection: each candidate in order is created and immediately run on the bundle's golden
input; its outputs must match PyTorch's within the manifest's tolerance (fp32 backends:
``tolerance_fp32``; the FP16 TensorRT engine: ``tolerance_fp16``). The first that passes
is used. A candidate that is missing (no tensorrt module, no GPU, CPU-only onnxruntime)
or fails validation is skipped with its reason, and the reasons are logged and reported,
so a workstation silently falling back to the CPU is visible. ``force`` picks one backend
and makes its failure an error instead of a fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from cmdfed.errors import CmdfedError
from edge.backends import Backend, BackendUnavailable, BundleModel, DamagedBundle, OrtCpuBackend, OrtCudaBackend
from edge.tensorrt import TensorRTBackend

log = logging.getLogger("cmdfed.edge")

BACKEND_NAMES = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
TRT_SOURCES = ("onnx", "pt2")


@dataclass
class Selection:
    backend: Backend
    max_abs_diff: float
    skipped: dict[str, str] = field(default_factory=dict)

    def report(self) -> dict:
        return {
            "backend": self.backend.name,
            "device": self.backend.device,
            "precision": self.backend.precision,
            "golden_max_abs_diff": self.max_abs_diff,
            "skipped": self.skipped,
        }


def _create(
    name: str, model: BundleModel, home: Path, threads: int | None, trt_source: str, memory_arena: bool
) -> Backend:
    if name == "tensorrt":
        return TensorRTBackend(model, home / "engines", source=trt_source)
    if name == "onnxruntime-cuda":
        return OrtCudaBackend(model, threads, memory_arena)
    return OrtCpuBackend(model, threads, memory_arena)


def select_backend(
    bundle_folder: str | Path,
    home: str | Path,
    *,
    force: str | None = None,
    threads: int | None = None,
    trt_source: str = "onnx",
    memory_arena: bool = True,
) -> Selection:
    """The first backend, in BACKEND_NAMES order (or ``force``), that loads and passes validation.

    ``trt_source``: build TensorRT engines from the ONNX graph ("onnx") or model.pt2 ("pt2").
    ``memory_arena``: False gives ONNX Runtime's host memory back after each run (slower on CPU,
    ~20% at batch 8, but its memory no longer stays at its largest run's or grows with the input
    shapes it has seen; the edge service, which budgets its memory, turns it off).
    """
    if force is not None and force not in BACKEND_NAMES:
        raise CmdfedError(f"unknown backend {force!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if trt_source not in TRT_SOURCES:
        raise CmdfedError(f"unknown TensorRT engine source {trt_source!r}; choose one of {', '.join(TRT_SOURCES)}")
    model = BundleModel.load(bundle_folder, home)  # a damaged bundle is refused here, not fallen back from
    skipped: dict[str, str] = {}
    for name in [force] if force else BACKEND_NAMES:
        try:
            backend = _create(name, model, Path(home), threads, trt_source, memory_arena)
            diff = backend.validate()
        except DamagedBundle:
            raise  # the bundle itself is damaged: no other backend would run a sound model
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
            log.info("backend %s skipped: %s", name, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a broken GPU stack must not stop the fallback
            # (missing torch_tensorrt, CUDA OOM, cuDNN); the failure is recorded in skipped and logged
            skipped[name] = f"failed while loading or validating ({type(exc).__name__}: {exc})"
            log.warning("backend %s failed, trying the next one: %s", name, skipped[name])
            continue
        log.info("backend %s selected (golden max abs diff %.3g)", name, diff)
        return Selection(backend, diff, skipped)
    if force:
        raise CmdfedError(
            f"backend {force} cannot be used here: {skipped[force]}; omit --backend to fall back automatically"
        )
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise CmdfedError(f"no backend can run this model here ({reasons})")
