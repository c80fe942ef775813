"""The operator's console in a real browser (Debian's Chromium, headless) against a real
`forecast up`: ETTh1 replayed with a level shift, 1,000 more sensors from a wide CSV, a
tiny LSTM in the registry. Screenshots of each view are saved under the module's
temporary folder (``screens``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pandas as pd
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import ETTH1, System, base_env, start_system, wait_for_model

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
SHIFT_AT, FIRST, ROWS = 250, 400, 440  # the shift's row; rows replayed first; rows in the file
WIDE, WIDE_ROWS, WORST = 1000, 6, "big.s0042"
ETT = [f"ETTh1.{c}" for c in ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")]


@dataclass
class Console:
    system: System
    shifted: Path
    frame: pd.DataFrame
    operator: str
    viewer: str
    ws_port: str
    screens: Path

    def get(self, path: str, token: str | None = None, **params: object) -> dict:
        response = httpx.get(
            f"{self.system.http}{path}",
            params=params,
            headers={"Authorization": f"Bearer {token or self.operator}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response.json()

    def link(self, token: str, view: str = "") -> str:
        """The dashboard link `forecast up` prints, for ``token``."""
        return f"{self.system.http}/#token={token}&ws={self.ws_port}" + (f"&{view}" if view else "")

    def replay(self, *args: str) -> None:
        done = self.system.cli("replay", str(self.shifted), "--prefix", "ETTh1", *args)
        assert done.returncode == 0, done.stderr


def write_data(root: Path) -> tuple[Path, pd.DataFrame, Path, Path]:
    """ETTh1 with every channel 6 standard deviations up from SHIFT_AT on; 1,000 sensors
    of a few hours, one of them jumping between 0 and 100 (the worst to forecast); and
    the first 300 hours of ETTh1 to train a tiny LSTM on."""
    frame = pd.read_csv(ETTH1, nrows=ROWS)
    values = frame.columns[1:]
    frame.loc[SHIFT_AT:, values] += 6 * frame.loc[: SHIFT_AT - 1, values].std()
    shifted = root / "shifted.csv"
    frame.to_csv(shifted, index=False)
    rng = np.random.default_rng(0)
    data = rng.normal(10, 0.1, size=(WIDE_ROWS, WIDE))
    data[:, 42] = [0, 100] * (WIDE_ROWS // 2)
    wide = pd.DataFrame(data, columns=[f"s{i:04d}" for i in range(WIDE)])
    wide.insert(0, "date", pd.date_range("2020-01-01", periods=WIDE_ROWS, freq="h"))
    wide_csv = root / "wide.csv"
    wide.to_csv(wide_csv, index=False)
    short = root / "short.csv"
    short.write_text("\n".join(ETTH1.read_text().splitlines()[:301]) + "\n")
    fresh = pd.DataFrame({"date": pd.date_range("2021-01-01", periods=5, freq="h"), "x": 1.0})
    fresh.to_csv(root / "fresh.csv", index=False)  # too short for the LSTM: the fallback
    return shifted, frame, wide_csv, short


def new_key(system: System, role: str) -> str:
    made = system.cli("keys", "create", "--role", role, "--name", f"console {role}")
    assert made.returncode == 0, made.stderr
    return re.search(r"token:\s+(\S+)", made.stdout).group(1)


def wait_until(what: str, check, within: float = 60.0) -> object:
    deadline = time.monotonic() + within
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    root = tmp_path_factory.mktemp("console")
    shifted, frame, wide, short = write_data(root)
    data_dir = root / "system"
    data_dir.mkdir()
    tiny = ["--horizon", "24", "--lookback", "24", "--hidden", "4", "--epochs", "1"]
    train = subprocess.Popen(  # beside the start-up: a registered LSTM to promote later
        [sys.executable, "-m", "forecast", "train", "--data", str(short), *tiny],
        env=base_env(data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    system = start_system(data_dir, FORECAST_RATE_HTTP="100000/minute")
    try:
        ws_port = system.ws.rsplit(":", 1)[1].split("/")[0]
        running = Console(
            system,
            shifted,
            frame,
            new_key(system, "operator"),
            new_key(system, "viewer"),
            ws_port,
            tmp_path_factory.mktemp("screens"),
        )
        running.replay("--limit", str(FIRST))
        fed = system.cli("replay", str(wide), "--prefix", "big")
        assert fed.returncode == 0, fed.stderr
        assert train.wait(120) == 0, train.stderr.read()[-2000:]
        wait_until(
            "every sensor live",
            lambda: running.get("/v1/console/sensors", limit=1)["total"] == len(ETT) + WIDE,
        )
        wait_until(
            "the shift's drift and the loop's decision",
            lambda: (
                running.get("/v1/drift", sensors="ETTh1.OT")["events"]
                and running.get("/v1/decisions")["decisions"]
            ),
        )
        wait_until(
            "ETTh1.OT stored",
            lambda: len(running.get("/v1/console/sensors/ETTh1.OT")["actuals"]["ts"]) == FIRST,
        )
        yield running
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
        train.stderr.close()
        assert system.stop() == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert errors == []  # no script error on any page


def refresh(page: Page, view: str) -> None:
    """Read the view's data again and wait until it is drawn."""
    before = page.get_attribute(f"#view-{view}", "data-loaded")
    page.evaluate("() => window.__console.refresh()")
    page.wait_for_function(
        f"() => document.querySelector('#view-{view}').dataset.loaded !== '{before}'"
    )


def chart(page: Page) -> dict:
    return page.evaluate("() => window.__console.chart()")


def test_sign_in_with_a_key_and_a_viewer_sees_no_operator_actions(
    console: Console, page: Page
) -> None:
    page.goto(f"{console.system.http}/")
    page.wait_for_selector("#view-signin:not([hidden])")
    assert page.is_hidden("#view-overview")
    page.fill("#token-input", "fk_00000000_not-a-key")
    page.fill("#ws-input", console.ws_port)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('refused')")
    page.fill("#token-input", console.viewer)
    page.screenshot(path=str(console.screens / "signin.png"))
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#view-overview[data-loaded]")
    page.wait_for_selector("#status.live")
    assert page.inner_text("#who").startswith("viewer · ")
    assert page.input_value("#token-input") == ""
    page.wait_for_selector("#models tr[data-model='lstm'][data-version='1']")
    assert page.query_selector("#models button") is None  # no promote for a viewer
    assert page.is_hidden("#rollback")
    assert page.is_hidden("#sql-panel")
    page.click("#signout")
    page.wait_for_selector("#view-signin:not([hidden])")


def test_the_overview_shows_health_the_leaderboard_drift_and_decisions(
    console: Console, page: Page
) -> None:
    page.goto(console.link(console.operator))
    page.wait_for_selector("#view-overview[data-loaded]")
    page.wait_for_selector("#status.live")
    refresh(page, "overview")  # now that this page is a subscriber too
    assert "#token" not in page.url  # the token leaves the address bar
    readings = len(ETT) * FIRST + WIDE * WIDE_ROWS
    assert page.inner_text("[data-metric='readings_total'] .value") == f"{readings:,}"
    assert page.inner_text("[data-metric='sensors'] .value") == f"{len(ETT) + WIDE:,}"
    assert int(page.inner_text("[data-metric='subscribers'] .value")) >= 1  # this page
    assert page.inner_text("[data-metric='serving'] .value") == "baseline"
    board = page.eval_on_selector_all(
        "#leaderboard tbody tr[data-model]", "rows => rows.map(r => r.dataset.model)"
    )
    assert board == ["baseline"]
    shift = console.frame.iloc[SHIFT_AT, 0]
    events = console.get("/v1/drift", sensors="ETTh1.*", limit=25)["events"]
    shown = page.eval_on_selector_all(
        "#drift-timeline tbody tr[data-sensor]",
        "rows => rows.map(r => [r.dataset.sensor, r.cells[0].textContent])",
    )
    assert shown == [[e["sensor_id"], e["ts"][:19].replace("T", " ")] for e in events]
    assert any(e["ts"][:19] >= shift.replace(" ", "T") for e in events)  # the shift is on it
    assert int(page.get_attribute("#drift-chart", "data-hours")) > 0
    decision = page.wait_for_selector("#decisions tbody tr[data-action]")
    links = decision.eval_on_selector_all("a", "links => links.map(a => a.getAttribute('href'))")
    assert links and all(link.startswith("#sensor=ETTh1.") for link in links)
    page.click(f"#drift-timeline a[href='#sensor={quote('ETTh1.OT')}']")
    page.wait_for_selector("#view-sensor:not([hidden])")
    assert page.inner_text("#sensor-title") == "ETTh1.OT"
    page.goto(f"{console.system.http}/#overview")
    page.wait_for_selector("#view-overview[data-loaded]")
    page.screenshot(path=str(console.screens / "overview.png"), full_page=True)


def test_the_sensor_view_draws_actuals_forecast_and_drift_live(
    console: Console, page: Page
) -> None:
    page.goto(console.link(console.operator))
    page.wait_for_selector("#view-overview[data-loaded]")
    page.goto(f"{console.system.http}/#sensor=ETTh1.OT")
    page.wait_for_selector(f"#chart[data-actual-points='{FIRST}'] canvas")
    drawn = chart(page)
    xs, actual = drawn["x"], drawn["actual"]
    shown = [(x, y) for x, y in zip(xs, actual, strict=True) if y is not None]
    times = pd.Series(
        [pd.Timestamp(t, tz="UTC").timestamp() for t in console.frame["date"][:FIRST]]
    )
    assert [x for x, _ in shown] == times.tolist()
    assert np.allclose([y for _, y in shown], console.frame["OT"][:FIRST])
    latest = console.get("/v1/sensors/ETTh1.OT/forecast")
    assert drawn["forecast"]["seq"] == latest["seq"] == FIRST - 1
    assert drawn["origin"] == times.iloc[-1]  # the forecast starts at the last reading
    assert drawn["targets"] == [times.iloc[-1] + 3600 * (h + 1) for h in range(24)]
    at = {x: i for i, x in enumerate(xs)}
    assert [drawn["yhat"][at[t]] for t in drawn["targets"]] == latest["yhat"]
    assert [drawn["lower"][at[t]] for t in drawn["targets"]] == latest["lower"]
    assert [drawn["upper"][at[t]] for t in drawn["targets"]] == latest["upper"]
    assert drawn["scale"]["min"] <= xs[0] and drawn["scale"]["max"] >= drawn["targets"][-1]
    drift = console.get("/v1/drift", sensors="ETTh1.OT")["events"]
    stamps = sorted(pd.Timestamp(e["ts"]).timestamp() for e in drift)
    assert drawn["drift"] == stamps
    shift = pd.Timestamp(console.frame.iloc[SHIFT_AT, 0], tz="UTC").timestamp()
    assert any(shift <= ts <= shift + 2 * 86400 for ts in drawn["drift"])  # the shift, found
    assert [s["model"] for s in drawn["stretches"]] == ["baseline"]
    assert page.inner_text("#sensor-model").startswith("baseline v1")
    assert page.query_selector_all("#online tbody tr td.num")  # online MAE per step
    assert page.evaluate("() => window.__console.subscribed()") == ["ETTh1.OT"]
    page.screenshot(path=str(console.screens / "sensor.png"), full_page=True)

    console.replay("--start", str(FIRST), "--limit", "1")  # one more hour, live
    page.wait_for_function(
        f"() => window.__console.chart().forecast.seq === {FIRST}", timeout=20_000
    )
    assert chart(page)["origin"] == times.iloc[-1] + 3600
    page.wait_for_selector(f"#chart[data-actual-points='{FIRST + 1}']", timeout=20_000)

    page.select_option("#range", "1")  # the history picker: one day, from the HTTP API
    page.wait_for_selector("#chart[data-actual-points='25']")
    page.select_option("#range", "custom")
    page.fill("#range-from", console.frame.iloc[SHIFT_AT - 10, 0].replace(" ", "T"))
    page.fill("#range-to", console.frame.iloc[SHIFT_AT + 10, 0].replace(" ", "T"))
    page.click("#range-form button[type=submit]")
    page.wait_for_selector("#chart[data-actual-points='20']")
    assert chart(page)["forecast"] is None  # a past range shows no live forecast


def test_search_and_sort_a_thousand_sensors_subscribing_only_the_visible(
    console: Console, page: Page
) -> None:
    page.goto(console.link(console.viewer))
    page.wait_for_selector("#view-overview[data-loaded]")
    page.goto(f"{console.system.http}/#sensors")
    page.wait_for_selector("#view-sensors[data-loaded]")

    def ids() -> list[str]:
        return page.eval_on_selector_all(
            "#sensor-list tbody tr[data-sensor]", "rows => rows.map(r => r.dataset.sensor)"
        )

    def reload(action) -> None:
        before = page.get_attribute("#view-sensors", "data-loaded")
        action()
        page.wait_for_function(
            f"() => document.querySelector('#view-sensors').dataset.loaded !== '{before}'"
        )

    reload(lambda: (page.fill("#search", "big.*"), page.press("#search", "Enter")))
    assert page.inner_text("#page-info") == f"1-50 of {WIDE:,}"
    assert ids() == [f"big.s{i:04d}" for i in range(50)]

    def subscribed() -> list[str]:
        return page.evaluate("() => window.__console.subscribed()")

    assert subscribed() == ids()
    reload(lambda: page.select_option("#sort", "error"))
    assert ids()[0] == WORST
    worst = console.get("/v1/console/sensors", match="big.*", sort="error", limit=50)
    assert ids() == [s["sensor_id"] for s in worst["sensors"]]
    reload(lambda: page.click("#next"))
    assert page.inner_text("#page-info") == f"51-100 of {WIDE:,}"
    assert subscribed() == sorted(ids()) and WORST not in ids()
    reload(lambda: (page.fill("#search", "big.s00?1"), page.press("#search", "Enter")))
    assert sorted(ids()) == [f"big.s00{i}1" for i in range(10)]  # still by error
    reload(lambda: (page.fill("#search", "*"), page.select_option("#sort", "drift")))
    last = {}
    for sensor in ETT:
        events = console.get("/v1/drift", sensors=sensor, limit=1)["events"]
        last[sensor] = events[0]["ts"] if events else ""
    assert ids()[: len(ETT)] == sorted(ETT, key=last.__getitem__, reverse=True)  # stable
    reload(lambda: page.select_option("#sort", "error"))
    page.screenshot(path=str(console.screens / "sensors.png"), full_page=True)


def test_hostile_text_is_shown_as_text(console: Console, page: Page) -> None:
    page.goto(console.link(console.operator))
    page.wait_for_selector("#view-overview[data-loaded]")
    hostile = '<img src=x onerror="window.__pwned=1">'
    page.goto(f"{console.system.http}/#sensor={quote(hostile)}")
    page.wait_for_selector("#toast:has-text('bad_request')")
    assert page.inner_text("#sensor-title") == hostile
    assert page.query_selector("#view-sensor img") is None
    page.goto(f"{console.system.http}/#overview")
    page.fill("#sql", "SELECT '<b id=bold>x</b>' AS html, 1 AS one")
    page.click("#sql-form button[type=submit]")
    cell = page.wait_for_selector("#sql-result tbody td")
    assert cell.inner_text() == "<b id=bold>x</b>"
    assert page.query_selector("#bold") is None
    assert page.evaluate("() => window.__pwned") is None


def test_light_theme_at_phone_width(console: Console, browser: Browser) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, color_scheme="light", is_mobile=True
    )
    try:
        page = context.new_page()
        page.goto(console.link(console.viewer))
        page.wait_for_selector("#view-overview[data-loaded]")
        assert page.get_attribute("html", "data-theme") == "light"
        background = "() => getComputedStyle(document.body).backgroundColor"
        assert page.evaluate(background) == "rgb(245, 246, 248)"
        page.goto(f"{console.system.http}/#sensor=ETTh1.OT")
        page.wait_for_selector("#chart canvas")
        fits = "() => document.documentElement.scrollWidth <= window.innerWidth"
        assert page.evaluate(fits)  # nothing wider than the phone
        assert page.evaluate("() => document.querySelector('#chart canvas').clientWidth") <= 390
        page.screenshot(path=str(console.screens / "phone-light.png"), full_page=True)
        page.click("#theme")
        assert page.get_attribute("html", "data-theme") == "dark"
        assert page.evaluate(background) == "rgb(15, 20, 25)"
        page.reload()
        page.wait_for_selector("#status")
        assert page.get_attribute("html", "data-theme") == "dark"  # the choice is kept
    finally:
        context.close()


def test_an_operator_promotes_from_the_leaderboard_and_the_stream_switches(
    console: Console, page: Page
) -> None:
    page.goto(console.link(console.operator))
    page.wait_for_selector("#view-overview[data-loaded]")
    row = "#models tr[data-model='lstm'][data-version='1']"
    page.click(f"{row} button[data-stage='production']")
    page.wait_for_selector("#confirm[open]")
    assert "lstm v1 to production" in page.inner_text("#confirm-text")
    page.click("#confirm button[value='cancel']")

    def stages() -> dict:
        return {(m["name"], m["version"]): m["stage"] for m in console.get("/v1/models")["models"]}

    assert stages()[("lstm", 1)] == "registered"  # cancelled: nothing changed
    page.click(f"{row} button[data-stage='production']")
    page.click("#confirm-ok")
    page.wait_for_selector(f"{row}[data-stage='production']")
    assert stages()[("lstm", 1)] == "production"
    wait_for_model(console.system, 1, "production")  # the worker serves it: then replay
    console.replay("--start", str(FIRST + 1), "--limit", "30")
    served = wait_until(
        "an LSTM forecast",
        lambda: (f := console.get("/v1/sensors/ETTh1.OT/forecast"))["model"] == "lstm" and f,
    )
    assert served["model_version"] == 1
    page.goto(f"{console.system.http}/#sensor=ETTh1.OT")
    page.wait_for_function("() => window.__console.chart()?.forecast?.model === 'lstm'")
    page.wait_for_function(
        "() => window.__console.chart().stretches.at(-1).model === 'lstm'", timeout=20_000
    )
    stretches = chart(page)["stretches"]
    assert (stretches[0]["model"], stretches[0]["fallback"]) == ("baseline", False)  # before
    assert {s["model"] for s in stretches} == {"baseline", "lstm"}
    page.screenshot(path=str(console.screens / "sensor-lstm.png"), full_page=True)

    fresh = console.system.cli("replay", str(console.shifted.with_name("fresh.csv")))
    assert fresh.returncode == 0, fresh.stderr
    page.goto(f"{console.system.http}/#sensor=fresh.x")
    page.wait_for_function("() => window.__console.chart()?.sensor === 'fresh.x'")
    page.wait_for_selector("#stretches li.fallback")  # warming up: the baseline serves
    assert [(s["model"], s["fallback"]) for s in chart(page)["stretches"]] == [("baseline", True)]
    page.goto(f"{console.system.http}/#overview")
    page.wait_for_selector("#fallbacks tbody tr:has-text('warming_up')")
    assert page.inner_text("[data-metric='serving'] .value") == "lstm v1"
