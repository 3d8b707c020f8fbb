"""How much memory `cmdfed edge serve` may use, and what each call may take of it.

The service has a budget (``--max-memory``, default DEFAULT_FRACTION of the machine's memory, or
of its cgroup's limit). At start it runs the largest batch it will ever give the backend
(model-sized windows, ``edge.infer.default_batch`` of them) and measures the process at rest
and the run's peak above that; ONNX Runtime's memory arena gives a run's memory back after it
in the service, so it does not grow with the shapes seen, except a run of one window (a
one-tile request), which it keeps warm (no page faults for that memory on the next one; at
rest is measured with it). The rest is shared by the calls:

    at rest + one model run (measured)                   calls into the backend are one at a time
    + workers x 2 x the largest message                  requests received, raw and decoded
    + what the calls under way reserved                  each SegmentTiles and SegmentSlide

Each call reserves, before any work, what ``Costs`` estimates it needs (its tiles' results, one
tile's maps and post-processing at a time, a batch of windows' maps), and waits for that much to
be free; the advertised limits (largest side, most tiles per request) are the largest whose
request fits the budget on its own, so every request the service accepts it can finish. The
per-pixel figures are measured (below) with a margin; ``benchmarks/edge_service_memory.py``
checks the whole against a real service's peak.

Large buffers are handed back to the system as soon as they are freed (``release_freed_memory``:
glibc otherwise keeps freed blocks below its moving mmap threshold in per-thread arenas, where
another thread cannot use them and the resident set only grows).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cmdfed.errors import CmdfedError
from edge.infer import BATCHES_ALIVE

log = logging.getLogger("cmdfed.edge")

DEFAULT_FRACTION = 0.5  # of the machine's (or cgroup's) memory, without --max-memory
# cmdfed.evaluate.postprocess at its peak: 75 bytes per pixel measured (tracemalloc, 1024 px
# tile of the tiny model's maps); the rest for what tracemalloc does not see (skimage's queues).
POSTPROCESS_BYTES_PER_PX = 120
# A tile's result: int32 instance map, its encoded bytes, the protobuf message's copy, and the
# serialised response; nuclei records (a few hundred bytes each, at most one per ~20 px).
RESULT_BYTES_PER_PX = 20
MESSAGE_COPIES = 2  # a received request: gRPC's buffer and the decoded protobuf message
REST_MARGIN = 0.1  # of the at-rest size: allocator slack, Python objects, thread stacks
SLIDE_EXTRA_BYTES = 64 << 20  # a slide job's label chunks, GeoJSON lines and zarr buffers
M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``8G``, ``1500M``, ``1.5GiB``, ``2e9`` -> bytes (K/M/G/T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise CmdfedError(f"--max-memory {text!r} is not a size; give bytes or e.g. 1500M, 8G")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def machine_memory() -> int:
    """Physical memory, or the cgroup's limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def resident_bytes() -> int:
    """This process's resident set now (0 where /proc is missing)."""
    try:
        return _status("VmRSS")
    except OSError:
        return 0


def peak_resident_bytes() -> int:
    try:
        return _status("VmHWM")
    except OSError:
        return 0


def reset_peak_resident() -> bool:
    """Reset this process's peak resident set (VmHWM) to its current size; False where Linux
    does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> bool:
    """Make glibc hand blocks of MMAP_THRESHOLD_BYTES or more back to the system when freed
    (a fixed threshold; glibc's own rises with each large free). False where it is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class Costs:
    """Bytes a call needs, from the model's shapes (``maps``: output channels, NP + HV + NC)."""

    window: int  # the bundle's tile size: largest side run in one piece
    batch: int  # windows (or small tiles) per backend call
    maps: int

    @property
    def map_bytes_per_px(self) -> int:
        return 4 * (self.maps + 1)  # float32 maps and the summed weights

    def tile_work(self, pixels: int) -> int:
        """One tile processed: padded copy, maps, post-processing, its result while built."""
        return pixels * (3 + self.map_bytes_per_px + POSTPROCESS_BYTES_PER_PX + RESULT_BYTES_PER_PX)

    def batch_work(self) -> int:
        """One backend call's input and output maps, copied out of the backend."""
        return 2 * self.batch * self.window * self.window * (3 + self.map_bytes_per_px)

    def request(self, pixels: list[int]) -> int:
        """A SegmentTiles request of tiles of these (padded) pixel counts."""
        if not pixels:
            return 0
        return sum(pixels) * RESULT_BYTES_PER_PX + self.tile_work(max(pixels)) + self.batch_work()

    def message(self, tiles: int, side: int) -> int:
        return tiles * side * side * 3

    def slide(self, batch: int) -> int:
        """A SegmentSlide job reading and processing ``batch`` tiles at a time: the batches its
        pipeline holds (edge.infer's BATCHES_ALIVE, each as tiles or maps, and the backend's
        copy of the one it runs) and one tile's post-processing."""
        tile_px = self.window * self.window
        batches = (BATCHES_ALIVE + 1) * batch * tile_px * (3 + self.map_bytes_per_px)
        return batches + self.tile_work(tile_px) + SLIDE_EXTRA_BYTES


@dataclass(frozen=True)
class Plan:
    budget: int
    at_rest: int
    messages: int  # held for received requests (workers x copies x the largest)
    max_side: int
    max_tiles: int

    @property
    def for_calls(self) -> int:
        return self.budget - self.at_rest - self.messages


def plan_limits(
    budget: int,
    at_rest: int,
    costs: Costs,
    *,
    workers: int,
    max_tiles: int,
    min_side: int,
    max_side: int,
    multiple: int,
) -> Plan:
    """The largest request (fewest tiles lost first, then the side) whose work fits ``budget``
    beside the service (``at_rest``: resident at rest plus one model run) and ``workers``
    received messages; CmdfedError if none does."""
    rest = int(at_rest * (1 + REST_MARGIN))

    def fits(tiles: int, side: int) -> Plan | None:
        messages = workers * MESSAGE_COPIES * costs.message(tiles, side)
        plan = Plan(budget, rest, messages, side, tiles)
        needed = max(costs.request([side * side] * tiles), costs.slide(1))
        return plan if plan.for_calls >= needed else None

    for side in range(max_side, min_side - 1, -multiple):
        for tiles in range(max_tiles, 0, -1):
            plan = fits(tiles, side)
            if plan is not None:
                return plan
    smallest = (
        rest
        + workers * MESSAGE_COPIES * costs.message(1, min_side)
        + max(costs.request([min_side * min_side]), costs.slide(1))
    )
    raise CmdfedError(
        f"--max-memory {gib(budget)} is too little: the service takes {gib(at_rest)} with this model (at rest, and "
        "running it), "
        f"and needs {gib(smallest)} to serve even one {min_side} px tile with {workers} workers; "
        "give more (or fewer --workers)"
    )


class MemoryBusy(Exception):
    """The memory a call needs was not free in time."""


class MemoryBudget:
    """Bytes the calls under way may hold; a call waits for its share, or gives up."""

    def __init__(self, total: int):
        self.total = total
        self._free = total
        self._changed = threading.Condition()

    @property
    def reserved(self) -> int:
        with self._changed:
            return self.total - self._free

    def acquire(self, nbytes: int, wait_s: float, still_wanted=lambda: True) -> None:
        """Take ``nbytes``; MemoryBusy if they are not free within ``wait_s`` or the caller stops
        wanting them. More than the whole budget is a bug of the caller's limits (ValueError)."""
        if nbytes > self.total:
            raise ValueError(f"{nbytes} bytes asked of a budget of {self.total}")
        deadline = time.monotonic() + wait_s
        with self._changed:
            while self._free < nbytes:
                left = deadline - time.monotonic()
                if left <= 0 or not still_wanted():
                    raise MemoryBusy
                self._changed.wait(min(left, 0.5))
            self._free -= nbytes

    def release(self, nbytes: int) -> None:
        with self._changed:
            self._free += nbytes
            self._changed.notify_all()

    @contextmanager
    def reserve(self, nbytes: int, wait_s: float, still_wanted=lambda: True):
        self.acquire(nbytes, wait_s, still_wanted)
        try:
            yield
        finally:
            self.release(nbytes)
