"""Backend selection on this machine (CPU only): the fallback order and its reasons, and the
CPU graph choice kept in the home for later jobs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading

import pytest

from cmdfed.errors import CmdfedError
from edge.deploy import active_bundle, status
from edge.selection import CHOICE_FILE, select_backend

TORCH_CUDA = pytest.importorskip("torch").cuda.is_available()


@pytest.mark.skipif(TORCH_CUDA, reason="checks the CPU-only fallback")
def test_cpu_machine_selects_onnxruntime_cpu_and_says_why(signed_bundle, tmp_path):
    selection = select_backend(signed_bundle, tmp_path)
    report = selection.report()
    assert report["backend"] == "onnxruntime-cpu" and report["golden_max_abs_diff"] < 1e-3
    assert set(report["skipped"]) == {"tensorrt", "onnxruntime-cuda"}
    assert "CUDAExecutionProvider" in report["skipped"]["onnxruntime-cuda"]
    assert "tensorrt" in report["skipped"]["tensorrt"] or "GPU" in report["skipped"]["tensorrt"]


@pytest.mark.skipif(TORCH_CUDA, reason="checks the CPU-only fallback")
def test_forcing_an_unavailable_backend_is_a_clear_error(signed_bundle, tmp_path):
    with pytest.raises(CmdfedError, match="backend onnxruntime-cuda cannot be used here"):
        select_backend(signed_bundle, tmp_path, force="onnxruntime-cuda")
    with pytest.raises(CmdfedError, match="unknown backend"):
        select_backend(signed_bundle, tmp_path, force="openvino")


@pytest.mark.skipif(TORCH_CUDA, reason="checks the CPU-only fallback")
def test_a_runtime_failing_mid_validation_is_reported_not_raised(signed_bundle, tmp_path, monkeypatch):
    import onnxruntime

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", fail)
    with pytest.raises(
        CmdfedError,
        match=r"no backend can run this model here .*onnxruntime-cpu: failed while "
        r"loading or validating \(RuntimeError: CUDA out of memory",
    ):
        select_backend(signed_bundle, tmp_path)
    with pytest.raises(CmdfedError, match="backend onnxruntime-cpu cannot be used here: failed while loading"):
        select_backend(signed_bundle, tmp_path, force="onnxruntime-cpu")


def kept_choices(home):
    return json.loads((home / CHOICE_FILE).read_text())["choices"]


def test_a_later_job_reuses_the_kept_cpu_graph_choice_until_its_key_changes(int8_home):
    def select(**options):
        return select_backend(active_bundle(int8_home), int8_home, force="onnxruntime-cpu", **options).report()

    first = select(threads=1, retime=True)
    kept = (int8_home / CHOICE_FILE).read_text()
    second = select(threads=1)
    assert second["variants_timed_at"] == first["variants_timed_at"] and second["precision"] == first["precision"]
    assert {v: r.get("ms_per_tile") for v, r in second["variants"].items()} == {
        v: r.get("ms_per_tile") for v, r in first["variants"].items()
    }
    assert (int8_home / CHOICE_FILE).read_text() == kept  # nothing was timed again
    other = select(threads=2)  # other threads: a choice of its own, kept beside the first
    assert other["variants_timed_at"] != first["variants_timed_at"]
    forced = [c for c in kept_choices(int8_home) if set(c["key"]["runtimes"]) == {"onnxruntime"}]
    assert sorted(c["key"]["threads"] for c in forced) == [1, 2]  # beside deploy's choice (every runtime)
    again = select(threads=1, retime=True)
    assert again["variants_timed_at"] > first["variants_timed_at"]
    assert {c["key"]["threads"]: c["timed_at"] for c in forced}[1] < again["variants_timed_at"]
    assert again["variants_timed_at"] in [c["timed_at"] for c in kept_choices(int8_home)]
    shown = status(int8_home)["cpu_graph_choices"]  # what `edge status` reports for the active bundle
    assert (1, again["precision"], "infer", again["variants_timed_at"]) in {
        (c["threads"], c["chosen"], c["for"], c["timed_at"]) for c in shown
    }


def test_a_kept_choice_of_a_graph_the_bundle_lacks_or_an_unreadable_file_times_the_graphs_again(int8_home, caplog):
    def select():
        return select_backend(active_bundle(int8_home), int8_home, force="onnxruntime-cpu", threads=1).report()

    first = select()
    choices = kept_choices(int8_home)
    for choice in choices:
        choice["chosen"] = "bf16"  # this bundle has no bf16 variant: a kept choice naming it is not trusted
    (int8_home / CHOICE_FILE).write_text(json.dumps({"choices": choices}))
    with caplog.at_level(logging.WARNING, logger="cmdfed.edge"):
        second = select()
    assert second["precision"] in ("fp32", "int8") and second["variants_timed_at"] > first["variants_timed_at"]
    assert any("has not gated; timing the graphs again" in r.getMessage() for r in caplog.records)
    assert second["variants_timed_at"] in [c["timed_at"] for c in kept_choices(int8_home)]
    (int8_home / CHOICE_FILE).write_text("{half a file")
    third = select()
    assert third["variants_timed_at"] > second["variants_timed_at"]
    assert [c["timed_at"] for c in kept_choices(int8_home)] == [third["variants_timed_at"]]


def test_graphs_are_timed_only_once_the_callers_concurrent_work_is_done(int8_home):
    """``quiet``: edge infer selects while it finds a slide's tissue; the timing waits for that."""
    done = threading.Event()
    result = {}

    def select(**options) -> None:
        bundle = active_bundle(int8_home)
        result["selection"] = select_backend(bundle, int8_home, force="onnxruntime-cpu", quiet=done.wait, **options)

    timing = threading.Thread(target=select, kwargs={"threads": 1, "retime": True})
    timing.start()
    timing.join(timeout=10)  # loading and checking the graphs takes ~1 s: it is waiting by now
    assert timing.is_alive() and "selection" not in result  # loaded and checked, waiting to time
    before = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    done.set()
    timing.join(timeout=120)
    timed_at = result["selection"].report()["variants_timed_at"]
    assert timed_at >= before
    done.clear()  # the choice just kept is used as it is: nothing to time, so nothing to wait for
    reuse = threading.Thread(target=select, kwargs={"threads": 1})
    reuse.start()
    reuse.join(timeout=60)
    assert not reuse.is_alive() and result["selection"].report()["variants_timed_at"] == timed_at
