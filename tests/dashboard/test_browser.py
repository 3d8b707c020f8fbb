"""End to end in a real browser: `cmdfed dashboard` serves the seeded store and Chromium
(headless, Debian's /usr/bin/chromium driven by Playwright) renders its charts and tables.
Screenshots are left in test-artifacts/ (dashboard.png: the federation view; -fleet, -slide,
-recorded-slide)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cmdfed.telemetry import TelemetryStore

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
STARTUP_TIMEOUT_S = 60

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"cmdfed dashboard exited with {server.returncode}: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"cmdfed dashboard did not answer at {url} within {STARTUP_TIMEOUT_S} s")


@contextmanager
def _dashboard(db: Path, tmp_path: Path, *options: str) -> Iterator[str]:
    """`cmdfed dashboard` serving ``db``, stopped on exit; yields its URL."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cmdfed", "dashboard", "--db", str(db), *options, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},  # no ~/.streamlit of the user's
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def dashboard_url(telemetry_db, outputs_root, tmp_path):
    with _dashboard(telemetry_db, tmp_path, "--outputs", str(outputs_root)) as url:
        yield url


@pytest.fixture
def chromium():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _wait_drawn(page) -> None:
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)


def test_dashboard_in_chromium(dashboard_url, chromium):
    ARTIFACTS.mkdir(exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 2200})
    page.goto(dashboard_url)
    _wait_drawn(page)
    page.wait_for_selector(
        '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg',
        timeout=30_000,
    )
    page.wait_for_selector('[data-testid="stDataFrame"]', timeout=30_000)
    assert page.get_by_text("MB on the wire").is_visible()
    assert page.locator('[data-testid="stMetricValue"]').first.inner_text() == "1"  # run-b: 1 round
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    page.get_by_role("tab", name="Edge fleet").click()
    page.get_by_text("ws-2 is stale").wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "dashboard-fleet.png"), full_page=True)
    page.get_by_role("tab", name="Slide viewer").click()
    page.get_by_text("over case-1.png (level 0)").wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "dashboard-slide.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_the_slide_viewer_finds_the_recorded_slide_in_chromium(telemetry_db, slide_project, tmp_path, chromium):
    """The output folder and the slide lie in different folders under --files-root: the viewer
    shows the slide behind the nuclei from the output's record, nothing typed."""
    options = ("--outputs", str(slide_project / "results"), "--files-root", str(slide_project))
    with _dashboard(telemetry_db, tmp_path, *options) as url:
        ARTIFACTS.mkdir(exist_ok=True)
        page = chromium.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(url)
        _wait_drawn(page)
        page.get_by_role("tab", name="Slide viewer").click()
        page.get_by_text("over case-1.png (level 0)").wait_for(timeout=30_000)
        # Both are drawn in the same rerun as the caption, but may reach the page a moment later.
        page.get_by_text("Slide found where this output recorded it").wait_for(timeout=30_000)
        expect = pytest.importorskip("playwright.sync_api").expect
        expect(page.get_by_label("Slide file (for the background)")).to_have_value(
            str(slide_project / "slides" / "case-1.png"), timeout=30_000
        )
        page.screenshot(path=str(ARTIFACTS / "dashboard-recorded-slide.png"), full_page=True)


def _record_run(db: Path, run_id: str, name: str, rounds: int) -> None:
    with TelemetryStore.open(db, create=True) as store:
        start = time.time()
        store.start_run(run_id, name=name, config={}, strategy="fedavg", phases=["finetune"], started_at=start)
        for rnd in range(1, rounds + 1):
            store.record_round(
                run_id,
                phase="finetune",
                round=rnd,
                started_at=start,
                finished_at=start + 1,
                n_sites=2,
                n_failed=0,
                bytes_sent=1000,
                bytes_received=1000,
                metrics={"eval_dice": 0.5},
            )


def test_auto_refresh_follows_a_store_and_runs_that_appear_later(tmp_path, chromium):
    """A dashboard opened before the federation started: auto-refresh (which reruns only the tabs)
    picks up the store once it exists, then a newer run, without reloading the page."""
    db = tmp_path / "run" / "telemetry.db"
    with _dashboard(db, tmp_path) as url:
        page = chromium.new_page(viewport={"width": 1400, "height": 1400})
        page.goto(url)
        _wait_drawn(page)
        page.get_by_text(f"no telemetry store at {db}").first.wait_for(timeout=30_000)
        page.get_by_text("Auto-refresh").click()
        page.locator('[data-testid="stSelectbox"]').filter(has_text="Every (seconds)").click()
        page.get_by_role("option", name="10", exact=True).click()
        page.wait_for_timeout(1_000)
        _wait_drawn(page)

        db.parent.mkdir()
        _record_run(db, "run-1", "first", rounds=1)
        _wait_showing(page, "first (run-1)", rounds=1)
        assert page.get_by_text("MB on the wire").is_visible()

        _record_run(db, "run-2", "second", rounds=2)  # the sidebar shows the newest run first
        _wait_showing(page, "second (run-2)", rounds=2)


def _wait_showing(page, run: str, rounds: int, timeout_s: float = 45) -> None:
    """Until the sidebar's run is ``run`` and the federation view counts its ``rounds``."""
    page.wait_for_function(
        """([run, rounds]) => document.querySelector('input[aria-label="Run"]')?.value === run
              && document.querySelector('[data-testid="stMetricValue"]')?.innerText === rounds""",
        arg=[run, str(rounds)],
        timeout=timeout_s * 1000,
    )
