"""Runtimes for a bundle: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU.

Every backend takes the same batch (uint8 RGB (B, H, W, 3) as read from a slide, or float32
(B, 3, H, W) already normalised) and returns ``{"np", "hv", "nc"}`` as float32 numpy
arrays; batches above the graph's maximum are split. Sides must be multiples of 32 within
the manifest's min..max shapes.

Selection: each candidate in order is created and immediately run on the bundle's golden
input; its outputs must match PyTorch's within the manifest's tolerance (fp32 backends:
``tolerance_fp32``; the FP16 TensorRT engine: ``tolerance_fp16``). The first that passes
is used. A candidate that is missing (no tensorrt module, no GPU, CPU-only onnxruntime)
or fails validation is skipped with its reason, and the reasons are logged and reported,
so a workstation silently falling back to the CPU is visible. ``force`` picks one backend
and makes its failure an error instead of a fallback.
"""

from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmdfed.errors import CmdfedError
from edge import bundle

log = logging.getLogger("cmdfed.edge")

BACKEND_NAMES = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
TRT_SOURCES = ("onnx", "pt2")


class BackendUnavailable(Exception):
    """This backend cannot run here; the message says why (shown when it is skipped)."""


@dataclass(frozen=True)
class BundleModel:
    """What a backend needs from an installed bundle."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, folder: str | Path) -> "BundleModel":
        folder = Path(folder)
        return cls(folder, bundle.parse_manifest((folder / bundle.MANIFEST).read_bytes(), str(folder)))

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest["graph"]["onnx"]

    @property
    def pt2_path(self) -> Path:
        return self.path / self.manifest["graph"]["pt2"]

    @property
    def onnx_sha256(self) -> str:
        return self.manifest["files"][self.manifest["graph"]["onnx"]]["sha256"]

    @property
    def input_spec(self) -> dict:
        return self.manifest["graph"]["inputs"][0]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["graph"]["outputs"]]

    def golden(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with np.load(self.path / self.manifest["validation"]["golden"]) as data:
            return data["input"], {name: data[f"output_{name}"] for name in self.output_names}


def model_input(batch: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], as ``cmdfed.inference.to_model_input``."""
    if batch.dtype == np.uint8 and batch.ndim == 4 and batch.shape[-1] == 3:
        x = batch.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 3:
        return np.ascontiguousarray(batch)
    raise CmdfedError(f"a batch must be uint8 (B, H, W, 3) or float32 (B, 3, H, W), got {batch.dtype} {batch.shape}")


class Backend(abc.ABC):
    name: str
    device: str
    precision: str = "fp32"

    def __init__(self, model: BundleModel):
        self.model = model
        spec = model.input_spec
        self.min_shape, self.max_shape = spec["min"], spec["max"]
        self.multiple = model.manifest["graph"]["side_multiple_of"]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = model_input(batch)
        self._check_shape(x.shape)
        max_batch = self.max_shape[0]
        parts = [self._infer(x[i : i + max_batch]) for i in range(0, len(x), max_batch)]
        return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(self.model.output_names)}

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        _, _, height, width = shape
        low, high = self.min_shape[2], self.max_shape[2]
        for side in (height, width):
            if side % self.multiple or not low <= side <= high:
                raise CmdfedError(
                    f"input sides must be multiples of {self.multiple} in {low}..{high}, got {height}x{width}"
                )

    @abc.abstractmethod
    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs in manifest order for float32 NCHW input within the shape limits."""

    def tolerance(self) -> float:
        validation = self.model.manifest["validation"]
        return validation["tolerance_fp16"] if self.precision == "fp16" else validation["tolerance_fp32"]

    def validate(self) -> float:
        """Largest difference from PyTorch on the golden data; BackendUnavailable beyond tolerance."""
        images, expected = self.model.golden()
        actual = self.run(images)
        diff = max(float(np.abs(actual[k] - expected[k]).max()) for k in expected)
        if not diff <= self.tolerance():
            raise BackendUnavailable(
                f"outputs differ from PyTorch's golden outputs by {diff:.3g} (tolerance {self.tolerance():g})"
            )
        return diff


class OnnxRuntimeBackend(Backend):
    provider: str

    def __init__(self, model: BundleModel, threads: int | None = None, memory_arena: bool = True):
        super().__init__(model)
        import onnxruntime

        if self.provider not in onnxruntime.get_available_providers():
            raise BackendUnavailable(self._missing_reason())
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3  # errors only; fallbacks are reported by us
        # The CPU arena keeps the largest run's memory, and grows again with each new input shape.
        options.enable_cpu_mem_arena = memory_arena
        try:
            self.session = onnxruntime.InferenceSession(
                str(model.onnx_path), sess_options=options, providers=self._providers()
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendUnavailable(f"ONNX Runtime could not load the model ({str(exc)[:200]})") from exc
        if self.session.get_providers()[0] != self.provider:
            raise BackendUnavailable(f"{self.provider} did not initialise (CUDA/cuDNN libraries or driver missing?)")
        self.input_name = self.session.get_inputs()[0].name

    def _providers(self) -> list:
        return [self.provider]

    def _missing_reason(self) -> str:
        return f"onnxruntime has no {self.provider}"

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.model.output_names, {self.input_name: x})


class OrtCpuBackend(OnnxRuntimeBackend):
    name = "onnxruntime-cpu"
    device = "cpu"
    provider = "CPUExecutionProvider"


class OrtCudaBackend(OnnxRuntimeBackend):
    name = "onnxruntime-cuda"
    device = "cuda:0"
    provider = "CUDAExecutionProvider"

    def _providers(self) -> list:
        return [(self.provider, {"device_id": 0})]

    def _missing_reason(self) -> str:
        return "onnxruntime has no CUDAExecutionProvider (this is the CPU build; install onnxruntime-gpu on a GPU workstation)"


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


def _create(name: str, model: BundleModel, home: Path, threads: int | None, trt_source: str, memory_arena: bool) -> Backend:
    if name == "tensorrt":
        from edge.tensorrt import TensorRTBackend

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
    model = BundleModel.load(bundle_folder)
    skipped: dict[str, str] = {}
    for name in [force] if force else BACKEND_NAMES:
        try:
            backend = _create(name, model, Path(home), threads, trt_source, memory_arena)
            diff = backend.validate()
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
            log.info("backend %s skipped: %s", name, exc)
            continue
        except Exception as exc:  # a broken GPU stack (missing torch_tensorrt, CUDA OOM, cuDNN) must not stop the fallback
            skipped[name] = f"failed while loading or validating ({type(exc).__name__}: {exc})"
            log.warning("backend %s failed, trying the next one: %s", name, skipped[name])
            continue
        log.info("backend %s selected (golden max abs diff %.3g)", name, diff)
        return Selection(backend, diff, skipped)
    if force:
        raise CmdfedError(f"backend {force} cannot be used here: {skipped[force]}; omit --backend to fall back automatically")
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise CmdfedError(f"no backend can run this model here ({reasons})")
