"""Choosing the runtime for a bundle: TensorRT -> ONNX Runtime CUDA -> the CPU.

Selection: each candidate in order is created and immediately run on the bundle's golden
input; its outputs must match PyTorch's within the manifest's tolerance (fp32 backends:
``tolerance_fp32``; the FP16 TensorRT engine: ``tolerance_fp16``). The first that passes
is used. A candidate that is missing (no tensorrt module, no GPU, CPU-only onnxruntime)
or fails validation is skipped with its reason, and the reasons are logged and reported,
so a workstation silently falling back to the CPU is visible. ``force`` picks one backend
and makes its failure an error instead of a fallback.

Variants (the CPU): a bundle may carry, beside the fp32 graph, variants that passed a gate at
export (``int8`` run by ONNX Runtime, see :mod:`edge.quantize`; ``bf16`` run by OpenVINO, see
:mod:`edge.openvino_cpu`; the gate's record is in the manifest).
Each variant whose gate passed is loaded and checked on the golden data like fp32 (within its
own tolerance), then timed on the golden tiles (VARIANT_TIMING_RUNS calls each, taking turns,
the fastest counts: the same graph is faster or slower depending on the CPU's instructions); the fastest
is used and the others are released. A variant that failed its gate, here or at export, or
whose runtime this machine lacks, is not used, and why is logged and reported (``variants`` in
the selection's report), so a workstation running fp32 instead of INT8 says so. ``--backend
onnxruntime-cpu`` keeps to ONNX Runtime's graphs; ``--backend openvino-cpu`` runs the bf16
variant or fails.

The choice is kept in the home (CHOICE_FILE) with what it depends on: the bundle's files, this
CPU, the threads, the runtimes and their versions. A later job on the same home whose key
matches loads only the chosen variant and checks it on the golden data, without loading and
timing the others (about 3 s of every slide job on a 2-core workstation); any change of key,
or a chosen variant that no longer passes, times them all again. ``deploy`` always times
afresh, as does ``retime=True`` (``--retime-variants``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cmdfed.atomic import write_json_atomic
from cmdfed.errors import CmdfedError
from edge.backends import Backend, BackendUnavailable, BundleModel, DamagedBundle, OrtCpuBackend, OrtCudaBackend
from edge.openvino_cpu import OpenVinoCpuBackend
from edge.tensorrt import TensorRTBackend

log = logging.getLogger("cmdfed.edge")

BACKEND_NAMES = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "openvino-cpu")
TRT_SOURCES = ("onnx", "pt2")
VARIANT_TIMING_RUNS = 5
CHOICE_FILE = "cpu_graph_choice.json"
KEPT_CHOICES = 8


@dataclass
class Selection:
    backend: Backend
    max_abs_diff: float
    skipped: dict[str, str] = field(default_factory=dict)
    variants: dict[str, dict] = field(default_factory=dict)
    variants_timed_at: str | None = None  # when the CPU graphs were timed; earlier than now: the choice was reused

    def report(self) -> dict:
        return {
            "backend": self.backend.name,
            "device": self.backend.device,
            "precision": self.backend.precision,
            "golden_max_abs_diff": self.max_abs_diff,
            "skipped": self.skipped,
            "variants": self.variants,
            "variants_timed_at": self.variants_timed_at,
        }


def _create(
    name: str, model: BundleModel, home: Path, threads: int | None, trt_source: str, memory_arena: bool
) -> Backend:
    if name == "tensorrt":
        return TensorRTBackend(model, home / "engines", source=trt_source)
    if name == "onnxruntime-cuda":
        return OrtCudaBackend(model, threads, memory_arena)
    if name == "openvino-cpu":
        return OpenVinoCpuBackend(model, threads)
    return OrtCpuBackend(model, threads, memory_arena)


def _fastest_variant(
    fp32: Backend,
    fp32_diff: float,
    model: BundleModel,
    home: Path,
    threads: int | None,
    memory_arena: bool,
    runtimes: set[str],
    quiet: Callable[[], object],
) -> tuple[Backend, float, dict[str, dict], str | None]:
    """The fastest of the fp32 ONNX Runtime CPU backend and the bundle's gated variants (of
    ``runtimes``) that pass the golden check here, its golden difference, what happened to each
    variant, and when they were timed (now, once ``quiet()`` has returned; None when no variant
    passed beside fp32, so there was nothing to time); the choice is kept in ``home`` for later jobs."""
    images, _ = model.golden()
    passed = {"fp32": (fp32, fp32_diff)}
    record: dict[str, dict] = {"fp32": {"golden_max_abs_diff": fp32_diff}}
    for variant, gate in model.variant_gates().items():
        runtime = model.variant_runtime(variant)
        if runtime not in runtimes:
            record[variant] = {"used": False, "reason": f"--backend onnxruntime-cpu leaves out {runtime}'s variants"}
            continue
        if not gate["passed"]:
            record[variant] = {"used": False, "reason": f"failed its gate at export: {gate['reason']}"}
            log.warning("%s variant not used (it failed its gate at export: %s)", variant, gate["reason"])
            continue
        try:
            backend = _create_variant(variant, model, threads, memory_arena)
        except DamagedBundle:
            raise
        except Exception as exc:  # noqa: BLE001 - a runtime this machine lacks (no openvino, no bf16) leaves fp32
            record[variant] = {"used": False, "reason": f"cannot run here: {exc}"}
            log.warning("%s variant not used (it cannot run here: %s)", variant, exc)
            continue
        try:
            passed[variant] = (backend, backend.validate())
        except Exception as exc:  # noqa: BLE001 - a variant that fails the golden check here (an op this CPU lacks) leaves fp32
            record[variant] = {"used": False, "reason": f"failed its golden check here: {exc}"}
            log.warning("%s variant not used (it failed its golden check here: %s)", variant, exc)
            continue
        record[variant] = {"golden_max_abs_diff": passed[variant][1]}
    if len(passed) == 1:
        record["fp32"]["used"] = True
        log.info("the CPU runs the fp32 graph (no other variant passed)")
        return fp32, fp32_diff, record, None  # nothing was timed, so no choice is kept
    quiet()  # the caller's own work done: the graphs are timed alone, not against it
    for variant, ms in _ms_per_tile({v: backend for v, (backend, _) in passed.items()}, images).items():
        record[variant]["ms_per_tile"] = ms
    chosen = min(passed, key=lambda v: record[v]["ms_per_tile"])
    for variant in passed:
        record[variant]["used"] = variant == chosen
    log.info(
        "the CPU runs the %s graph (%s)",
        chosen,
        ", ".join(f"{v}: {record[v]['ms_per_tile']:.1f} ms/tile" for v in passed),
    )
    timed_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    key = _choice_key(model, threads, memory_arena, runtimes)
    _keep_choice(home, {"key": key, "chosen": chosen, "timed_at": timed_at, "variants": record})
    return passed[chosen][0], passed[chosen][1], record, timed_at


def _create_variant(variant: str, model: BundleModel, threads: int | None, memory_arena: bool) -> Backend:
    if variant == "fp32":
        return OrtCpuBackend(model, threads, memory_arena)
    if model.variant_runtime(variant) == "openvino":
        return OpenVinoCpuBackend(model, threads)
    return OrtCpuBackend(model, threads, memory_arena, variant=variant)


def _kept_choice(model: BundleModel, home: Path, threads, memory_arena: bool, runtimes: set[str]):
    """The graph an earlier job chose with the same key, loaded and checked on the golden data
    now, its golden difference, that job's record and when it timed them; None (time them all
    again) when none is kept or it no longer loads or passes here."""
    earlier = _earlier_choice(home, _choice_key(model, threads, memory_arena, runtimes))
    if earlier is None:
        return None
    chosen, timed_at = earlier["chosen"], earlier["timed_at"]
    gate = model.variant_gates().get(chosen)
    if chosen != "fp32" and not (gate and gate["passed"]):
        log.warning("the kept choice names %s, a graph this bundle has not gated; timing the graphs again", chosen)
        return None
    try:
        backend = _create_variant(chosen, model, threads, memory_arena)
        diff = backend.validate()
    except DamagedBundle:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever changed, a fresh timing decides again
        log.warning("the %s graph chosen on %s fails here now (%s); timing the graphs again", chosen, timed_at, exc)
        return None
    record = {variant: dict(entry) for variant, entry in earlier["variants"].items()}
    record[chosen]["golden_max_abs_diff"] = diff
    log.info("the CPU runs the %s graph (chosen when timed on %s)", chosen, timed_at)
    return backend, diff, record, timed_at


def kept_choices(home: str | Path, manifest: dict) -> list[dict]:
    """The CPU-graph choices kept in ``home`` for the bundle of ``manifest`` (``edge status``):
    the graph each chose, when, and with which threads and runtimes."""
    bundle = _bundle_key(manifest)
    return [
        {
            "chosen": choice["chosen"],
            "for": "infer" if choice["key"].get("memory_arena", True) else "serve",  # serve runs without the arena
            "timed_at": choice["timed_at"],
            "threads": choice["key"].get("threads"),
            "runtimes": choice["key"].get("runtimes"),
            "ms_per_tile": {v: r["ms_per_tile"] for v, r in choice["variants"].items() if "ms_per_tile" in r},
        }
        for choice in _kept_choices(Path(home))
        if choice["key"].get("bundle") == bundle
    ]


def _bundle_key(manifest: dict) -> str:
    files = json.dumps({name: entry["sha256"] for name, entry in manifest["files"].items()}, sort_keys=True)
    return hashlib.sha256(files.encode()).hexdigest()


def _choice_key(model: BundleModel, threads: int | None, memory_arena: bool, runtimes: set[str]) -> dict:
    """What the fastest graph depends on: the bundle's files, this CPU, its threads and the runtimes."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {
        "bundle": _bundle_key(model.manifest),
        "cpu": _cpu_name(),
        "threads": threads or len(os.sched_getaffinity(0)),
        "memory_arena": memory_arena,
        "runtimes": {runtime: installed(runtime) for runtime in sorted(runtimes)},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _earlier_choice(home: Path, key: dict) -> dict | None:
    return next((choice for choice in _kept_choices(home) if choice.get("key") == key), None)


def _kept_choices(home: Path) -> list[dict]:
    try:
        kept = json.loads((home / CHOICE_FILE).read_text()).get("choices", [])
    except (OSError, ValueError, AttributeError):
        return []  # none kept yet, or unreadable: the graphs are timed again and the file rewritten
    return [
        choice
        for choice in kept
        if isinstance(choice, dict) and {"key", "chosen", "timed_at", "variants"} <= set(choice)
    ]


def _keep_choice(home: Path, choice: dict) -> None:
    """Kept beside the choices for other keys (the service's and ``infer``'s settings differ),
    the most recent KEPT_CHOICES."""
    others = [kept for kept in _kept_choices(home) if kept["key"] != choice["key"]]
    try:
        write_json_atomic(home / CHOICE_FILE, {"choices": [*others, choice][-KEPT_CHOICES:]})
    except OSError as exc:  # a read-only home still runs; the next job times the graphs again
        log.warning(
            "could not keep the CPU graph choice in %s (%s); the next job will time the graphs again", home, exc
        )


def _ms_per_tile(backends: dict[str, Backend], images) -> dict[str, float]:
    """Each backend's fastest of a few calls on the golden tiles, in milliseconds per tile. The
    calls take turns (one of each per round), so other work on the machine slows them alike;
    they follow the validation runs, so the sessions are warm."""
    best = dict.fromkeys(backends, float("inf"))
    for _ in range(VARIANT_TIMING_RUNS):
        for variant, backend in backends.items():
            start = time.perf_counter()
            backend.run(images)
            best[variant] = min(best[variant], time.perf_counter() - start)
    return {variant: seconds * 1e3 / len(images) for variant, seconds in best.items()}


def select_backend(
    bundle_folder: str | Path,
    home: str | Path,
    *,
    force: str | None = None,
    threads: int | None = None,
    trt_source: str = "onnx",
    memory_arena: bool = True,
    retime: bool = False,
    quiet: Callable[[], object] = lambda: None,
) -> Selection:
    """The first backend, in BACKEND_NAMES order (or ``force``), that loads and passes validation.

    ``trt_source``: build TensorRT engines from the ONNX graph ("onnx") or model.pt2 ("pt2").
    ``memory_arena``: False gives ONNX Runtime's host memory back after each run but one of a
    single model window, which stays warm (``OnnxRuntimeBackend``): its memory no longer stays
    at its largest run's or grows with the input shapes it has seen; the edge service, which
    budgets its memory, sets it. ``retime``: time the CPU graphs again even if this home
    keeps a choice made with the same key (module docstring). ``quiet``: called before the CPU
    graphs are timed, and returns once the caller's concurrent work is done (``edge.infer``
    selects while it finds a slide's tissue), so that a kept choice is not skewed by it.
    """
    if force is not None and force not in BACKEND_NAMES:
        raise CmdfedError(f"unknown backend {force!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if trt_source not in TRT_SOURCES:
        raise CmdfedError(f"unknown TensorRT engine source {trt_source!r}; choose one of {', '.join(TRT_SOURCES)}")
    model = BundleModel.load(bundle_folder, home)  # a damaged bundle is refused here, not fallen back from
    skipped: dict[str, str] = {}
    for name in [force] if force else BACKEND_NAMES:
        runtimes = {"onnxruntime"} if force else {"onnxruntime", "openvino"}
        if name == "onnxruntime-cpu" and not retime:
            kept = _kept_choice(model, Path(home), threads, memory_arena, runtimes)
            if kept is not None:
                backend, diff, variants, timed_at = kept
                log.info("backend %s selected, %s graph (golden max abs diff %.3g)", name, backend.precision, diff)
                return Selection(backend, diff, skipped, variants, timed_at)
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
        variants: dict[str, dict] = {}
        timed_at = None
        if name == "onnxruntime-cpu":
            backend, diff, variants, timed_at = _fastest_variant(
                backend, diff, model, Path(home), threads, memory_arena, runtimes, quiet
            )
        log.info("backend %s selected, %s graph (golden max abs diff %.3g)", backend.name, backend.precision, diff)
        return Selection(backend, diff, skipped, variants, timed_at)
    if force:
        raise CmdfedError(
            f"backend {force} cannot be used here: {skipped[force]}; omit --backend to fall back automatically"
        )
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise CmdfedError(f"no backend can run this model here ({reasons})")
