"""The store's behaviour on every backend: SQLite always, PostgreSQL when one can be had."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from cmdfed.errors import CmdfedError
from cmdfed.telemetry import SCHEMA_VERSION, TelemetryStore
from cmdfed.telemetry.schema import T, upgrade


def write_one_of_everything(store: TelemetryStore) -> None:
    store.start_run(
        "run-1",
        name="pannuke fedavg",
        config={"lr": 1e-4, "sites": ["a", "b"]},
        strategy="fedavg",
        phases=["pretrain", "finetune"],
        started_at=1000.0,
    )
    store.record_round(
        "run-1",
        phase="pretrain",
        round=1,
        started_at=1001.0,
        finished_at=1061.5,
        n_sites=2,
        n_failed=1,
        bytes_sent=5_000_000_000,
        bytes_received=123,
        metrics={"loss": 0.7},
    )
    store.record_site_round(
        "run-1",
        phase="pretrain",
        round=1,
        site="a",
        status="trained",
        n_examples=640,
        metrics={"loss": 0.69},
        duration_s=55.0,
    )
    store.record_site_round(
        "run-1",
        phase="pretrain",
        round=1,
        site="b",
        status="timed_out",
        n_examples=0,
        metrics={},
        duration_s=None,
        error="no reply in 600 s",
    )
    store.record_privacy(
        "run-1",
        phase="finetune",
        round=1,
        site="a",
        epsilon=0.8,
        delta=1e-5,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        budget_epsilon=8.0,
    )
    store.record_model_version(
        "v1",
        run_id="run-1",
        round=1,
        metrics={"dice": 0.81, "aji": 0.62, "pq": 0.55},
        checkpoint_sha256="ab" * 32,
    )
    store.record_bundle("v1", sha256="cd" * 32, signed=True, path="bundles/cmd-v1")
    store.record_deployment("ws-1", version="v1", backend="tensorrt", gpu="L4", status="deployed")
    store.heartbeat(
        "ws-1",
        backend="tensorrt",
        gpu="L4",
        model_version="v1",
        tiles_per_s=410.5,
        p50_ms=8.0,
        p95_ms=14.5,
        errors={"decode": 2},
    )
    store.record_inference(
        "ws-1",
        model_version="v1",
        slide_name="S-123.svs",
        n_cells=48211,
        counts_by_type={"neoplastic": 30000, "inflammatory": 18211},
        area_mm2=112.5,
        duration_s=95.0,
        backend="tensorrt",
    )
    store.finish_run("run-1", status="completed", finished_at=2000.0)


def check_one_of_everything(store: TelemetryStore) -> None:
    (run,) = store.runs()
    assert run == {
        "run_id": "run-1",
        "name": "pannuke fedavg",
        "config": {"lr": 1e-4, "sites": ["a", "b"]},
        "strategy": "fedavg",
        "phases": ["pretrain", "finetune"],
        "status": "completed",
        "started_at": 1000.0,
        "finished_at": 2000.0,
    }
    (rnd,) = store.rounds("run-1")
    assert {k: rnd[k] for k in ("phase", "round", "n_sites", "n_failed", "bytes_sent")} == {
        "phase": "pretrain",
        "round": 1,
        "n_sites": 2,
        "n_failed": 1,
        "bytes_sent": 5_000_000_000,
    }
    assert (rnd["started_at"], rnd["finished_at"], rnd["metrics"]) == (
        1001.0,
        1061.5,
        {"loss": 0.7},
    )
    a, b = store.site_rounds("run-1")
    assert (a["site"], a["status"], a["n_examples"], a["metrics"], a["error"]) == (
        "a",
        "trained",
        640,
        {"loss": 0.69},
        None,
    )
    assert (b["site"], b["status"], b["duration_s"], b["error"]) == (
        "b",
        "timed_out",
        None,
        "no reply in 600 s",
    )
    (priv,) = store.privacy("run-1")
    assert {k: priv[k] for k in ("phase", "site", "epsilon", "delta", "budget_epsilon")} == {
        "phase": "finetune",
        "site": "a",
        "epsilon": 0.8,
        "delta": 1e-5,
        "budget_epsilon": 8.0,
    }
    (mv,) = store.model_versions()
    assert (mv["version"], mv["run_id"], mv["round"], mv["metrics"]["dice"]) == (
        "v1",
        "run-1",
        1,
        0.81,
    )
    assert mv["checkpoint_sha256"] == "ab" * 32
    (bundle,) = store.bundles()
    assert (bundle["version"], bundle["sha256"], bundle["signed"], bundle["path"]) == (
        "v1",
        "cd" * 32,
        True,
        "bundles/cmd-v1",
    )
    (dep,) = store.deployments()
    assert (dep["workstation"], dep["version"], dep["backend"], dep["gpu"], dep["status"]) == (
        "ws-1",
        "v1",
        "tensorrt",
        "L4",
        "deployed",
    )
    (hb,) = store.heartbeats()
    assert (hb["workstation"], hb["tiles_per_s"], hb["p95_ms"], hb["errors"]) == (
        "ws-1",
        410.5,
        14.5,
        {"decode": 2},
    )
    (ev,) = store.inference_events()
    assert (ev["slide_name"], ev["n_cells"], ev["counts_by_type"]["inflammatory"], ev["error"]) == (
        "S-123.svs",
        48211,
        18211,
        None,
    )
    for row in (mv, bundle, dep, hb, ev, a):
        assert isinstance(row["at"], float) and row["at"] > 1.6e9  # written now, epoch seconds


def test_round_trip_every_table(store_url):
    with TelemetryStore.open(store_url, create=True) as store:
        assert store.schema_version == SCHEMA_VERSION
        write_one_of_everything(store)
        check_one_of_everything(store)
    with TelemetryStore.open(store_url, readonly=True) as store:
        check_one_of_everything(store)
        with pytest.raises(CmdfedError, match="read-only"):
            store.heartbeat(
                "ws-1",
                backend="onnxruntime",
                gpu=None,
                model_version=None,
                tiles_per_s=1.0,
                p50_ms=1.0,
                p95_ms=1.0,
            )


def test_repeated_writes_are_upserts(store_url):
    with TelemetryStore.open(store_url, create=True) as store:
        for attempt in range(2):  # e.g. the server restarted and replayed its last round
            store.start_run(
                "r",
                name=f"try {attempt}",
                config={},
                strategy="fedavg",
                phases=["finetune"],
                started_at=100.0 + attempt,
            )
            store.record_round(
                "r",
                phase="finetune",
                round=3,
                started_at=1.0,
                finished_at=2.0 + attempt,
                n_sites=3,
                n_failed=attempt,
                bytes_sent=10,
                bytes_received=20,
                metrics={"dice": 0.5 + attempt / 10},
            )
            for site in ("a", "b"):
                store.record_site_round(
                    "r",
                    phase="finetune",
                    round=3,
                    site=site,
                    status="trained",
                    n_examples=10 + attempt,
                    metrics={},
                    duration_s=1.0,
                )
                store.record_privacy(
                    "r",
                    phase="finetune",
                    round=3,
                    site=site,
                    epsilon=1.0 + attempt,
                    delta=1e-5,
                    noise_multiplier=1.0,
                    max_grad_norm=1.0,
                    budget_epsilon=None,
                )
            store.record_model_version("v3", run_id="r", round=3, metrics={"try": attempt}, checkpoint_sha256="00")
            store.record_bundle("v3", sha256="ff", signed=bool(attempt), path="b")
        # the same round number in another phase is another round
        store.record_round(
            "r",
            phase="pretrain",
            round=3,
            started_at=1.0,
            finished_at=2.0,
            n_sites=3,
            n_failed=0,
            bytes_sent=0,
            bytes_received=0,
            metrics={},
        )

        (run,) = store.runs()
        assert (run["name"], run["started_at"], run["status"]) == ("try 1", 100.0, "running")
        rounds = store.rounds("r")
        assert [(r["phase"], r["round"]) for r in rounds] == [("finetune", 3), ("pretrain", 3)]
        assert (rounds[0]["n_failed"], rounds[0]["finished_at"], rounds[0]["metrics"]) == (
            1,
            3.0,
            {"dice": 0.6},
        )
        assert [(s["site"], s["n_examples"]) for s in store.site_rounds("r")] == [
            ("a", 11),
            ("b", 11),
        ]
        assert [p["epsilon"] for p in store.privacy("r")] == [2.0, 2.0]
        assert [m["metrics"] for m in store.model_versions()] == [{"try": 1}]
        assert [b["signed"] for b in store.bundles()] == [True]


def test_heartbeats_latest_per_workstation_and_filters(store_url):
    with TelemetryStore.open(store_url, create=True) as store:
        for i in range(3):
            for ws in ("ws-b", "ws-a"):
                store.heartbeat(
                    ws,
                    backend="onnxruntime",
                    gpu=None,
                    model_version=f"v{i}",
                    tiles_per_s=float(i),
                    p50_ms=1.0,
                    p95_ms=2.0,
                )
        latest = store.heartbeats()
        assert [(h["workstation"], h["model_version"]) for h in latest] == [
            ("ws-a", "v2"),
            ("ws-b", "v2"),
        ]
        assert len(store.heartbeats(latest_only=False)) == 6
        assert [h["tiles_per_s"] for h in store.heartbeats(False, workstation="ws-a")] == [0, 1, 2]
        assert store.heartbeats(False, since=datetime(2100, 1, 1, tzinfo=UTC)) == []

        for i in range(5):
            store.record_inference(
                "ws-a",
                model_version="v2",
                slide_name=f"s{i}.svs",
                n_cells=i,
                counts_by_type={},
                area_mm2=None,
                duration_s=None,
                backend=None,
            )
        assert [e["slide_name"] for e in store.inference_events(limit=2)] == ["s4.svs", "s3.svs"]
        assert len(store.inference_events(limit=None)) == 5


def test_relayed_reports_keep_the_time_they_were_taken(store_url):
    with TelemetryStore.open(store_url, create=True) as store:
        store.heartbeat(
            "ws-1",
            backend="tensorrt",
            gpu="L4",
            model_version="v1",
            tiles_per_s=None,
            p50_ms=None,
            p95_ms=None,
            at=1_700_000_000.0,
        )
        store.record_inference(
            "ws-1",
            model_version="v1",
            slide_name="a.svs",
            n_cells=1,
            counts_by_type={},
            area_mm2=None,
            duration_s=None,
            backend=None,
            at=datetime(2024, 1, 2, tzinfo=UTC),
        )
        assert [h["at"] for h in store.heartbeats()] == [1_700_000_000.0]
        assert [e["at"] for e in store.inference_events()] == [datetime(2024, 1, 2, tzinfo=UTC).timestamp()]


def test_a_batch_records_all_of_its_writes_or_none(store_url):
    def beat(store: TelemetryStore, ws: str) -> None:
        store.heartbeat(
            ws, backend="tensorrt", gpu=None, model_version=None, tiles_per_s=None, p50_ms=None, p95_ms=None
        )

    with TelemetryStore.open(store_url, create=True) as store:
        with pytest.raises(ValueError, match="naive datetime"), store.batch():
            beat(store, "ws-1")
            store.record_inference(
                "ws-1",
                model_version=None,
                slide_name="a.svs",
                n_cells=None,
                counts_by_type={},
                area_mm2=None,
                duration_s=None,
                backend=None,
                at=datetime(2024, 1, 2),
            )
        assert store.heartbeats(latest_only=False) == [] and store.inference_events() == []
        with store.batch():
            beat(store, "ws-1")
            beat(store, "ws-2")
        assert [h["workstation"] for h in store.heartbeats(latest_only=False)] == ["ws-1", "ws-2"]
        beat(store, "ws-3")  # after the batch, writes are their own transactions again
        assert len(store.heartbeats(latest_only=False)) == 3


def test_inference_events_keep_no_folders(store_url):
    with TelemetryStore.open(store_url, create=True) as store:
        store.record_inference(
            "ws-1",
            model_version="v1",
            slide_name="/mnt/scans/patient-0042/S 1.svs",
            n_cells=0,
            counts_by_type={},
            area_mm2=None,
            duration_s=None,
            backend="onnxruntime",
            error="OpenSlideError: cannot open '/mnt/scans/patient-0042/S 1.svs' "
            r"(cache C:\Users\lab\patient-0042\tmp.bin)",
        )
        store.record_site_round(
            "r",
            phase="finetune",
            round=1,
            site="a",
            status="failed",
            n_examples=0,
            metrics={},
            duration_s=0.1,
            error="FileNotFoundError: /data/site-a/patient-9/tiles.zarr",
        )
        (ev,) = store.inference_events()
        (site,) = store.site_rounds("r")
    assert ev["slide_name"] == "S 1.svs"
    for text in (ev["error"], site["error"]):
        assert "patient" not in text and "/" not in text and "\\" not in text
    assert "tmp.bin" in ev["error"] and "tiles.zarr" in site["error"]


def test_values_are_checked(store_url):
    with TelemetryStore.open(store_url, create=True) as store:
        with pytest.raises(ValueError, match="site status"):
            store.record_site_round(
                "r",
                phase="p",
                round=1,
                site="a",
                status="done",
                n_examples=0,
                metrics={},
                duration_s=None,
            )
        with pytest.raises(ValueError, match="run status"):
            store.finish_run("r", status="ok")
        with pytest.raises(CmdfedError, match="no run 'nope'"):
            store.finish_run("nope", status="failed")
        with pytest.raises(ValueError, match="naive"):
            store.start_run("r", name="n", config={}, strategy="s", phases=[], started_at=datetime(2025, 1, 1))
        store.start_run(
            "r",
            name="n",
            config={},
            strategy="s",
            phases=[],
            started_at=datetime(2025, 1, 1, tzinfo=UTC),
        )
        assert store.runs()[0]["started_at"] == 1735689600.0


def test_numpy_metrics_are_stored_as_plain_json(store_url):
    np = pytest.importorskip("numpy")
    with TelemetryStore.open(store_url, create=True) as store:
        store.record_model_version(
            "v1",
            run_id=None,
            round=None,
            checkpoint_sha256="0",
            metrics={"dice": np.float32(0.5), "per_class": np.array([1, 2]), "n": np.int64(3)},
        )
        assert store.model_versions()[0]["metrics"] == {"dice": 0.5, "per_class": [1, 2], "n": 3}


def test_migration_from_v1_keeps_data(store_url, raw_engine):
    engine = raw_engine(store_url)
    with engine.begin() as conn:  # a store as the first release of cmdfed left it
        assert upgrade(conn, target=1) == 1
        conn.execute(
            T["runs"].insert(),
            {
                "run_id": "old",
                "name": "old run",
                "config": "{}",
                "strategy": "fedavg",
                "phases": '["pretrain"]',
                "status": "completed",
                "started_at": 1.0,
                "finished_at": 2.0,
            },
        )
        conn.execute(
            T["heartbeats"].insert(),
            {"workstation": "ws-1", "backend": "onnxruntime", "errors": "{}", "at": 3.0},
        )
    engine.dispose()

    with pytest.raises(CmdfedError, match="older .* cannot be upgraded read-only"):
        TelemetryStore.open(store_url, readonly=True)

    with TelemetryStore.open(store_url) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        assert store.runs()[0]["name"] == "old run"
        assert store.heartbeats()[0]["at"] == 3.0
        store.heartbeat(
            "ws-1",
            backend="onnxruntime",
            gpu=None,
            model_version=None,
            tiles_per_s=None,
            p50_ms=None,
            p95_ms=None,
        )
        assert len(store.heartbeats(latest_only=False)) == 2

    with engine.connect() as conn:
        versions = conn.execute(sa.select(T["schema_version"].c.version)).scalars().all()
        indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("heartbeats")}
    assert sorted(versions) == [1, 2]
    assert {"ix_heartbeats_workstation", "ix_heartbeats_at"} <= indexes
    TelemetryStore.open(store_url, readonly=True).close()  # current now: readable


def test_newer_schema_is_refused(store_url, raw_engine):
    with TelemetryStore.open(store_url, create=True) as store:
        target = store.target
        store.heartbeat(
            "ws-1",
            backend="onnxruntime",
            gpu=None,
            model_version=None,
            tiles_per_s=None,
            p50_ms=None,
            p95_ms=None,
        )
    with raw_engine(store_url).begin() as conn:
        conn.execute(
            T["schema_version"].insert(),
            {"version": SCHEMA_VERSION + 7, "description": "from the future", "applied_at": 0.0},
        )
    for kwargs in ({}, {"readonly": True}, {"create": True}):
        with pytest.raises(CmdfedError) as err:
            TelemetryStore.open(store_url, **kwargs)
        message = str(err.value)
        assert target in message and "upgrade cmdfed" in message
        assert f"schema version {SCHEMA_VERSION + 7}" in message


def test_empty_database_needs_create(store_url):
    if "://" not in store_url:
        open(store_url, "wb").close()  # an empty file is an empty SQLite database
    for kwargs, expected in (({}, "create=True"), ({"readonly": True}, "cmdfed server")):
        with pytest.raises(CmdfedError, match=expected):
            TelemetryStore.open(store_url, **kwargs)
    with TelemetryStore.open(store_url, create=True) as store:
        assert store.runs() == []


def test_someone_elses_database_is_refused(store_url, raw_engine):
    with raw_engine(store_url).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE heartbeats (x INTEGER)")
    with pytest.raises(CmdfedError, match="not a cmdfed telemetry store"):
        TelemetryStore.open(store_url, create=True)
