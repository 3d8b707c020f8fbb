"""The dashboard's queries on the seeded store: the numbers the views show."""

from __future__ import annotations

import pytest

from cmdfed.telemetry import TelemetryStore
from dashboard import queries, slides


@pytest.fixture
def store(telemetry_db):
    with queries.open_store(telemetry_db) as store:
        yield store


def test_runs_and_rounds(store, now):
    runs = queries.runs_table(store)
    assert list(runs["run_id"]) == ["run-a", "run-b"]
    assert list(runs["rounds"]) == [3, 1]
    assert list(queries.runs_table(store, since=now - 1.5 * 3600)["run_id"]) == ["run-b"]
    rounds = queries.rounds_table(store, "run-a")
    assert list(rounds["eval_dice"]) == [0.61, 0.72, 0.81]
    assert list(rounds["duration_s"]) == [100.0, 200.0, 300.0]
    assert rounds["bytes_total"].sum() == 4_500_000
    metrics = queries.metric_columns(rounds, queries.ROUND_COLUMNS)
    assert queries.headline_metrics(metrics) == ["eval_aji", "eval_dice", "eval_pq", "train_loss"]
    timeline = queries.phase_timeline(rounds)
    assert timeline[["phase", "first_round", "last_round"]].values.tolist() == [
        ["pretrain", 1, 1],
        ["finetune", 2, 3],
    ]
    curves = queries.metric_curves(rounds, ["eval_pq"])
    assert curves["value"].tolist() == [0.35, 0.46, 0.57]


def test_site_rounds_and_participation(store):
    site_rounds = queries.site_rounds_table(store, "run-a")
    assert queries.status_counts(site_rounds) == {
        "trained": 7,
        "failed": 1,
        "timed_out": 0,
        "declined_budget": 1,
    }
    cell = queries.participation(site_rounds).set_index(["site", "round"])["status"]
    assert cell["hosp-c", 2] == "failed" and cell["hosp-b", 3] == "declined_budget" and cell["hosp-a", 3] == "trained"
    only_a = queries.site_rounds_table(store, "run-a", sites=["hosp-a"])
    assert set(only_a["site"]) == {"hosp-a"} and only_a["loss"].tolist() == [0.9, 0.8, 0.7]
    assert queries.sites_of(store, ["run-a"]) == ["hosp-a", "hosp-b", "hosp-c"]


def test_privacy_marks_the_site_at_its_budget(store):
    spend = queries.privacy_table(store, "run-a")
    by_site = queries.privacy_by_site(spend, queries.site_rounds_table(store, "run-a")).set_index("site")
    assert by_site["epsilon"].to_dict() == {"hosp-a": 6.0, "hosp-b": 8.0, "hosp-c": 3.0}
    assert by_site["budget_reached"].to_dict() == {"hosp-a": False, "hosp-b": True, "hosp-c": False}
    assert by_site.loc["hosp-c", "last_round"] == 3 and by_site.loc["hosp-a", "budget_used"] == 0.75


def test_a_site_that_declined_below_its_limit_is_marked(tmp_path):
    """A site declines a round when that round's spend would take it over its budget, so it can
    stop at epsilon 7.2 of 8: the decline, not the spend, marks it."""
    cumulative = {"at-limit": [3.0, 6.0, 8.0], "declines": [3.6, 7.2, None], "within": [1.0, 2.0, 3.0]}
    with TelemetryStore.open(tmp_path / "telemetry.db", create=True) as store:
        store.start_run("run-dp", name="dp", config={}, strategy="fedavg", phases=["finetune"], started_at=0.0)
        for rnd in (1, 2, 3):
            store.record_round(
                "run-dp",
                phase="finetune",
                round=rnd,
                started_at=rnd,
                finished_at=rnd + 0.5,
                n_sites=3,
                n_failed=0,
                bytes_sent=1,
                bytes_received=1,
                metrics={},
            )
            for site, epsilons in cumulative.items():
                epsilon = epsilons[rnd - 1]
                store.record_site_round(
                    "run-dp",
                    phase="finetune",
                    round=rnd,
                    site=site,
                    status="declined_budget" if epsilon is None else "trained",
                    n_examples=0 if epsilon is None else 10,
                    metrics={},
                    duration_s=None,
                )
                if epsilon is not None:
                    store.record_privacy(
                        "run-dp",
                        phase="finetune",
                        round=rnd,
                        site=site,
                        epsilon=epsilon,
                        delta=1e-5,
                        noise_multiplier=1.1,
                        max_grad_norm=1.0,
                        budget_epsilon=8.0,
                    )
    with queries.open_store(tmp_path / "telemetry.db") as store:
        spend_table = queries.privacy_table(store, "run-dp")
        by_site = queries.privacy_by_site(spend_table, queries.site_rounds_table(store, "run-dp"))
    by_site = by_site.set_index("site")
    assert by_site["epsilon"].to_dict() == {"at-limit": 8.0, "declines": 7.2, "within": 3.0}
    assert by_site.loc["declines", "budget_used"] == 0.9  # below its limit ...
    assert by_site["budget_reached"].to_dict() == {"at-limit": True, "declines": True, "within": False}


def test_models_fleet_and_inference(store, now):
    assert queries.model_versions_table(store, ["run-b"])["version"].tolist() == ["cmd-b-r1"]
    versions = queries.model_versions_table(store).set_index("version")
    assert versions.loc["cmd-a-r3", ["run_id", "round", "signature", "workstations"]].tolist() == [
        "run-a",
        3,
        "signed",
        "ws-1",
    ]
    assert versions.loc["cmd-b-r1", "signature"] == "unsigned" and versions.loc["cmd-a-r3", "eval_dice"] == 0.81
    fleet = queries.fleet_table(store, now=now).set_index("workstation")
    assert fleet["state"].to_dict() == {"ws-1": "online", "ws-2": "stale"}
    assert fleet.loc["ws-1", ["tiles_per_s", "p50_ms", "p95_ms", "errors"]].tolist() == [
        42.5,
        12.0,
        30.0,
        3,
    ]
    assert queries.fleet_table(store, now=now - 3400)["state"].tolist() == ["online", "online"]
    errors = queries.errors_by_reason(store)
    assert errors.values.tolist() == [
        ["ws-1", "oom", 1],
        ["ws-1", "timeout", 2],
        ["ws-2", "slide_unreadable", 1],
    ]
    recent = queries.recent_errors(queries.inference_table(store))
    assert recent["error"].tolist() == ["CmdfedError: cannot read slide case-2.svs"]
    assert queries.inference_table(store, since=now).empty


def test_output_folder_counts_and_render(outputs_root):
    assert [p.name for p in slides.output_folders(outputs_root)] == ["case-1", "unfinished"]
    output = slides.load_output(outputs_root / "case-1")
    counts = slides.counts_by_type(output)
    assert counts[["type", "count", "colour"]].values.tolist() == [
        ["Neoplastic", 3, "#ff0000"],
        ["Inflammatory", 1, "#00ff00"],
    ]
    blank, note = slides.render(output, side=64)
    assert blank.size == (64, 64) and "blank canvas" in note
    assert blank.getpixel((12, 10)) == (255, 0, 0) and blank.getpixel((5, 5)) == (255, 255, 255)
    over_slide, note = slides.render(output, (0, 0, 32, 32), outputs_root / "case-1.png", side=64)
    assert note == "over case-1.png (level 0)"
    assert over_slide.getpixel((2, 2)) == (200, 200, 200) and over_slide.getpixel((24, 21)) == (
        255,
        0,
        0,
    )
    with pytest.raises(Exception, match="has no cells.geojson"):
        slides.load_output(outputs_root / "unfinished")
