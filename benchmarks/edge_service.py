"""Edge service under load: requests/s and latency of `cmdfed edge serve` with 1, 4 and 16
concurrent clients on loopback.

The service runs as its own process, as on a workstation (``--workers 16``, so every client is
served at once: decoding and post-processing run in parallel, model calls one at a time). Each
client has its own gRPC channel and sends SegmentTiles requests of one synthetic 256 px H&E
tile back to back for ``--seconds``, after ``--warmup`` requests of its own; requests/s counts
every request answered in that time, and the latency is what the client saw (send to reply);
``refused`` counts the requests the service turned away (RESOURCE_EXHAUSTED: its memory budget
or request limits), which are not in requests/s.

    python -m benchmarks.edge_service [--home DIR | --preset base] [--seconds 20] [--backend NAME] [--threads N]
    python -m benchmarks.edge_service --quick   # tiny random model, 3 s per level; prints only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import edge_home
from benchmarks.common import save_or_print
from cmdfed.data.synth import synth_tiles
from edge.protos import cmdfed_edge_pb2 as pb
from edge.protos import cmdfed_edge_pb2_grpc as pb_grpc

CLIENTS = (1, 4, 16)
SIDE = 256


def start_service(home: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    options = ["--workers", str(max(CLIENTS)), "--threads", str(args.threads)]
    process, port = edge_home.serve(home, *options, *(["--backend", args.backend] if args.backend else []))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service="cmdfed.edge.v1.EdgeSegmentation")
        health_pb2_grpc.HealthStub(channel).Check(request, timeout=60, wait_for_ready=True)
    return process, port


def load(port: int, clients: int, seconds: float, warmup: int, request: pb.SegmentTilesRequest) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    refused = [0] * clients
    failures: list[BaseException] = []
    clock: dict[str, float] = {}

    def start_clock() -> None:  # run once all clients are warm, before any is released
        clock["start"] = time.perf_counter()
        clock["stop"] = clock["start"] + seconds

    ready = threading.Barrier(clients + 1, action=start_clock)

    def client(k: int) -> None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.EdgeSegmentationStub(channel)
                for _ in range(warmup):
                    stub.SegmentTiles(request, timeout=300)
                ready.wait()
                while time.perf_counter() < clock["stop"]:
                    start = time.perf_counter()
                    try:
                        stub.SegmentTiles(request, timeout=300)
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            raise
                        refused[k] += 1
                        continue
                    latencies[k].append(time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - reported below, whatever it was
            failures.append(exc)
            ready.abort()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed while warming up: reported below
        ready.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"a client failed: {failures[0]!r}")
    elapsed = time.perf_counter() - clock["start"]  # includes the last requests that ran past the deadline
    every = np.array([s for per_client in latencies for s in per_client]) * 1e3
    p50, p95 = np.percentile(every, [50, 95])
    return {
        "requests": len(every),
        "requests/s": len(every) / elapsed,
        "p50 ms": float(p50),
        "p95 ms": float(p95),
        "refused": sum(refused),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    edge_home.add_options(parser)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per concurrency level")
    parser.add_argument("--warmup", type=int, default=2, help="requests each client sends before the clock starts")
    parser.add_argument("--backend", help="force a backend (default: the first that works, as on a workstation)")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for ONNX Runtime"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, 3 s per level, 1 warm-up; prints, saves nothing"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup = 3.0, 1
    work = Path(tempfile.mkdtemp(prefix="cmdfed-bench-"))
    try:
        home = edge_home.edge_home(args, work)
        image = np.ascontiguousarray(next(iter(synth_tiles(1, tile_size=SIDE, seed=0))).image)
        request = pb.SegmentTilesRequest(tiles=[pb.Tile(rgb=image.tobytes(), height=SIDE, width=SIDE)])
        process, port = start_service(home, args)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                info = pb_grpc.EdgeSegmentationStub(channel).ModelInfo(pb.Empty(), timeout=60)
            rows = []
            for clients in CLIENTS:
                m = load(port, clients, args.seconds, args.warmup, request)
                rows.append(
                    {
                        "clients": clients,
                        "backend": info.backend,
                        "precision": info.precision,
                        "requests": m["requests"],
                        "requests/s": round(m["requests/s"], 2),
                        "p50 ms": round(m["p50 ms"], 1),
                        "p95 ms": round(m["p95 ms"], 1),
                        "refused": m["refused"],
                    }
                )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        notes = (
            f"{edge_home.describe(home)}; SegmentTiles with one {SIDE} px tile per request, {args.seconds:g} s per "
            f"level after {args.warmup} warm-up requests per client; loopback, clients and service on the same "
            f"{os.cpu_count()} cores; service --workers {max(CLIENTS)} --threads {args.threads}"
        )
        save_or_print("edge_service", rows, notes, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
