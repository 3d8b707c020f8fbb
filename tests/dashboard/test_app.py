"""The dashboard page under Streamlit's AppTest: the numbers and marks each view shows, and
the messages for bad input."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cmdfed.telemetry import SCHEMA_VERSION, TelemetryStore

from .conftest import make_project

APP = Path(__file__).parents[2] / "dashboard" / "app.py"
TIMEOUT_S = 30
TABS = ["Federation", "Privacy", "Models", "Edge fleet", "Slide viewer"]


def run_app(monkeypatch, db: str | Path = "", outputs: str | Path = "", files_root: str | Path = "") -> AppTest:
    monkeypatch.setenv("CMDFED_DASHBOARD_DB", str(db))
    monkeypatch.setenv("CMDFED_DASHBOARD_OUTPUTS", str(outputs))
    monkeypatch.setenv("CMDFED_DASHBOARD_FILES_ROOT", str(files_root))
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert [t.label for t in app.tabs] == TABS
    return app


def metrics(tab) -> dict[str, str]:
    return {m.label: m.value for m in tab.metric}


def charts(tab) -> int:
    return len(tab.get("vega_lite_chart"))


@pytest.fixture(scope="module")
def app(telemetry_db, outputs_root) -> AppTest:
    with pytest.MonkeyPatch.context() as monkeypatch:
        app = run_app(monkeypatch, telemetry_db, outputs_root)
        run = next(s for s in app.sidebar.selectbox if s.label == "Run")
        assert run.value == "run-b"  # the newest run is shown first
        run.set_value("run-a").run()
        assert not app.exception
        yield app


def test_federation_view(app):
    tab = app.tabs[0]
    runs = tab.dataframe[0].value
    assert runs["run_id"].tolist() == ["run-a", "run-b"] and runs["rounds"].tolist() == [3, 1]
    assert metrics(tab) == {
        "Rounds": "3",
        "Sites": "3",
        "Failed or timed out site rounds": "1",
        "Declined for budget": "1",
        "MB on the wire": "4.50",
        "Last eval_aji": "0.6300",
        "Last eval_dice": "0.8100",
        "Last eval_pq": "0.5700",
        "Last train_loss": "0.5000",
    }
    # phases, global curves, heatmap, per-site curves, duration, bytes
    assert charts(tab) == 6
    rounds = tab.expander[0].dataframe[0].value
    assert rounds["duration_s"].tolist() == [100.0, 200.0, 300.0]
    site_rounds = tab.expander[1].dataframe[0].value
    assert site_rounds.loc[site_rounds["status"] == "failed", ["site", "round"]].values.tolist() == [["hosp-c", 2]]


def test_site_filter(app):
    sites = app.sidebar.multiselect[0]
    sites.set_value(["hosp-a"]).run()
    try:
        assert metrics(app.tabs[0])["Sites"] == "1"
        assert app.tabs[1].dataframe[0].value["site"].tolist() == ["hosp-a"]
    finally:
        sites.set_value([]).run()


def test_privacy_view_marks_the_budget(app):
    tab = app.tabs[1]
    assert [e.value for e in tab.error] == ["hosp-b reached its privacy budget: ε 8.00 of 8.00"]
    table = tab.dataframe[0].value.set_index("site")
    assert table["budget"].to_dict() == {
        "hosp-a": "within",
        "hosp-b": "⛔ reached",
        "hosp-c": "within",
    }
    assert table["epsilon"].to_dict() == {"hosp-a": 6.0, "hosp-b": 8.0, "hosp-c": 3.0}
    assert table.loc["hosp-a", ["delta", "noise_multiplier", "max_grad_norm"]].tolist() == [
        1e-5,
        1.1,
        1.0,
    ]
    assert charts(tab) == 1


def test_models_view(app):
    tab = app.tabs[2]
    versions = tab.dataframe[0].value.set_index("version")
    assert versions.loc["cmd-a-r3", ["run_id", "round", "signature", "workstations", "eval_dice"]].tolist() == [
        "run-a",
        3,
        "signed",
        "ws-1",
        0.81,
    ]
    assert versions.loc["cmd-b-r1", "bundle_sha256"] == "2" * 64 and versions.loc["cmd-b-r1", "signature"] == "unsigned"
    deployments = tab.dataframe[1].value
    assert sorted(zip(deployments["workstation"], deployments["version"])) == [
        ("ws-1", "cmd-a-r3"),
        ("ws-2", "cmd-b-r1"),
    ]


def test_models_of_the_selected_run_only(app):
    only_run = next(t for t in app.tabs[2].toggle if t.label == "Only the selected run's versions")
    only_run.set_value(True).run()
    try:
        assert app.tabs[2].dataframe[0].value["version"].tolist() == ["cmd-a-r3"]
    finally:
        only_run.set_value(False).run()


def test_edge_fleet_view_marks_the_stale_workstation(app):
    tab = app.tabs[3]
    assert metrics(tab) == {"Workstations": "2", "Online": "1", "Stale": "1"}
    assert len(tab.warning) == 1 and tab.warning[0].value.startswith("ws-2 is stale: last heartbeat")
    fleet = tab.dataframe[0].value.set_index("workstation")
    assert fleet["state"].to_dict() == {"ws-1": "🟢 online", "ws-2": "🔴 stale"}
    assert fleet.loc[
        "ws-1", ["backend", "gpu", "model_version", "tiles_per_s", "p50_ms", "p95_ms", "errors"]
    ].tolist() == [
        "onnxruntime-cuda",
        "RTX A4000",
        "cmd-a-r3",
        42.5,
        12.0,
        30.0,
        3,
    ]
    assert tab.dataframe[1].value["error"].tolist() == ["CmdfedError: cannot read slide case-2.svs"]
    assert tab.dataframe[2].value["slide_name"].tolist() == ["case-2.svs", "case-1.svs"]
    assert charts(tab) == 1  # errors by reason


def test_slide_viewer(app):
    tab = app.tabs[4]
    assert metrics(tab) == {
        "Slide": "case-1.png",
        "Nuclei": "4",
        "Model version": "cmd-a-r3",
        "Nuclei per mm²": "4000",
    }
    counts = tab.dataframe[0].value
    assert counts.values.tolist() == [["Neoplastic", 3], ["Inflammatory", 1]]
    assert tab.get("image")[0].proto.imgs[0].caption == "over case-1.png (level 0)"
    # written before outputs recorded their slide's place: found by its name beside the folder
    [found] = tab.caption
    assert found.value.startswith("Slide found by its name next to the output folder: `case-1.png`")
    assert charts(tab) == 1
    x_range, y_range = tab.slider
    assert x_range.value == (0, 64) and y_range.value == (0, 64)
    x_range.set_value((0, 32))
    y_range.set_value((0, 32)).run()
    assert not app.exception and app.tabs[4].get("image")[0].proto.imgs[0].caption == "over case-1.png (level 0)"


def test_output_folder_without_geojson(app, outputs_root):
    app.text_input[0].set_value(str(outputs_root / "unfinished")).run()
    try:
        assert len(app.tabs[4].error) == 1 and "has no cells.geojson" in app.tabs[4].error[0].value
    finally:
        app.text_input[0].set_value("").run()


def _text_input(app: AppTest, label_start: str):
    return next(t for t in app.text_input if t.label.startswith(label_start))


def test_output_folders_outside_the_files_root_are_refused(app, outputs_root, tmp_path):
    """The viewer sends what it reads to the browser: only folders under --files-root (here the
    outputs folder, the default) are read, however the path is spelt."""
    shutil.copytree(outputs_root / "case-1", tmp_path / "case-1")
    (tmp_path / "case-1" / "summary.json").unlink()
    escaping = f"case-1/../../{tmp_path.name}/case-1"  # relative paths are taken under the root
    assert (outputs_root / escaping).resolve() == (tmp_path / "case-1").resolve()
    for typed in (str(tmp_path / "case-1"), escaping):
        _text_input(app, "Output folder").set_value(typed).run()
        try:
            tab = app.tabs[4]
            assert len(tab.error) == 1 and "is outside" in tab.error[0].value, typed
            assert "`cmdfed dashboard --files-root DIR`" in tab.error[0].value
            assert not tab.metric and not tab.get("image")  # nothing of the folder was shown
        finally:
            _text_input(app, "Output folder").set_value("").run()


def test_a_slide_outside_the_files_root_is_refused(app, outputs_root, tmp_path):
    shutil.copy(outputs_root / "case-1.png", tmp_path / "secret.png")
    slide = _text_input(app, "Slide file")
    guess = slide.value
    assert guess == str(outputs_root / "case-1.png")
    slide.set_value(str(tmp_path / "secret.png")).run()
    try:
        tab = app.tabs[4]
        assert len(tab.error) == 1 and "is outside" in tab.error[0].value
        caption = tab.get("image")[0].proto.imgs[0].caption
        assert caption == "slide not found: outlines over a blank canvas"
    finally:
        _text_input(app, "Slide file").set_value(guess).run()
    assert app.tabs[4].get("image")[0].proto.imgs[0].caption == "over case-1.png (level 0)"


def _background(tab) -> str:
    return tab.get("image")[0].proto.imgs[0].caption


def _shown_texts(tab) -> list[str]:
    """What the slide viewer puts on the page as text, all of which reaches the browser."""
    kinds = ("caption", "warning", "error", "info", "markdown", "text_input")
    return [e.value for kind in kinds for e in getattr(tab, kind)] + [_background(tab)]


def test_the_recorded_slide_is_shown_without_typing_its_path(monkeypatch, slide_project):
    """`cmdfed edge infer` records where the slide was; the slide lies in another folder than the
    outputs, so only the record leads to it."""
    app = run_app(monkeypatch, outputs=slide_project / "results", files_root=slide_project)
    tab = app.tabs[4]
    assert _background(tab) == "over case-1.png (level 0)" and not tab.warning and not tab.error
    assert _text_input(app, "Slide file").value == str(slide_project / "slides" / "case-1.png")
    [found] = tab.caption
    assert found.value.startswith("Slide found where this output recorded it: `slides/case-1.png`")


def test_a_moved_slide_is_said_and_typing_its_new_path_still_shows_it(monkeypatch, outputs_root, tmp_path):
    project = make_project(tmp_path, outputs_root)
    (project / "archive").mkdir()
    moved = shutil.move(project / "slides" / "case-1.png", project / "archive" / "case-1.png")
    app = run_app(monkeypatch, outputs=project / "results", files_root=project)
    [lost] = app.tabs[4].warning
    assert lost.value.startswith("case-1.png is no longer where this output recorded it")
    assert _background(app.tabs[4]) == "slide not found: outlines over a blank canvas"

    other = project / "archive" / "case-2.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(other)
    _text_input(app, "Slide file").set_value(str(other)).run()  # shown, with a warning
    [differs] = app.tabs[4].warning
    assert differs.value.startswith(f"{other} is not the slide this output was made from (")
    assert _background(app.tabs[4]) == "over case-2.png (level 0)"

    _text_input(app, "Slide file").set_value(str(moved)).run()
    tab = app.tabs[4]
    assert not app.exception and not tab.warning and not tab.error
    assert _background(tab) == "over case-1.png (level 0)"


def test_a_recorded_slide_outside_the_files_root_is_neither_shown_nor_named(monkeypatch, slide_project):
    files_root = slide_project / "results"  # holds the outputs, not the slides
    app = run_app(monkeypatch, outputs=files_root, files_root=files_root)
    tab = app.tabs[4]
    [outside] = tab.warning
    assert outside.value.startswith(f"case-1.png lies outside {files_root}, the only folder")
    assert "`cmdfed dashboard --files-root DIR`" in outside.value
    assert _background(tab) == "slide not found: outlines over a blank canvas"
    assert not [text for text in _shown_texts(tab) if "slides" in text]


def test_auto_refresh(app):
    refresh = next(t for t in app.sidebar.toggle if t.label == "Auto-refresh")
    refresh.set_value(True).run()
    try:
        assert not app.exception
        assert next(s for s in app.sidebar.selectbox if s.label == "Every (seconds)").value == 30
        assert metrics(app.tabs[0])["Rounds"] == "3"
    finally:
        refresh.set_value(False).run()


def _telemetry_errors(app: AppTest) -> list[str]:
    messages = [[e.value for e in tab.error] for tab in app.tabs[:4]]
    assert all(m == messages[0] for m in messages) and len(messages[0]) == 1
    return messages[0][0]


def test_no_store_given(monkeypatch):
    app = run_app(monkeypatch)
    assert "cmdfed dashboard --db" in _telemetry_errors(app)
    assert "`cmdfed edge infer SLIDE --out FOLDER`" in app.tabs[4].info[0].value


def test_missing_store(monkeypatch, tmp_path):
    app = run_app(monkeypatch, tmp_path / "absent.db")
    assert f"no telemetry store at {tmp_path / 'absent.db'}" in _telemetry_errors(app)


def test_empty_database_file(monkeypatch, tmp_path):
    (tmp_path / "empty.db").write_bytes(b"")
    assert "is empty" in _telemetry_errors(run_app(monkeypatch, tmp_path / "empty.db"))


def test_newer_schema(monkeypatch, tmp_path):
    path = tmp_path / "future.db"
    TelemetryStore.open(path, create=True).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (SCHEMA_VERSION + 1,))
    assert "newer than this cmdfed" in _telemetry_errors(run_app(monkeypatch, path))


def test_store_without_data_says_which_command_fills_it(monkeypatch, tmp_path):
    TelemetryStore.open(tmp_path / "new.db", create=True).close()
    app = run_app(monkeypatch, tmp_path / "new.db")
    assert "`cmdfed federate` or `cmdfed simulate`" in app.tabs[0].info[0].value
    assert "`cmdfed federate` or `cmdfed simulate`" in app.tabs[1].info[0].value
    assert "`cmdfed edge export --telemetry DB`" in app.tabs[2].info[0].value
    fleet = [i.value for i in app.tabs[3].info]
    assert "`cmdfed edge serve --telemetry DB`" in fleet[0] and "`cmdfed edge infer SLIDE --telemetry DB`" in fleet[1]
