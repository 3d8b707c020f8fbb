"""Edge service memory at the largest request it advertises: `cmdfed edge serve` in its own
process under each --max-memory, ModelInfo's limits, then one SegmentTiles request of exactly
that many tiles of that side (synthetic H&E, tiled), --repeat times; its memory read from /proc: at rest
before, peak (VmHWM, the whole life of the process) and resident after.

    python -m benchmarks.edge_service_memory [--home DIR | --preset base] [--max-memory 2G ...]
        [--threads N] [--repeat 2]
    python -m benchmarks.edge_service_memory --quick   # tiny random model, a 1.5G budget only; prints only

Each --max-memory is one row ("default": the service's own, half the machine's memory).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks import edge_home
from benchmarks.common import save_or_print
from cmdfed.data.synth import synth_tiles
from edge.protos import cmdfed_edge_pb2 as pb
from edge.protos import cmdfed_edge_pb2_grpc as pb_grpc

GIB = 1 << 30


def memory_of(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024 for key in ("VmRSS", "VmHWM")}


def tissue(side: int) -> np.ndarray:
    tiles = [t.image for t in synth_tiles(4, tile_size=256, seed=0)]
    block = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    reps = side // block.shape[0] + 1
    return np.ascontiguousarray(np.tile(block, (reps, reps, 1))[:side, :side])


def serve(home: Path, budget: str, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    options = ["--workers", str(args.workers), "--threads", str(args.threads)]
    return edge_home.serve(home, *options, *([] if budget == "default" else ["--max-memory", budget]))


def measure(home: Path, budget: str, args: argparse.Namespace) -> dict:
    process, port = serve(home, budget, args)
    try:
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        ) as channel:
            stub = pb_grpc.EdgeSegmentationStub(channel)
            limits = stub.ModelInfo(pb.Empty(), timeout=60).limits
            image = tissue(limits.max_side)
            request = pb.SegmentTilesRequest(
                tiles=[pb.Tile(rgb=image.tobytes(), height=limits.max_side, width=limits.max_side)]
                * limits.max_tiles_per_request
            )
            at_rest = memory_of(process.pid)["VmRSS"]
            seconds = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                stub.SegmentTiles(request, timeout=3600)
                seconds.append(time.perf_counter() - started)
            time.sleep(1)
            after = memory_of(process.pid)
        ceiling = None if budget == "default" else budget
        return {
            "--max-memory": budget,
            "advertised": f"{limits.max_tiles_per_request} x {limits.max_side} px",
            "request MB": round(request.ByteSize() / 1e6, 1),
            "at rest GiB": round(at_rest / GIB, 3),
            "peak GiB": round(after["VmHWM"] / GIB, 3),
            "after GiB": round(after["VmRSS"] / GIB, 3),
            "s per request": round(float(np.median(seconds)), 1),
            "peak within budget": "-" if ceiling is None else str(after["VmHWM"] <= _bytes(ceiling)),
        }
    finally:
        process.terminate()
        process.wait(timeout=60)


def _bytes(size: str) -> int:
    from edge.memory import parse_size

    return parse_size(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    edge_home.add_options(parser)
    parser.add_argument(
        "--max-memory", action="append", help="a budget to measure (repeat; 'default' for the service's)"
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="service --workers (the budget keeps a message for each)"
    )
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for ONNX Runtime"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="times the request is sent (the second shows what the first kept)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model, a 1.5G budget; prints, saves nothing")
    args = parser.parse_args()
    budgets = args.max_memory or (["1.5G"] if args.quick else ["1.5G", "3G", "default"])
    work = Path(tempfile.mkdtemp(prefix="cmdfed-bench-"))
    try:
        home = edge_home.edge_home(args, work)
        rows = [measure(home, budget, args) for budget in budgets]
        notes = (
            f"{edge_home.describe(home)}; `cmdfed edge serve --workers {args.workers} --threads {args.threads}` in its "
            f"own process, one SegmentTiles request of the advertised maximum (synthetic H&E), sent {args.repeat} "
            "times; memory from /proc/PID/status (peak = VmHWM over the process's life, after = VmRSS a second after "
            f"the last request); machine memory {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.1f} "
            "GiB"
        )
        save_or_print("edge_service_memory", rows, notes, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
