"""End to end in a real browser: `cmdfed dashboard` serves the seeded store and Chromium
(headless, Debian's /usr/bin/chromium driven by Playwright) renders its charts and tables.
Screenshots are left in test-artifacts/ (dashboard.png: the federation view; -fleet, -slide)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
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


@pytest.fixture
def dashboard_url(telemetry_db, outputs_root, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cmdfed", "dashboard", "--db", str(telemetry_db), "--outputs", str(outputs_root),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},  # no ~/.streamlit of the user's
    )  # fmt: skip
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


def test_dashboard_in_chromium(dashboard_url):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: apt-get install -y chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (never `playwright install`)"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.goto(dashboard_url)
            page.wait_for_selector(
                '[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000
            )
            page.wait_for_selector(
                '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg',
                timeout=30_000,
            )
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=30_000)
            assert page.get_by_text("MB on the wire").is_visible()
            assert (
                page.locator('[data-testid="stMetricValue"]').first.inner_text() == "1"
            )  # run-b: 1 round
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            page.get_by_role("tab", name="Edge fleet").click()
            page.get_by_text("ws-2 is stale").wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-fleet.png"), full_page=True)
            page.get_by_role("tab", name="Slide viewer").click()
            page.get_by_text("over case-1.png (level 0)").wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-slide.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
