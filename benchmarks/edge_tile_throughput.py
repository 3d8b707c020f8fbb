"""Edge tile throughput: tiles/s and per-call latency of the deployed model on 256 px tiles at
batch 1 and 8, on every backend this machine has, in one run.

Backends: PyTorch eager (the bundle's ``model.pt2`` torch.export program run op by op, fp32,
on the CPU and, when there is one, the GPU); the CPU's graphs (``--threads`` intra-op threads,
as the workstation runs them) once per graph the bundle carries that passed its gate: ONNX
Runtime fp32 and ``int8``, OpenVINO ``bf16`` (``precision`` says which; the workstation runs
the fastest, ``edge.selection``); and, when present, ONNX Runtime CUDA and TensorRT
(edge/backends.py; each must pass the bundle's golden-data check first, as at deploy). OpenVINO
fp32 on the same graph, where the ``openvino`` package is installed, is measured as a comparison
only (it is not a backend: it was slower than ONNX Runtime fp32 here). Every call takes a uint8
(B, 256, 256, 3) batch and returns float32 numpy maps, as slide inference uses it, so GPU
timings include the copies both ways. ``x PyTorch eager`` is a backend's tiles/s over PyTorch
eager's on the same device (the CPU for the CPU's graphs, the GPU for the rest).

    python -m benchmarks.edge_tile_throughput [--home DIR | --preset base] [--iterations 30] [--threads N]
    python -m benchmarks.edge_tile_throughput --quick   # tiny random model, a few calls, prints only
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import edge_home
from benchmarks.common import save_or_print
from cmdfed.data.synth import synth_tiles
from cmdfed.errors import CmdfedError
from cmdfed.inference.segment import to_model_input
from edge.backends import BackendUnavailable, BundleModel, OrtCpuBackend, model_input
from edge.bundle import PT2_FILE
from edge.deploy import active_bundle
from edge.openvino_cpu import OpenVinoCpuBackend, import_openvino
from edge.selection import select_backend

BATCHES = (1, 8)
SIDE = 256


def pytorch_eager(bundle: Path, device: str):
    """A call running the bundle's exported program op by op on ``device``."""
    module = torch.export.load(str(bundle / PT2_FILE)).module().to(device)

    def run(images: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [o.cpu().numpy() for o in module(to_model_input(images).to(device))]

    return run


def openvino_fp32(model: BundleModel, threads: int):
    """A call running the bundle's fp32 ONNX graph in OpenVINO in fp32, latency-tuned on ``threads``."""
    openvino = import_openvino()
    core = openvino.Core()
    compiled = core.compile_model(
        core.read_model(str(model.onnx_path)),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads},
    )
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in model.output_names]

    def run(images: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: model_input(images)})
        return [result[output] for output in outputs]

    return run


def measure(run, images: np.ndarray, warmup: int, iterations: int) -> dict:
    for _ in range(warmup):
        run(images)
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        run(images)
        seconds.append(time.perf_counter() - start)
    p50, p95 = np.percentile(np.array(seconds) * 1e3, [50, 95])
    return {"tiles/s": len(images) * iterations / sum(seconds), "p50 ms": float(p50), "p95 ms": float(p95)}


def candidates(bundle: Path, home: Path, threads: int) -> tuple[list[tuple[str, str, str, object]], dict[str, str]]:
    """(name, device, precision, call) of every runtime that works here, and why the others do not."""
    found, skipped = [("pytorch-eager", "cpu", "fp32", pytorch_eager(bundle, "cpu"))], {}
    if torch.cuda.is_available():
        found.append(("pytorch-eager", "cuda", "fp32", pytorch_eager(bundle, "cuda")))
    else:
        skipped["pytorch-eager cuda"] = "no CUDA GPU"
    model = BundleModel.load(bundle, home)
    gates = model.variant_gates()
    for variant in ["fp32", *gates]:
        if variant != "fp32" and not gates[variant]["passed"]:
            skipped[f"{variant} variant"] = f"failed its gate at export: {gates[variant]['reason']}"
            continue
        try:
            backend = (
                OpenVinoCpuBackend(model, threads)
                if model.variant_runtime(variant) == "openvino"
                else OrtCpuBackend(model, threads, variant=variant)
            )
        except BackendUnavailable as exc:
            skipped[f"{variant} variant"] = str(exc)
            continue
        backend.validate()
        found.append((backend.name, "cpu", variant, backend.run))
    try:
        found.append(("openvino-cpu (comparison)", "cpu", "fp32", openvino_fp32(model, threads)))
    except ImportError:
        skipped["openvino-cpu fp32"] = "the openvino package is not installed (pip install 'cmdfed[openvino]')"
    for name in ("onnxruntime-cuda", "tensorrt"):
        try:
            backend = select_backend(bundle, home, force=name, threads=threads).backend
        except CmdfedError as exc:
            skipped[name] = str(exc)
            continue
        device = "cpu" if backend.device == "cpu" else "cuda"
        found.append((name, device, backend.precision, backend.run))
    return found, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    edge_home.add_options(parser)
    parser.add_argument("--iterations", type=int, default=30, help="timed calls per backend and batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads (PyTorch and ONNX Runtime)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model, 3 calls each; prints, saves nothing")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cmdfed-bench-"))
    try:
        home = edge_home.edge_home(args, work)
        bundle = active_bundle(home)
        tiles = np.stack([t.image for t in synth_tiles(max(BATCHES), tile_size=SIDE, seed=0)])
        found, skipped = candidates(bundle, home, args.threads)
        rows = []
        for name, device, precision, run in found:
            for batch in BATCHES:
                m = measure(run, tiles[:batch], args.warmup, args.iterations)
                rows.append(
                    {
                        "backend": name,
                        "device": device,
                        "precision": precision,
                        "batch": batch,
                        "tiles/s": round(m["tiles/s"], 2),
                        "p50 ms": round(m["p50 ms"], 1),
                        "p95 ms": round(m["p95 ms"], 1),
                    }
                )
        eager = {(r["device"], r["batch"]): r["tiles/s"] for r in rows if r["backend"] == "pytorch-eager"}
        for row in rows:
            reference = eager.get((row["device"], row["batch"]))
            row["x PyTorch eager"] = round(row["tiles/s"] / reference, 2) if reference else None
        notes = (
            f"{edge_home.describe(home)}; {SIDE} px uint8 tiles in, float32 maps out; median and 95th percentile of "
            f"{args.iterations} calls after {args.warmup} warm-up; {args.threads} CPU threads; "
            f"not run here: {'; '.join(f'{k} ({v})' for k, v in skipped.items()) or 'none'}"
        )
        save_or_print("edge_tile_throughput", rows, notes, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
