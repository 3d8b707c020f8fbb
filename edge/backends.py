"""Runtimes for a bundle: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU (and OpenVINO's
bf16 variant, :mod:`edge.openvino_cpu`).

Every backend takes the same batch (uint8 RGB (B, H, W, 3) as read from a slide, or float32
(B, 3, H, W) already normalised) and returns ``{"np", "hv", "nc"}`` as float32 numpy
arrays; batches above the graph's maximum are split. Sides must be multiples of 32 within
the manifest's min..max shapes.

Which one a workstation uses is chosen by :mod:`edge.selection`.

Loading: every time a bundle is loaded (deploy, ``edge infer``, ``edge serve``) its files are
checked against the manifest's sha256, and the ONNX graph is handed to the runtime as the very
bytes that were hashed; a damaged bundle is refused (``DamagedBundle``, with ``edge status``
and redeploy/rollback advice), never run and never fallen back from.
"""

from __future__ import annotations

import abc
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdfed.errors import CmdfedError
from edge import bundle


class BackendUnavailable(Exception):
    """This backend cannot run here; the message says why (shown when it is skipped)."""


class DamagedBundle(CmdfedError):
    """An installed bundle's files no longer match its manifest: refused, never fallen back from."""


@dataclass(frozen=True)
class BundleModel:
    """What a backend needs from an installed bundle."""

    path: Path
    manifest: dict
    home: Path | None = None

    @classmethod
    def load(cls, folder: str | Path, home: str | Path | None = None) -> BundleModel:
        """The installed bundle in ``folder``, its files checked against the manifest's checksums
        (every load: a bit flipped on disk must not run); ``home`` names the edge home in the
        refusal's advice."""
        folder = Path(folder)
        try:
            manifest = bundle.verify_bundle(bundle.BundleSource(folder))
        except CmdfedError as exc:
            raise DamagedBundle(f"the installed model is damaged: {exc}; {_repair_advice(folder, home)}") from exc
        return cls(folder, manifest, Path(home) if home is not None else None)

    def read_verified(self, name: str) -> bytes:
        """The bytes of ``name`` after checking them against the manifest: what is checked is what
        is loaded, even if the file changes after :meth:`load`."""
        data = (self.path / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][name]["sha256"]:
            raise DamagedBundle(
                f"the installed model is damaged: {self.path / name} does not match its checksum in the manifest; "
                f"{_repair_advice(self.path, self.home)}"
            )
        return data

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

    def variant_onnx(self, variant: str) -> str:
        """The bundle file of a graph variant: ``fp32`` (the exported graph) or one listed under
        the manifest's ``variants`` (``int8``)."""
        if variant == "fp32":
            return self.manifest["graph"]["onnx"]
        return self.manifest["variants"][variant]["onnx"]

    def variant_runtime(self, variant: str) -> str:
        """``onnxruntime`` (fp32, int8) or ``openvino`` (bf16), as the manifest records it."""
        return self.manifest.get("variants", {}).get(variant, {}).get("runtime", "onnxruntime")

    def variant_gates(self) -> dict[str, dict]:
        """The export's gate record of every variant beside fp32 (older bundles have none)."""
        return {name: record["gate"] for name, record in self.manifest.get("variants", {}).items()}

    def golden(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with np.load(self.path / self.manifest["validation"]["golden"]) as data:
            return data["input"], {name: data[f"output_{name}"] for name in self.output_names}


def _repair_advice(folder: Path, home) -> str:
    home = Path(home) if home is not None else folder.parent.parent
    return (
        f"refusing to run it. See `cmdfed edge status --home {home}`, then redeploy the bundle "
        f"(`cmdfed edge deploy BUNDLE --home {home}`) or `cmdfed edge rollback --home {home}`"
    )


def model_input(batch: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], as ``cmdfed.inference.segment.to_model_input``."""
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
        gates = self.model.variant_gates()
        if self.precision in gates:  # a gated variant (int8, bf16) is held to its gate's tolerance
            return gates[self.precision]["tolerance"]
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

    def __init__(
        self, model: BundleModel, threads: int | None = None, memory_arena: bool = True, variant: str = "fp32"
    ):
        """``variant``: which of the bundle's graphs to run, ``fp32`` or a gated one such as ``int8``.

        ``memory_arena``: ONNX Runtime's CPU arena makes a run's many intermediate allocations
        cheap (without it every run page-faults its ~100 MB of activations in afresh: a tile took
        1.3-1.7x as long here) but keeps the memory of the largest run it has seen and grows with
        each new input shape. True keeps it between runs. False gives its memory back after every
        run (the arena is shrunk) except a run of one model window, the shape of a one-tile
        request, which stays warm: what it keeps between runs is then at most one such run's."""
        super().__init__(model)
        import onnxruntime

        if self.provider not in onnxruntime.get_available_providers():
            raise BackendUnavailable(self._missing_reason())
        self.precision = variant
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.log_severity_level = 3  # errors only; fallbacks are reported by us
        options.enable_cpu_mem_arena = True
        self.keeps_memory = memory_arena
        window = model.manifest["preprocessing"]["tile_size"]
        self.warm_shape = (1, 3, window, window)  # the model input of a one-tile request
        self.shrink_after = onnxruntime.RunOptions()
        self.shrink_after.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        try:
            self.session = onnxruntime.InferenceSession(
                model.read_verified(model.variant_onnx(variant)), sess_options=options, providers=self._providers()
            )
        except DamagedBundle:
            raise
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendUnavailable(f"ONNX Runtime could not load the {variant} model ({str(exc)[:200]})") from exc
        if self.session.get_providers()[0] != self.provider:
            raise BackendUnavailable(f"{self.provider} did not initialise (CUDA/cuDNN libraries or driver missing?)")
        self.input_name = self.session.get_inputs()[0].name

    def _providers(self) -> list:
        return [self.provider]

    def _missing_reason(self) -> str:
        return f"onnxruntime has no {self.provider}"

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        keep = self.keeps_memory or x.shape == self.warm_shape
        return self.session.run(self.model.output_names, {self.input_name: x}, None if keep else self.shrink_after)


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
        return (
            "onnxruntime has no CUDAExecutionProvider (this is the CPU build; install onnxruntime-gpu on a GPU "
            "workstation)"
        )
