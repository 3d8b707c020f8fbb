"""The README's first command, shortened: the same chain (real SuperLink, three SuperNodes,
`cmdfed federate`, export, deploy, whole-slide inference, edge service) with one round per
phase and one local step, then what it left behind, as the dashboard will read it."""

import json
import sqlite3

import pytest

from cmdfed.demo import QUICK, SITES, _fresh_folder, run_demo
from cmdfed.errors import CmdfedError

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_quick_demo_runs_the_whole_chain(tmp_path):
    lines = []
    summary = run_demo(tmp_path / "demo", size=QUICK, echo=lines.append)
    out = tmp_path / "demo"

    for name in SITES:  # each site: its share of the slide (unlabelled) + its own labelled tiles
        info = summary["stores"][name]
        assert info["labelled"] == QUICK.labelled_tiles and info["tiles"] > info["labelled"]
    assert summary["stores"]["server-eval"]["labelled"] == QUICK.heldout_tiles

    db = sqlite3.connect(summary["federation"]["telemetry"])
    assert db.execute("SELECT name, status FROM runs").fetchall() == [("demo", "completed")]
    rounds = db.execute("SELECT phase, round, n_sites, n_failed FROM rounds ORDER BY round").fetchall()
    assert rounds == [("pretrain", 1, 3, 0), ("finetune", 2, 3, 0)]
    trained = db.execute("SELECT DISTINCT site FROM site_rounds WHERE status = 'trained'").fetchall()
    assert sorted(site for (site,) in trained) == list(SITES)

    (version,) = db.execute("SELECT version FROM bundles WHERE signed = 1").fetchone()
    assert db.execute("SELECT round FROM model_versions WHERE version = ?", (version,)).fetchone() == (2,)
    assert db.execute("SELECT version, status FROM deployments").fetchall()[-1][0] == version
    assert db.execute("SELECT model_version, backend FROM heartbeats").fetchall()[-1] == (version, "onnxruntime-cpu")
    slide_name, n_cells = db.execute("SELECT slide_name, n_cells FROM inference_events WHERE error IS NULL").fetchone()
    assert slide_name == "cmu_small_region.svs"

    slide = summary["slide"]["summary"]
    assert slide["model_version"] == version and slide["backend"]["backend"] == "onnxruntime-cpu"
    assert slide["n_cells"] == n_cells == sum(slide["counts_by_type"].values())
    slide_out = out / "slides" / "cmu_small_region"
    cells = json.loads((slide_out / "cells.geojson").read_text())
    assert cells["type"] == "FeatureCollection" and len(cells["features"]) == n_cells
    assert (slide_out / "labels.ome.zarr").is_dir()
    # the slide lies beside its outputs, under the folder the dashboard command shows files from
    assert slide["slide_file"]["relative_path"] == "../cmu_small_region.svs"
    assert (out / "slides" / "cmu_small_region.svs").is_file()

    commands = (out / "commands.sh").read_text()
    for command in (
        "cmdfed server start",
        "cmdfed client start",
        "cmdfed federate",
        "cmdfed edge export",
        "cmdfed edge deploy",
        "cmdfed edge infer",
        "cmdfed edge serve",
    ):
        assert command in commands and any(line.startswith(f"$ {command}") for line in lines)
    assert summary["dashboard"] == f"cmdfed dashboard --db {out / 'telemetry.db'} --outputs {out / 'slides'}"
    assert json.loads((out / "summary.json").read_text())["slide"]["geojson"] == str(slide_out / "cells.geojson")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("a user's file")
    with pytest.raises(CmdfedError, match="notes.txt.*new or empty folder"):
        run_demo(tmp_path, size=QUICK)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_rerun_starts_from_an_empty_folder(tmp_path):
    """Else the federation would resume the earlier, finished run instead of training."""
    (tmp_path / "commands.sh").write_text("cmdfed ...")
    (tmp_path / "federation" / "round-0004").mkdir(parents=True)
    (tmp_path / "telemetry.db").write_bytes(b"")
    # SQLite leaves these beside the store once the dashboard has opened it (WAL mode)
    (tmp_path / "telemetry.db-wal").write_bytes(b"")
    (tmp_path / "telemetry.db-shm").write_bytes(b"")
    _fresh_folder(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["commands.sh"]  # only the demo's mark


def test_a_rerun_after_an_interrupted_demo_is_accepted(tmp_path):
    """A demo stopped before its first command (fetching samples, writing stores) still marked
    its folder, so the next run empties it instead of refusing it."""
    out = tmp_path / "demo"
    _fresh_folder(out)
    (out / "stores" / "site-a.zarr").mkdir(parents=True)  # ... then Ctrl-C
    _fresh_folder(out)
    assert [p.name for p in out.iterdir()] == ["commands.sh"]
