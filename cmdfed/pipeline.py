"""Stages of a job on threads of their own, joined by bounded queues, results back in order.

    items --stage 1 (thread)--> queue --stage 2 (thread)--> queue ... --> the calling thread

Whole-slide inference (``edge.infer``) reads tiles, runs the model and post-processes on
three such threads, so that reading, ONNX Runtime and the HoVer watershed work at once
instead of taking turns; threads suffice because those release the GIL for most of their time.

Each queue holds at most ``depth`` items, so a fast stage waits for a slow one instead of
running ahead: at most ``depth + 1`` items per stage are alive (one being worked on, the rest
queued after it), plus the one the caller holds, whatever the number of items.

Errors: the first exception of any stage (or of iterating ``items``) ends the pipeline and is
raised in the calling thread, once, as it was raised (its notes say which stage); the later
stages pass it on without working. When the caller stops early (its own error, an interrupt,
leaving the ``with`` block), every stage stops at its next hand-over. Either way the
``with`` block returns only once all stage threads have ended, so nothing the stages use
(an open slide) is closed under them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# How often a stage waiting on a full or empty queue checks whether the pipeline was stopped.
_POLL_S = 0.05
_END = object()  # after the last item


@dataclass(frozen=True)
class _Failure:
    stage: str
    error: BaseException


@contextlib.contextmanager
def pipelined(
    items: Iterable[Any], stages: Sequence[tuple[str, Callable[[Any], Any]]], *, depth: int = 1
) -> Iterator[Iterator[Any]]:
    """Yield an iterator over ``f_n(...f_1(item))`` for ``items`` in order; ``stages`` are
    (name, f) pairs, each run on its own thread (see the module docstring)."""
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    if depth < 1:
        raise ValueError(f"queue depth must be at least 1, got {depth}")
    stop = threading.Event()
    outboxes = [queue.Queue(maxsize=depth) for _ in stages]

    def hand_on(outbox: queue.Queue, item: Any) -> bool:
        """Put ``item`` once there is room; False when the pipeline stopped first."""
        while not stop.is_set():
            try:
                outbox.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def received(inbox: queue.Queue) -> Iterator[Any]:
        """What the previous stage hands on, up to its end marker (or until stopped)."""
        while not stop.is_set():
            try:
                item = inbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item

    def work(name: str, function: Callable[[Any], Any], inputs: Iterable[Any], outbox: queue.Queue) -> None:
        try:
            for item in inputs:
                if isinstance(item, _Failure):  # an earlier stage failed: pass its error on, do nothing more
                    hand_on(outbox, item)
                    return
                if not hand_on(outbox, function(item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises it
            hand_on(outbox, _Failure(name, exc))
            return
        hand_on(outbox, _END)

    threads = []
    inputs: Iterable[Any] = items
    for (name, function), outbox in zip(stages, outboxes):
        threads.append(
            threading.Thread(target=work, args=(name, function, inputs, outbox), name=f"pipeline-{name}", daemon=True)
        )
        inputs = received(outbox)

    def results() -> Iterator[Any]:
        last = outboxes[-1]
        while True:
            item = last.get()  # the last stage always ends with _END or a _Failure
            if item is _END:
                return
            if isinstance(item, _Failure):
                item.error.add_note(f"(raised in the pipeline's {item.stage} stage)")
                raise item.error
            yield item

    try:
        for thread in threads:
            thread.start()
        yield results()
    finally:
        stop.set()
        for thread in threads:
            if thread.ident is not None:  # started
                thread.join()
