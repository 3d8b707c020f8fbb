"""`cmdfed edge serve`: the workstation's gRPC service (protocol: ``edge/protos/cmdfed_edge.proto``).

    start:  active version in HOME --select_backend--> one validated backend (loaded once)
            -> grpc.server (thread pool, message size limit) with EdgeSegmentation and the
               standard grpc.health.v1 service, SERVING from the moment it listens
            -> Prometheus metrics on --metrics-port, telemetry heartbeats with --telemetry
               or --report-to (edge.reports)
    stop:   SIGTERM/SIGINT -> health NOT_SERVING -> running calls get GRACE_S to finish
            -> a last heartbeat -> reports still queued for the telemetry server get a few
               seconds to be sent

SegmentTiles: tiles of any side 1..max_side are accepted. Sides that are not multiples of
32 (or below the model's minimum) are padded with white on the right and bottom, as
whole-slide inference pads a slide smaller than a tile; the network's maps are cropped back to
the tile before the training post-processing runs, so results cover exactly the pixels
sent. A request that states its tiles' resolution (``mpp``) other than the model's has them
resampled to the model's first (``to_model_resolution``; sides within max_side both as sent
and as resampled) and the results brought back to the tiles' pixels, as `cmdfed predict`
does. Tiles no larger than the bundle's tile size go through the backend together, at most
a batch at a time (``edge.infer.default_batch`` of the bundle's tile: 8 of 256 px, 2 of 512),
padded to the largest; a larger tile is run in windows of the bundle's tile size (or half
of it, where that computes fewer pixels: ``edge.windows.cheapest_window``) and overlap, their
maps blended (``edge.windows``), so no backend call is larger than a slide's batch whatever
the request. Calls into the backend are serialised
(one accelerator, and TensorRT contexts are not thread-safe); decoding and post-processing
run in parallel on the thread pool. Small-tile calls from several clients that wait for the
model at the same time are run as one batch (``SerialisedBackend.run_coalesced``, at most
a batch of tiles, the batch the memory probe measured), so many one-tile clients get the
throughput of batched calls.

Memory (``edge.memory``): the service has a budget (``--max-memory``, default half the
machine's memory). At start it measures itself at rest, with the model loaded and one batch
of windows run; the advertised limits (max_side, max_tiles_per_request, and so the message
size) are the largest whose request fits the budget beside that and ``workers`` received
messages. Each SegmentTiles and SegmentSlide reserves what it needs before working and
waits up to ADMISSION_WAIT_S for it (then RESOURCE_EXHAUSTED, reason ``memory_busy``), so
calls at once cannot together outgrow the budget, and every request the service accepts it
can finish. A SegmentSlide batch is at most that batch of tiles.

SegmentSlide runs ``edge.infer.infer_slide`` (resumable, same outputs as `cmdfed edge infer`,
default folder HOME/outputs/<slide file name>) on a thread of its own with the served backend, so a
slide is segmented by the model ModelInfo reports even after a new deploy, and streams its progress
(the request's ``mpp`` stands for a slide file's missing resolution); the last message holds the
summary and output paths. One slide at a time: a second SegmentSlide while one runs gets
RESOURCE_EXHAUSTED rather than waiting on a worker thread. A client that cancels stops the slide at
the next batch; rerunning it resumes. With --telemetry or --report-to, each slide's summary is
reported too.

Metrics (own registry, so several services can live in one process):
``cmdfed_edge_memory_budget_bytes`` and ``cmdfed_edge_memory_reserved_bytes`` (what calls under way
hold of what is left for them), ``cmdfed_edge_requests_total{method,code}``,
``cmdfed_edge_failures_total{method,reason}``, ``cmdfed_edge_request_duration_seconds{method}``
(histogram: p50/p95 by histogram_quantile), ``cmdfed_edge_tiles_total`` (rate() = tiles/s),
``cmdfed_edge_model_info{version,backend,device,precision}`` and, on a CUDA backend,
``cmdfed_edge_gpu_memory_used_bytes``. Heartbeats (at start, every --heartbeat seconds, and after
stopping) carry tiles/s since the previous one, p50/p95 of the last LATENCY_WINDOW SegmentTiles
calls and the errors by reason so far. They go to a store the workstation writes itself
(--telemetry) or, queued and sent in the background so that no call waits on the network, to the
federation's telemetry server (--report-to; edge.reports).

Errors: a request a client got wrong ends with INVALID_ARGUMENT (a message that is not the
method's protobuf, reason ``bad_message``, logged in one line; bad tile sizes or byte
counts, a corrupt slide or unusable options), NOT_FOUND (slide path), or
RESOURCE_EXHAUSTED (too many tiles, a slide while another is running, or no memory free for
the call within ADMISSION_WAIT_S) and one clear
message; anything else is INTERNAL and
logged. Every call is counted by method and status code and every failure by reason. A
message above the size limit is refused by gRPC itself (RESOURCE_EXHAUSTED) before it
reaches the service, so it appears in no counter.

Clients are trusted: slide paths and output folders are paths on the workstation, and
there is no TLS or authentication. The service listens on loopback unless told otherwise;
bind it to other interfaces only on a trusted network.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import queue
import signal
import threading
import time
from collections import deque
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from cmdfed.data.slide import PLAUSIBLE_MPP
from cmdfed.errors import CmdfedError
from cmdfed.inference.nuclei import NucleusRecord, class_name, image_xy
from cmdfed.inference.postprocess import WatershedParams, postprocess
from cmdfed.inference.stain import HEStains, restained_together
from cmdfed.inference.tiling import needs_resampling, resample_image, resampled_shape, to_image_pixels
from edge import infer
from edge.deploy import active_bundle
from edge.memory import (
    DEFAULT_FRACTION,
    Costs,
    MemoryBudget,
    MemoryBusy,
    gib,
    machine_memory,
    peak_resident_bytes,
    plan_limits,
    release_freed_memory,
    reset_peak_resident,
    resident_bytes,
)
from edge.protos import cmdfed_edge_pb2 as pb
from edge.protos import cmdfed_edge_pb2_grpc as pb_grpc
from edge.reports import Reports, reports_to
from edge.selection import Selection, select_backend
from edge.windows import cheapest_window, padded_side, windowed_maps

log = logging.getLogger("cmdfed.edge")

SERVICE_NAME = "cmdfed.edge.v1.EdgeSegmentation"
DEFAULT_MAX_TILES = 16
DEFAULT_WORKERS = 8
DEFAULT_HEARTBEAT_S = 60.0
GRACE_S = 10.0
LATENCY_WINDOW = 1000  # recent SegmentTiles latencies kept for the heartbeat's p50/p95
MESSAGE_SLACK = 64 * 1024  # protobuf framing on top of the tiles' pixel bytes
SLIDE_OUTPUTS = "outputs"
ADMISSION_WAIT_S = 60.0  # longest a call waits for its memory (or its deadline, if sooner)


class RequestError(CmdfedError):
    """A request the service refuses: the gRPC status, a reason for the counters, a message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class Limits:
    min_side: int
    max_side: int
    multiple: int
    max_tiles: int

    @property
    def max_message_bytes(self) -> int:
        return self.max_tiles * self.max_side * self.max_side * 3 + MESSAGE_SLACK


# -- metrics ---------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics (own registry) plus the rolling numbers a heartbeat reports."""

    def __init__(self, selection: Selection):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "cmdfed_edge_requests", "Calls by method and gRPC status.", ["method", "code"], registry=registry
        )
        self.failures = Counter(
            "cmdfed_edge_failures", "Failed calls by reason.", ["method", "reason"], registry=registry
        )
        self.latency = Histogram(
            "cmdfed_edge_request_duration_seconds",
            "Call duration (p50/p95 via histogram_quantile).",
            ["method"],
            registry=registry,
        )
        self.tiles = Counter("cmdfed_edge_tiles", "Tiles segmented (requests and slides).", registry=registry)
        self.memory_budget = Gauge(
            "cmdfed_edge_memory_budget_bytes",
            "What calls may reserve: the budget less the service at rest and received messages.",
            registry=registry,
        )
        self.memory_reserved = Gauge(
            "cmdfed_edge_memory_reserved_bytes", "Memory the calls under way reserved.", registry=registry
        )
        backend = selection.backend
        model = Info("cmdfed_edge_model", "The model being served.", registry=self.registry)
        model.info(
            {
                "version": backend.model.manifest["model"]["version"],
                "backend": backend.name,
                "device": backend.device,
                "precision": backend.precision,
            }
        )
        if backend.device.startswith("cuda"):
            gpu = Gauge("cmdfed_edge_gpu_memory_used_bytes", "Memory in use on the backend's GPU.", registry=registry)
            gpu.set_function(_gpu_memory_used)
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._errors: dict[str, int] = {}
        self._tiles_since, self._since = 0, time.monotonic()

    def succeeded(self, method: str, seconds: float) -> None:
        self.requests.labels(method, grpc.StatusCode.OK.name).inc()
        self.latency.labels(method).observe(seconds)
        if method == "SegmentTiles":
            with self._lock:
                self._latencies.append(seconds)

    def failed(self, method: str, code: grpc.StatusCode, reason: str, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.failures.labels(method, reason).inc()
        self.latency.labels(method).observe(seconds)
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + 1

    def add_tiles(self, n: int) -> None:
        self.tiles.inc(n)
        with self._lock:
            self._tiles_since += n

    def heartbeat_numbers(self) -> dict:
        """tiles/s since the previous heartbeat, p50/p95 of recent SegmentTiles calls, errors so far."""
        with self._lock:
            now = time.monotonic()
            tiles_per_s = self._tiles_since / max(now - self._since, 1e-9)
            self._tiles_since, self._since = 0, now
            latencies = np.array(self._latencies)
            errors = dict(self._errors)
        p50, p95 = np.percentile(latencies * 1e3, [50, 95]).tolist() if len(latencies) else (None, None)
        return {"tiles_per_s": tiles_per_s, "p50_ms": p50, "p95_ms": p95, "errors": errors}


def _gpu_memory_used() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    return float(total - free)


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else device


# -- tiles -----------------------------------------------------------------------------


def decode_tiles(tiles, limits: Limits) -> list[np.ndarray]:
    """Request tiles -> uint8 (H, W, 3) arrays, or a RequestError saying what is wrong."""
    if not tiles:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "no_tiles", "the request has no tiles")
    if len(tiles) > limits.max_tiles:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_many_tiles",
            f"{len(tiles)} tiles in one request; at most {limits.max_tiles} are accepted: send the rest separately",
        )
    images = []
    for i, tile in enumerate(tiles):
        h, w = tile.height, tile.width
        if not (1 <= h <= limits.max_side and 1 <= w <= limits.max_side):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_tile_size",
                f"tile {i}: height and width must be 1..{limits.max_side}, got {h}x{w}",
            )
        if len(tile.rgb) != h * w * 3:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_tile_bytes",
                f"tile {i}: {h}x{w} RGB needs {h * w * 3} bytes (uint8, row-major), got {len(tile.rgb)}",
            )
        images.append(np.frombuffer(tile.rgb, np.uint8).reshape(h, w, 3))
    return images


def to_model_resolution(
    images: list[np.ndarray], mpp: float, model_mpp: float | None, limits: Limits
) -> list[np.ndarray]:
    """The tiles as the model reads them: resampled to its resolution when the request states
    another (``mpp``; 0: the model's), else as they are; a RequestError when that cannot be."""
    if mpp == 0:
        return images
    low, high = PLAUSIBLE_MPP
    if not low <= mpp <= high:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_mpp",
            f"mpp {mpp}: a tile's resolution lies in {low}..{high} um/px (0.25 at 40x, 0.5 at 20x), or 0 for the "
            "model's",
        )
    if not model_mpp:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_mpp",
            "this model's bundle records no resolution, so tiles cannot be resampled to it: send them at "
            "the resolution it was trained at, with mpp 0",
        )
    if not needs_resampling(mpp, model_mpp):
        return images
    resampled = []
    for i, image in enumerate(images):
        shape = resampled_shape(image.shape[:2], mpp / model_mpp)
        if max(shape) > limits.max_side:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_tile_size",
                f"tile {i}: at the model's {model_mpp:g} um/px it is {shape[0]}x{shape[1]}, above "
                f"{limits.max_side}: send smaller tiles",
            )
        resampled.append(resample_image(image, shape))
    return resampled


def padded_batch(images: list[np.ndarray], limits: Limits) -> np.ndarray:
    """One uint8 batch, every tile padded with white to a common side the network accepts."""

    def side(n: int) -> int:
        return max(limits.min_side, math.ceil(n / limits.multiple) * limits.multiple)

    height, width = side(max(i.shape[0] for i in images)), side(max(i.shape[1] for i in images))
    batch = np.full((len(images), height, width, 3), 255, np.uint8)
    for k, image in enumerate(images):
        batch[k, : image.shape[0], : image.shape[1]] = image
    return batch


def tile_result(result, class_names: list[str]) -> pb.TileResult:
    instances = result.instance_map
    small = instances.max(initial=0) < 2**16
    encoding, dtype = (pb.UINT16_LE, "<u2") if small else (pb.INT32_LE, "<i4")
    height, width = instances.shape
    return pb.TileResult(
        height=height,
        width=width,
        encoding=encoding,
        instances=instances.astype(dtype).tobytes(),
        nuclei=[_nucleus(n, class_names) for n in result.nuclei],
    )


def _nucleus(nucleus: NucleusRecord, class_names: list[str]) -> pb.Nucleus:
    # The proto promises image coordinates (pixel centres at +0.5): centroid and contour alike.
    x, y = image_xy(nucleus.centroid_xy).tolist()
    message = pb.Nucleus(
        id=nucleus.id,
        type=nucleus.type or 0,
        type_name=class_name(nucleus.type, class_names),
        type_probability=nucleus.type_prob or 0.0,
        centroid=pb.Point(x=x, y=y),
        area=nucleus.area,
    )
    add_point = message.contour.add  # in place: half the time of building Point objects to copy in
    for px, py in image_xy(nucleus.contour_xy).tolist():
        add_point(x=px, y=py)
    return message


# -- the service -----------------------------------------------------------------------


class Undecodable:
    """A request whose bytes are not the method's protobuf message (gRPC's own deserialisation
    would log a traceback and answer INTERNAL; the servicer answers INVALID_ARGUMENT instead)."""

    def __init__(self, message: type, error: Exception):
        self.message, self.error = message, error


def _lenient(message: type):
    def parse(data: bytes):
        try:
            return message.FromString(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, and whatever upb raises
            return Undecodable(message, exc)

    return parse


def add_servicer(servicer: EdgeServicer, server: grpc.Server) -> None:
    """``pb_grpc.add_EdgeSegmentationServicer_to_server`` with request parsing that cannot fail."""
    handlers = {
        "SegmentTiles": grpc.unary_unary_rpc_method_handler(
            servicer.SegmentTiles,
            request_deserializer=_lenient(pb.SegmentTilesRequest),
            response_serializer=pb.SegmentTilesResponse.SerializeToString,
        ),
        "SegmentSlide": grpc.unary_stream_rpc_method_handler(
            servicer.SegmentSlide,
            request_deserializer=_lenient(pb.SegmentSlideRequest),
            response_serializer=pb.SlideProgress.SerializeToString,
        ),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo,
            request_deserializer=_lenient(pb.Empty),
            response_serializer=pb.ModelInfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def decoded(request, method: str, context):
    """The request, or a RequestError (one log line) if its bytes did not parse."""
    if isinstance(request, Undecodable):
        log.warning(
            "refused a %s call from %s: not a %s message (%s)",
            method,
            context.peer(),
            request.message.__name__,
            str(request.error)[:200] or type(request.error).__name__,
        )
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad_message",
            f"the request is not a {request.message.DESCRIPTOR.full_name} protobuf message; use the client code "
            "generated from cmdfed_edge.proto",
        )
    return request


class _Batch:
    """One caller's tiles waiting for the model, and the maps once they have run."""

    def __init__(self, tiles: np.ndarray):
        self.tiles = tiles
        self.maps: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None


class SerialisedBackend:
    """A backend whose ``run`` takes one caller at a time (a TensorRT execution context is
    not thread-safe); everything else is the backend's.

    ``run_coalesced``: small-tile calls that queue while the model is busy are run together.
    Whoever gets the model next runs every waiting batch of its tile shape, up to ``max_pixels``
    (the memory probe's batch: 8 tiles of 256 px beside a 512 px model), as one backend call
    and hands each caller its rows; a caller whose tiles went with an earlier call just takes
    its maps. One client sees no difference; many clients of one tile each get the throughput
    of batched calls instead of one tile per call (a tile's maps do not depend on the other
    tiles in its batch).
    """

    def __init__(self, backend, max_pixels: int):
        self._wrapped, self._lock = backend, threading.Lock()
        self._max_pixels = max_pixels
        self._waiting: list[_Batch] = []
        self._waiting_lock = threading.Lock()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            return self._wrapped.run(batch)

    def run_coalesced(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        mine = _Batch(batch)
        with self._waiting_lock:
            self._waiting.append(mine)
        with self._lock:
            if mine.maps is None and mine.error is None:
                self._run_waiting(mine)
        if mine.error is not None:
            raise mine.error
        return mine.maps

    def _run_waiting(self, first: _Batch) -> None:
        """Run ``first`` with the waiting batches of its shape that fit beside it (model lock held)."""
        shape = first.tiles.shape[1:]
        tile_pixels = shape[0] * shape[1]
        with self._waiting_lock:
            taken, size = [first], len(first.tiles)
            for waiting in self._waiting:
                if (
                    waiting is not first
                    and waiting.tiles.shape[1:] == shape
                    and (size + len(waiting.tiles)) * tile_pixels <= self._max_pixels
                ):
                    taken.append(waiting)
                    size += len(waiting.tiles)
            self._waiting = [w for w in self._waiting if all(w is not t for t in taken)]
        try:
            maps = self._wrapped.run(np.concatenate([t.tiles for t in taken]) if len(taken) > 1 else first.tiles)
        except BaseException as exc:  # noqa: BLE001 - every caller whose tiles were in the call gets the error
            for waiting in taken:
                waiting.error = exc
            return
        start = 0
        for waiting in taken:
            end = start + len(waiting.tiles)
            waiting.maps = {name: value[start:end] for name, value in maps.items()}
            start = end

    def __getattr__(self, name: str):
        return getattr(self._wrapped, name)


class EdgeServicer(pb_grpc.EdgeSegmentationServicer):
    def __init__(
        self,
        home: Path,
        selection: Selection,
        limits: Limits,
        metrics: Metrics,
        reports: Reports | None,
        costs: Costs,
        memory: MemoryBudget,
    ):
        self.home, self.selection, self.limits, self.metrics = home, selection, limits, metrics
        self.reports = reports
        self.costs, self.memory = costs, memory
        metrics.memory_budget.set(memory.total)
        metrics.memory_reserved.set_function(lambda: memory.reserved)
        manifest = selection.backend.model.manifest
        self.manifest = manifest
        self.overlap = manifest["preprocessing"]["overlap"]
        self.class_names = manifest["model"]["class_names"]
        self.params = WatershedParams.from_manifest(manifest)
        self.stain_reference = HEStains.from_manifest(manifest)
        # One model on the device, shared by tile calls and slide jobs, one call into it at a time.
        self._backend = SerialisedBackend(selection.backend, max_pixels=costs.batch * costs.window**2)
        self._slide_selection = replace(selection, backend=self._backend)
        self._slide_lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.manifest["model"]["version"]

    # -- rpcs

    def ModelInfo(self, request, context):
        def work() -> pb.ModelInfoResponse:
            decoded(request, "ModelInfo", context)
            return self._model_info()

        return self._unary("ModelInfo", context, work)

    def SegmentTiles(self, request, context):
        return self._unary(
            "SegmentTiles", context, lambda: self._segment_tiles(decoded(request, "SegmentTiles", context), context)
        )

    def SegmentSlide(self, request, context):
        started = time.perf_counter()
        try:
            yield from self._segment_slide(decoded(request, "SegmentSlide", context), context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the call's gRPC status; the service lives on
            code, reason, message = _classify(exc, "bad_slide")
            self.metrics.failed("SegmentSlide", code, reason, time.perf_counter() - started)
            context.abort(code, message)
        self.metrics.succeeded("SegmentSlide", time.perf_counter() - started)

    # -- work

    def _unary(self, method: str, context, work):
        started = time.perf_counter()
        try:
            response = work()
        except Exception as exc:  # noqa: BLE001 - every failure becomes the call's gRPC status; the service lives on
            code, reason, message = _classify(exc, "bad_request")
            self.metrics.failed(method, code, reason, time.perf_counter() - started)
            context.abort(code, message)
        self.metrics.succeeded(method, time.perf_counter() - started)
        return response

    def _model_info(self) -> pb.ModelInfoResponse:
        backend, pre, limits = self.selection.backend, self.manifest["preprocessing"], self.limits
        return pb.ModelInfoResponse(
            model_version=self.version,
            backend=backend.name,
            device=backend.device,
            precision=backend.precision,
            class_names=self.class_names,
            tile_size=pre["tile_size"],
            overlap=pre["overlap"],
            mpp=pre.get("mpp") or 0.0,
            limits=pb.InputLimits(
                min_side=limits.min_side,
                max_side=limits.max_side,
                side_multiple_of=limits.multiple,
                max_tiles_per_request=limits.max_tiles,
                max_message_bytes=limits.max_message_bytes,
            ),
            stain_reference=None
            if self.stain_reference is None
            else pb.StainReference(
                hematoxylin=self.stain_reference.hematoxylin,
                eosin=self.stain_reference.eosin,
                max_concentrations=self.stain_reference.max_concentrations,
            ),
        )

    def _segment_tiles(self, request, context) -> pb.SegmentTilesResponse:
        images = decode_tiles(request.tiles, self.limits)
        seen = to_model_resolution(images, request.mpp, self.manifest["preprocessing"].get("mpp"), self.limits)
        if not request.as_scanned:  # one estimate over the request's tiles, as a slide has one
            seen = restained_together(seen, self.stain_reference)
        limits, window = self.limits, self.costs.window

        def side(n: int) -> int:
            return padded_side(n, limits.multiple, limits.min_side)

        pixels = [side(i.shape[0]) * side(i.shape[1]) for i in seen]
        small = [k for k, i in enumerate(seen) if side(i.shape[0]) <= window and side(i.shape[1]) <= window]
        results: list[pb.TileResult | None] = [None] * len(seen)
        with self._reserved(self.costs.request(pixels), context):
            for start in range(0, len(small), self.costs.batch):
                chunk = small[start : start + self.costs.batch]
                maps = self._backend.run_coalesced(padded_batch([seen[k] for k in chunk], limits))
                for j, k in enumerate(chunk):
                    h, w = seen[k].shape[:2]
                    results[k] = self._tile_result(
                        {name: value[j][..., :h, :w] for name, value in maps.items()}, images[k].shape[:2]
                    )
                del maps
            for k in sorted(set(range(len(seen))) - set(small)):
                height, width = seen[k].shape[:2]
                cheapest = cheapest_window(side(height), side(width), window, self.overlap, limits.multiple)
                maps = windowed_maps(
                    self._backend.run,
                    seen[k],
                    window=cheapest,
                    overlap=self.overlap,
                    multiple=limits.multiple,
                    min_side=limits.min_side,
                    batch=self.costs.batch * (window // cheapest) ** 2,  # the probed batch's pixels
                )
                results[k] = self._tile_result(maps, images[k].shape[:2])
                del maps
        self.metrics.add_tiles(len(images))
        backend = self.selection.backend.name
        return pb.SegmentTilesResponse(results=results, model_version=self.version, backend=backend)

    def _tile_result(self, maps: dict[str, np.ndarray], shape: tuple[int, int]) -> pb.TileResult:
        """Nuclei of one tile from its maps at the model's resolution, in the tile's own ``shape``."""
        processed = postprocess(maps["np"], maps["hv"], maps.get("nc"), self.params)
        if processed.instance_map.shape != tuple(shape):  # resampled to the model's resolution: bring it back
            processed = to_image_pixels(processed, maps.get("nc"), shape)
        return tile_result(processed, self.class_names)

    @contextmanager
    def _reserved(self, nbytes: int, context):
        """Hold ``nbytes`` of the memory budget while the block runs (waiting for them)."""
        self._acquire(nbytes, context)
        try:
            yield
        finally:
            self.memory.release(nbytes)

    def _acquire(self, nbytes: int, context) -> None:
        remaining = context.time_remaining()
        wait = ADMISSION_WAIT_S if remaining is None else max(0.0, min(ADMISSION_WAIT_S, remaining))
        try:
            self.memory.acquire(nbytes, wait, context.is_active)
        except MemoryBusy:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "memory_busy",
                "the service's memory is held by other requests; retry shortly, or send fewer or smaller tiles",
            ) from None

    def _segment_slide(self, request, context):
        slide, out_dir = self._slide_arguments(request)
        batch = request.batch or self.costs.batch
        reserved = self.costs.slide(batch)
        updates: queue.Queue = queue.Queue()
        counted: list[int] = []  # tiles done at the previous report; a resumed slide starts above 0

        def progress(done: int, total: int | None, what: str) -> None:
            if not context.is_active():
                raise RequestError(grpc.StatusCode.CANCELLED, "cancelled", "the client cancelled the slide")
            if counted:
                self.metrics.add_tiles(done - counted[0])
            counted[:] = [done]
            updates.put(pb.SlideProgress(done=done, total=total or 0, stage=what))

        def run() -> None:
            try:
                summary = infer.infer_slide(
                    slide,
                    self.home,
                    out_dir,
                    selection=self._slide_selection,
                    batch=batch,
                    min_tissue=request.min_tissue or infer.DEFAULT_MIN_TISSUE,
                    restart=request.restart,
                    mpp=request.mpp or None,
                    stain_normalise=not request.as_scanned,
                    telemetry=self.reports,
                    progress=progress,
                )
                outcome: pb.SlideProgress | BaseException = _final_progress(summary, out_dir)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which reports it
                outcome = exc
            self.memory.release(reserved)
            self._slide_lock.release()  # before the client hears the end, so its next slide is not "busy"
            updates.put(outcome)

        # Refused, not queued: a queued call would hold a gRPC worker thread (health checks need them).
        if not self._slide_lock.acquire(blocking=False):
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "busy",
                "this workstation is segmenting another slide; retry when it is done",
            )
        try:
            self._acquire(reserved, context)
        except BaseException:
            self._slide_lock.release()
            raise
        try:
            threading.Thread(target=run, name=f"slide-{slide.name}", daemon=True).start()
        except BaseException:
            self.memory.release(reserved)
            self._slide_lock.release()
            raise
        while True:
            update = updates.get()
            if isinstance(update, BaseException):
                raise update
            yield update
            if update.stage == "done":
                return

    def _slide_arguments(self, request) -> tuple[Path, Path]:
        if not request.path:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "bad_slide", "the request has no slide path")
        slide = Path(request.path)
        if not slide.is_file():
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, "slide_not_found", f"slide {slide} does not exist on this workstation"
            )
        if not 0 <= request.min_tissue <= 1:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "bad_options", f"min_tissue must be in 0..1, got {request.min_tissue}"
            )
        if request.batch > self.costs.batch:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad_options",
                f"batch must be at most {self.costs.batch} tiles on this service (the memory it budgets), got "
                f"{request.batch}",
            )
        out_dir = Path(request.out_dir) if request.out_dir else self.home / SLIDE_OUTPUTS / slide.name
        return slide, out_dir


def _final_progress(summary: dict, out_dir: Path) -> pb.SlideProgress:
    names = summary["outputs"]
    return pb.SlideProgress(
        done=summary["tiles"],
        total=summary["tiles"],
        stage="done",
        summary=pb.SlideSummary(
            slide=summary["slide"],
            model_version=summary["model_version"],
            backend=summary["backend"]["backend"],
            tiles=summary["tiles"],
            n_cells=summary["n_cells"],
            counts_by_type=summary["counts_by_type"],
            area_analysed_mm2=summary["area_analysed_mm2"] or 0.0,
            summary_json=json.dumps(summary),
        ),
        outputs=pb.SlideOutputs(
            out_dir=str(out_dir),
            labels=str(out_dir / names["labels"]),
            geojson=str(out_dir / names["geojson"]),
            summary=str(out_dir / infer.SUMMARY),
        ),
    )


def _classify(exc: Exception, refused: str) -> tuple[grpc.StatusCode, str, str]:
    """gRPC status, failure reason and message for an exception raised while serving a call;
    ``refused``: the reason for a CmdfedError (input this call could not use)."""
    if isinstance(exc, RequestError):
        return exc.code, exc.reason, str(exc)
    if isinstance(exc, CmdfedError):
        return grpc.StatusCode.INVALID_ARGUMENT, refused, str(exc)
    log.exception("internal error while serving a call")
    return grpc.StatusCode.INTERNAL, "internal", f"internal error ({type(exc).__name__}); see the service's log"


# -- running it ------------------------------------------------------------------------


class EdgeService:
    """The model, the gRPC server, the metrics endpoint and the heartbeat, started and stopped together."""

    def __init__(
        self,
        home: str | Path,
        *,
        port: int,
        host: str = "127.0.0.1",
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        telemetry: str | Path | Reports | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        max_tiles: int = DEFAULT_MAX_TILES,
        workers: int = DEFAULT_WORKERS,
        backend: str | None = None,
        threads: int | None = None,
        trt_source: str = "onnx",
        max_memory: int | None = None,
        retime_variants: bool = False,
    ):
        """``max_memory``: the service's memory budget in bytes (default DEFAULT_FRACTION of the
        machine's); the advertised limits are derived from it (``edge.memory``)."""
        if max_tiles < 1 or workers < 1 or heartbeat_s <= 0:
            raise CmdfedError("--max-tiles and --workers must be at least 1 and --heartbeat positive")
        if max_memory is not None and max_memory <= 0:
            raise CmdfedError(f"--max-memory must be positive, got {max_memory}")
        release_freed_memory()
        self.home = Path(home)
        self.reports = reports_to(telemetry)
        self.heartbeat_s = heartbeat_s
        self.selection = select_backend(
            active_bundle(self.home),
            self.home,
            force=backend,
            threads=threads,
            trt_source=trt_source,
            memory_arena=False,
            retime=retime_variants,
        )
        spec = self.selection.backend
        self.budget = int(max_memory if max_memory is not None else DEFAULT_FRACTION * machine_memory())
        loading_peak = peak_resident_bytes()
        costs, at_rest, model_run = self._probe(spec)
        if loading_peak > self.budget:
            raise CmdfedError(
                f"--max-memory {gib(self.budget)} is too little: loading this model took {gib(loading_peak)}; give more"
            )
        self.memory_plan = plan_limits(
            self.budget,
            at_rest + model_run,
            costs,
            workers=workers,
            max_tiles=max_tiles,
            min_side=spec.min_shape[2],
            max_side=spec.max_shape[2],
            multiple=spec.multiple,
        )
        plan = self.memory_plan
        self.limits = Limits(spec.min_shape[2], plan.max_side, spec.multiple, plan.max_tiles)
        log.info(
            "memory: budget %s; loading peaked at %s; %s at rest and %s while the model runs; %s for calls; "
            "largest request %d tiles of %d px",
            gib(plan.budget),
            gib(loading_peak),
            gib(at_rest),
            gib(model_run),
            gib(plan.for_calls),
            plan.max_tiles,
            plan.max_side,
        )
        self.metrics = Metrics(self.selection)
        self.servicer = EdgeServicer(
            self.home, self.selection, self.limits, self.metrics, self.reports, costs, MemoryBudget(plan.for_calls)
        )
        self.health = health.HealthServicer()
        self.server = self._make_server(host, port, workers)
        self.metrics_host = metrics_host
        self.metrics_port = self._start_metrics(metrics_host, metrics_port) if metrics_port is not None else None
        self._stopped = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    def _probe(self, backend) -> tuple[Costs, int, int]:
        """Run the largest batch the service gives the backend: the costs of calls (from the
        outputs' shapes), the bytes resident at rest after it, and what the run held at its peak
        above that (calls into the backend are one at a time, so this is needed once). Then a
        run of one window, whose memory the backend keeps warm between runs: at rest includes it."""
        window = backend.model.manifest["preprocessing"]["tile_size"]
        # As many windows as whole-slide inference's default batch: the same pixels a call whatever
        # the tile, so a 512 px model's service needs no more memory than a 256 px one's.
        batch = min(infer.default_batch(window), backend.max_shape[0])
        gc.collect()
        before = resident_bytes()
        reset_peak_resident()
        maps = backend.run(np.full((batch, window, window, 3), 255, np.uint8))
        channels = sum(value.shape[1] if value.ndim == 4 else 1 for value in maps.values())
        del maps
        peak = peak_resident_bytes()
        for _ in range(2):  # the second run finds the arena as every later one-window run will
            backend.run(np.full((1, window, window, 3), 255, np.uint8))
        gc.collect()
        at_rest = resident_bytes()
        # Where the peak could not be reset, the process's peak so far: more than the run's, never less.
        model_run = max(0, peak - min(before, at_rest))
        return Costs(window=window, batch=batch, maps=channels), at_rest, model_run

    def _make_server(self, host: str, port: int, workers: int) -> grpc.Server:
        size = self.limits.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-rpc"),
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", -1)],
        )
        add_servicer(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            self.port = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise CmdfedError(
                f"cannot listen on {host}:{port} (in use, or not an address of this machine); choose another --port or "
                "--host"
            ) from exc
        return server

    def _start_metrics(self, host: str, port: int) -> int:
        try:
            self._metrics_http, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        except OSError as exc:
            raise CmdfedError(
                f"cannot serve metrics on {host}:{port} ({exc}); choose another --metrics-port or --metrics-host"
            ) from exc
        return self._metrics_http.server_port

    @property
    def version(self) -> str:
        return self.servicer.version

    def start(self) -> EdgeService:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving model %s with %s (%s) on port %d",
            self.version,
            self.selection.backend.name,
            self.selection.backend.precision,
            self.port,
        )
        if self.reports:
            self._heartbeat()
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="edge-heartbeat", daemon=True)
            self._heartbeat_thread.start()
        return self

    def stop(self, grace: float = GRACE_S) -> None:
        """NOT_SERVING, let running calls finish within ``grace`` seconds, last heartbeat, flush reports."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._stopped.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
            self._heartbeat()
        if self.reports:
            self.reports.close()
        if self.metrics_port is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def serve_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        signalled = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: signalled.set())
        self.start()
        signalled.wait()
        log.info("stopping: finishing running calls (up to %gs)", GRACE_S)
        self.stop()

    def _heartbeat_loop(self) -> None:
        while not self._stopped.wait(self.heartbeat_s):
            try:
                self._heartbeat()
            except Exception:  # a telemetry outage must not stop the service
                log.exception("telemetry heartbeat failed")

    def _heartbeat(self) -> None:
        backend = self.selection.backend
        self.reports.heartbeat(
            backend=backend.name,
            gpu=_gpu_name(backend.device),
            model_version=self.version,
            **self.metrics.heartbeat_numbers(),
        )
