"""The live dashboard in a real browser (Debian's Chromium, headless)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import ETTH1, System

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_dashboard_draws_live_forecasts(system: System, tmp_path: Path) -> None:
    ws_port = system.ws.rsplit(":", 1)[1].split("/")[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(f"{system.http}/#token={system.viewer_token}&ws={ws_port}")
            page.wait_for_selector("#status.live", timeout=15_000)
            replay = system.cli("replay", str(ETTH1), "--limit", "30")
            assert replay.returncode == 0, replay.stderr
            page.wait_for_function(
                """() => [...document.querySelectorAll('.card .seq')]
                          .filter(e => e.textContent === '#29').length === 7""",
                timeout=30_000,
            )
            sensors = page.eval_on_selector_all(
                ".card", "cards => cards.map(c => c.dataset.sensor)"
            )
            assert sorted(sensors) == sorted(
                f"ETTh1.{c}" for c in ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
            )
            path = page.get_attribute('[data-sensor="ETTh1.OT"] .line', "d")
            assert path.startswith("M") and path.count("L") == 23  # 24 forecast steps drawn
            assert page.inner_text("#count") == f"{29 * 7} predictions"
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            browser.close()


def test_dashboard_without_a_token_shows_the_refusal(system: System) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            ws_port = system.ws.rsplit(":", 1)[1].split("/")[0]
            page.goto(f"{system.http}/#ws={ws_port}")
            page.wait_for_selector("#status:has-text('reconnecting')", timeout=15_000)
            assert page.query_selector(".card") is None
        finally:
            browser.close()
