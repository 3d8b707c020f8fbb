"""cmdfed.pipeline: stages on threads, bounded queues, results in order, one error, no stragglers."""

from __future__ import annotations

import random
import threading
import time

import pytest

from cmdfed.pipeline import pipelined


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pipeline-")]


def _jittered(function):
    """``function`` after a random pause, so the stages finish their items out of step."""
    pauses = random.Random(0)

    def stage(item):
        time.sleep(pauses.uniform(0, 0.003))
        return function(item)

    return stage


def test_results_come_in_order_and_equal_the_stages_run_one_after_another():
    stages = [("double", _jittered(lambda x: 2 * x)), ("square", _jittered(lambda x: x * x)), ("name", _jittered(str))]
    with pipelined(range(200), stages, depth=2) as results:
        assert list(results) == [str((2 * x) ** 2) for x in range(200)]
    assert not _pipeline_threads()


def test_a_slow_consumer_holds_the_stages_back_to_their_queues():
    pulled, held_back = [], []

    def source():
        for item in range(40):
            pulled.append(item)
            yield item

    stages = [("a", lambda x: x), ("b", lambda x: x), ("c", lambda x: x)]
    with pipelined(source(), stages, depth=1) as results:
        for consumed, item in enumerate(results, start=1):
            time.sleep(0.01)  # the consumer is the slowest stage: the others fill their queues and wait
            held_back.append(len(pulled) - consumed)
    # Each stage holds one item and one more in its queue (depth 1): never more ahead of the consumer.
    assert max(held_back) <= len(stages) * (1 + 1) and max(held_back) >= len(stages)


def test_an_error_in_a_stage_is_raised_once_in_the_caller_and_every_thread_ends():
    seen_after = []

    def fails_at_five(x):
        if x == 5:
            raise ValueError("tile 5 is broken")
        return x

    stages = [("read", lambda x: x), ("post-processing", fails_at_five), ("after", seen_after.append)]
    received = []
    with pytest.raises(ValueError, match="tile 5 is broken") as raised, pipelined(range(1000), stages) as results:
        received.extend(results)
    assert "(raised in the pipeline's post-processing stage)" in raised.value.__notes__
    assert len(received) == 5 and seen_after == list(range(5))  # nothing after the failure reaches the end
    assert not _pipeline_threads()


def test_an_error_while_producing_the_items_is_raised_in_the_caller():
    def source():
        yield 1
        raise OSError("the slide went away")

    with (
        pytest.raises(OSError, match="the slide went away") as raised,
        pipelined(source(), [("model", lambda x: x)]) as results,
    ):
        list(results)
    assert "(raised in the pipeline's model stage)" in raised.value.__notes__
    assert not _pipeline_threads()


def test_a_caller_that_stops_early_stops_the_stages():
    started = []

    def source():
        for item in range(10_000):
            started.append(item)
            yield item

    with pytest.raises(KeyboardInterrupt), pipelined(source(), [("a", lambda x: x), ("b", lambda x: x)]) as results:
        for item in results:
            if item == 3:
                raise KeyboardInterrupt
    assert not _pipeline_threads() and len(started) < 20


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one stage"), pipelined([1], []):
        pass
    with pytest.raises(ValueError, match="depth must be at least 1"), pipelined([1], [("a", str)], depth=0):
        pass
