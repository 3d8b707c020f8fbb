"""TensorRT backend: an engine built on this workstation for its own GPU, cached.

TensorRT engines are specific to a GPU model and a TensorRT version, so bundles carry the
portable graph (ONNX, and the torch.export program) and each workstation builds its own
engine the first time (at deploy), then reuses it.

Build (ONNX source, default): ``trt.OnnxParser`` into an explicit-batch network, one
optimisation profile with the manifest's min/opt/max input shapes, FP16 enabled, and
every normalisation layer (ONNX LayerNormalization -> INormalizationLayer) pinned to FP32
with ``PREFER_PRECISION_CONSTRAINTS``: LayerNorm's variance overflows or loses precision
in FP16, and "prefer" lets TensorRT fall back rather than fail if a tactic cannot honour
it. PT2 source: ``torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine``
on ``model.pt2`` with the same shapes and precision, which also yields plain engine bytes.

Cache: ``ENGINES/<key>/engine.plan`` + ``meta.json`` where key = sha256 of (ONNX sha256,
GPU name, compute capability, TensorRT version, precision, shape profile, source). The
plan is written atomically and ``meta.json`` after it, so a half-written engine is never
picked up. On load, meta must name this GPU and TensorRT version (an engine from another
GPU is never deserialised), deserialisation must succeed and the engine must pass the
golden-data check; otherwise it is deleted and rebuilt once.

Execution uses PyTorch CUDA tensors as device buffers (torch is already a dependency and
is the CUDA build on GPU sites): ``set_input_shape``, ``set_tensor_address`` per I/O
tensor, ``execute_async_v3`` on the current stream (TensorRT 10 API).

Not exercised in this repository's CI (no GPU there); see tests/edge/test_tensorrt.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from cmdfed.atomic import write_bytes_atomic, write_json_atomic
from edge.backends import Backend, BackendUnavailable, BundleModel

log = logging.getLogger("cmdfed.edge")

PRECISION = "fp16"
WORKSPACE_BYTES = 4 << 30


class TensorRTBackend(Backend):
    name = "tensorrt"
    precision = PRECISION

    def __init__(self, model: BundleModel, engines_dir: Path, source: str = "onnx"):
        super().__init__(model)
        self.trt, self.torch = _import_runtime()
        self.device = self.torch.cuda.get_device_name(0)
        self.source = source
        self.identity = {
            "model_sha256": model.onnx_sha256,
            "gpu": self.device,
            "compute_capability": list(self.torch.cuda.get_device_capability(0)),
            "tensorrt": self.trt.__version__,
            "precision": PRECISION,
            "profile": {k: model.input_spec[k] for k in ("min", "opt", "max")},
            "source": source,
        }
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()
        self.cache = engines_dir / key
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._load_or_build()

    # -- engine cache ------------------------------------------------------------------

    def _load_or_build(self) -> None:
        engine = self._load_cached()
        self.from_cache = engine is not None
        if engine is not None:
            self._bind(engine)
        else:
            self._rebuild()

    def validate(self) -> float:
        """The golden check; a cached engine that fails it is rebuilt once and checked again."""
        try:
            return super().validate()
        except BackendUnavailable as exc:
            if not self.from_cache:
                raise
            log.warning("cached TensorRT engine %s failed validation (%s); rebuilding", self.cache.name, exc)
        self.from_cache = False
        self._rebuild()
        return super().validate()

    def _rebuild(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        plan = self._build()
        write_bytes_atomic(self.cache / "engine.plan", plan)
        write_json_atomic(self.cache / "meta.json", {**self.identity, "plan_sha256": hashlib.sha256(plan).hexdigest()})
        engine = self._deserialize(plan)
        if engine is None:
            raise BackendUnavailable("TensorRT could not deserialise the engine it just built")
        self._bind(engine)

    def _load_cached(self):
        meta_path, plan_path = self.cache / "meta.json", self.cache / "engine.plan"
        if not (meta_path.is_file() and plan_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        plan = plan_path.read_bytes()
        same_machine = all(meta.get(k) == v for k, v in self.identity.items())
        if not same_machine or meta.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
            log.warning("TensorRT engine cache %s was built elsewhere or is damaged; rebuilding", self.cache.name)
            return None
        return self._deserialize(plan)

    def _deserialize(self, plan: bytes):
        runtime = self.trt.Runtime(self.logger)
        return runtime.deserialize_cuda_engine(plan)

    def _build(self) -> bytes:
        log.info(
            "building a TensorRT engine for %s from %s (minutes, once per GPU and model)", self.device, self.source
        )
        plan = self._build_from_pt2() if self.source == "pt2" else self._build_from_onnx()
        if not plan:
            raise BackendUnavailable("TensorRT failed to build an engine (see the TensorRT log above)")
        return bytes(plan)

    def _build_from_onnx(self):
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(self.model.read_verified(self.model.manifest["graph"]["onnx"])):  # the bytes checked
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT's ONNX parser rejected the model: {errors[:300]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        profile = builder.create_optimization_profile()
        spec = self.model.input_spec
        profile.set_shape(spec["name"], spec["min"], spec["opt"], spec["max"])
        config.add_optimization_profile(profile)
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                for output in range(layer.num_outputs):
                    layer.set_output_type(output, trt.float32)
        return builder.build_serialized_network(network, config)

    def _build_from_pt2(self):
        import torch_tensorrt

        torch = self.torch
        program = torch.export.load(io.BytesIO(self.model.read_verified(self.model.manifest["graph"]["pt2"])))
        program = torch.export.passes.move_to_device_pass(program, "cuda")
        spec = self.model.input_spec
        shape = torch_tensorrt.Input(
            min_shape=spec["min"], opt_shape=spec["opt"], max_shape=spec["max"], dtype=torch.float32
        )
        return torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=[shape], enabled_precisions={torch.float16}
        )

    # -- execution ---------------------------------------------------------------------

    def _bind(self, engine) -> None:
        trt = self.trt
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        # Engine outputs come in the graph's output order, which is the manifest's.
        self.engine_outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.engine_outputs) != len(self.model.output_names):
            raise BackendUnavailable(
                f"the engine has {len(self.engine_outputs)} outputs, the manifest {len(self.model.output_names)}"
            )

    def _infer(self, x: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        image = torch.from_numpy(x).to("cuda", non_blocking=True)
        self.context.set_input_shape(self.input_name, tuple(image.shape))
        self.context.set_tensor_address(self.input_name, image.data_ptr())
        outputs = []
        for name in self.engine_outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendUnavailable("TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        return [out.cpu().numpy() for out in outputs]


def _import_runtime():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"the tensorrt package is not installed (install cmdfed with its tensorrt extra): {exc}"
        ) from exc
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA GPU is visible to PyTorch (TensorRT needs one for its buffers)")
    return trt, torch
