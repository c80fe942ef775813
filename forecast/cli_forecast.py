"""``forecast forecast SENSOR...``: a forecast now, or of a posted series, with what-if
next values (registered by :mod:`forecast.cli`).

It asks the running gateway (``POST /v1/forecast``): on the embedded default the store
belongs to the running process, the gateway holds the loaded models and the answer
cache, and a key's scope applies as it does over HTTP. The gateway is ``--url``, else
the running engine that owns this data directory, else ``FORECAST_HTTP_HOST`` and
``FORECAST_HTTP_PORT``; the key is ``--key``, else ``FORECAST_API_KEY``, else the
running engine's own process token.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import click
import orjson

from forecast.cli_common import command, settings_from_env
from forecast.errors import ForecastError


@command(None, "forecast")
@click.argument("sensors", nargs=-1)
@click.option(
    "--series",
    "series_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Forecast these readings instead of the stored ones: CSV (ts,value[,sensor_id]) "
    "or JSON (a list of readings, or a body's series list).",
)
@click.option("--horizon", type=click.IntRange(1), help="Steps (default: the model's horizon).")
@click.option("--model-version", type=click.IntRange(1), help="A registry version.")
@click.option("--model", "model_name", help="The model's name (with --model-version).")
@click.option("--what-if-next", help="Assumed next readings of every sensor, e.g. 31.2,30.8.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option("--url", help="The gateway (default: the running engine's, else the settings').")
@click.option("--key", help="An API key (default: FORECAST_API_KEY).")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds.")
def forecast(
    sensors: tuple[str, ...],
    series_file: Path | None,
    horizon: int | None,
    model_version: int | None,
    model_name: str | None,
    what_if_next: str | None,
    fmt: str,
    url: str | None,
    key: str | None,
    timeout: float,
) -> None:
    """Forecast SENSOR... now from their stored readings, or the --series file."""
    body = request_body(sensors, series_file, horizon, model_version, model_name, what_if_next)
    answer = _post(body, url, key, timeout)
    click.echo(render(answer, fmt), nl=False)


def request_body(
    sensors: tuple[str, ...],
    series_file: Path | None,
    horizon: int | None,
    model_version: int | None,
    model_name: str | None,
    what_if_next: str | None,
) -> dict:
    """The ``POST /v1/forecast`` body the options describe."""
    body: dict = {}
    if series_file is None:
        if not sensors:
            raise ForecastError("name at least one SENSOR, or give --series FILE")
        body["sensors"] = list(sensors)
    else:
        body["series"] = read_series(series_file, sensors)
    ids = body.get("sensors") or [s["sensor_id"] for s in body["series"]]
    if horizon is not None:
        body["horizon"] = horizon
    if model_version is not None:
        body["model_version"] = model_version
    if model_name is not None:
        body["model"] = model_name
    if what_if_next:
        try:
            values = [float(v) for v in what_if_next.split(",") if v.strip()]
        except ValueError:
            raise ForecastError(f"--what-if-next: not numbers: {what_if_next!r}") from None
        body["what_if"] = {"next_values": dict.fromkeys(ids, values)}
    return body


def read_series(path: Path, sensors: tuple[str, ...]) -> list[dict]:
    """Series from a CSV (``ts,value`` and optionally ``sensor_id``) or a JSON file; a file
    without sensor ids is the one SENSOR named."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ForecastError(f"{path}: not JSON: {exc}") from None
        if isinstance(doc, dict):
            doc = doc.get("series", doc.get("readings"))
        if not isinstance(doc, list) or not doc:
            raise ForecastError(f"{path}: a list of readings or of series")
        if all(isinstance(item, dict) and "readings" in item for item in doc):
            return doc
        rows = doc
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or not {"ts", "value"} <= set(rows[0]):
            raise ForecastError(f"{path}: a CSV with columns ts,value (and sensor_id)")
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise ForecastError(f"{path}: every reading is an object with ts and value")
        sensor = row.get("sensor_id") or _one(sensors, path)
        grouped.setdefault(sensor, []).append(
            {"ts": _number(row.get("ts")), "value": _number(row.get("value"))}
        )
    return [{"sensor_id": sensor, "readings": readings} for sensor, readings in grouped.items()]


def _one(sensors: tuple[str, ...], path: Path) -> str:
    if len(sensors) != 1:
        raise ForecastError(f"{path} has no sensor_id: name exactly one SENSOR for it")
    return sensors[0]


def _number(raw: object) -> object:
    """CSV text as a number where it is one (RFC 3339 times stay text)."""
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return raw
    return raw


def _post(body: dict, url: str | None, key: str | None, timeout: float) -> dict:
    import httpx

    url, key = _gateway(url, key)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            response = client.post("/v1/forecast", content=orjson.dumps(body))
    except httpx.HTTPError as exc:
        raise ForecastError(f"the gateway at {url} did not answer: {exc}") from None
    try:
        answer = response.json()
    except ValueError:
        raise ForecastError(f"the gateway at {url} answered HTTP {response.status_code}") from None
    if response.status_code != 200:
        problem = answer.get("error", {}) if isinstance(answer, dict) else {}
        raise ForecastError(
            f"{problem.get('code', response.status_code)}: {problem.get('message')}"
        )
    return answer


def _gateway(url: str | None, key: str | None) -> tuple[str, str | None]:
    from sinks import owner

    key = key or os.environ.get("FORECAST_API_KEY") or None
    if url is not None and key is not None:
        return url, key
    settings = settings_from_env()
    running = owner.find(settings.run_dir) if settings.clickhouse_url is None else None
    if url is None:
        url = running.url if running else f"http://{settings.http_host}:{settings.http_port}"
    if key is None and running is not None and running.url == url:
        key = running.token
    return url, key


def render(answer: dict, fmt: str) -> str:
    """The answer as JSON, or a table: one row per sensor and step (what-if beside)."""
    if fmt == "json":
        return orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n"
    items = answer["forecasts"]
    any_what_if = any(item.get("what_if") for item in items)
    head = f"{'sensor':<20} {'model':<12} {'step':>4} {'yhat':>10} {'lower':>10} {'upper':>10}"
    lines = [head + (" what-if yhat" if any_what_if else "")]
    for item in items:
        model = f"{item['model']} v{item['model_version']}"
        what_if = item.get("what_if") or {}
        steps = zip(item["yhat"], item["lower"], item["upper"], strict=True)
        for h, (y, lo, up) in enumerate(steps):
            row = (
                f"{item['sensor_id']:<20} {model:<12} {h + 1:>4} {y:>10.4f} {lo:>10.4f} {up:>10.4f}"
            )
            if any_what_if:
                row += f" {what_if['yhat'][h]:>12.4f}" if what_if else f" {'-':>12}"
            lines.append(row)
    return "\n".join(lines) + "\n"
