"""Forecasts on demand and what-if forecasts, from a sensor's stored readings or from a
posted series (``POST /v1/forecast``).

The gateway never reaches into a worker's memory: a sensor's live state is rebuilt from
its latest readings in the store, and :mod:`models.ondemand` runs the streaming path's
arithmetic over them, every series of a request (plain and what-if) in one forward pass.
Models load once from the registry and are reused; the production model is re-read when
the registry changes. Answers are kept a short while, keyed by the request, the model and
each sensor's state (its latest reading time and reading count), so a new reading or a
promotion answers afresh.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from forecast.errors import ForecastRequestError, ModelError, StoreError
from forecast.parsing import Invalid, finite_float, parse_time
from forecast.schemas import iso
from gateway.auth import Principal
from models.base import StreamingForecaster
from models.baseline import SeasonalNaive
from models.ondemand import Made, Series, covariate_names, forecast_many, needed
from models.registry import ModelRef, Registry
from models.tft import TFTForecaster
from sinks.clickhouse import Store
from sinks.schema import DATABASE

MAX_SENSORS = 1000  # sensors or series per request
MAX_READINGS = 10_000  # readings per posted series
MAX_NEXT = 1000  # assumed next readings per sensor
HISTORY = 2048  # stored readings replayed per sensor for a recurrent model
TFT_TAIL = 256  # readings before a TFT's first input row: its EWM feature has converged
SENSOR_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


def bad(message: str, code: str = "bad_request") -> ForecastRequestError:
    return ForecastRequestError(message, code=code)


@dataclass(frozen=True)
class Request:
    """A validated ``POST /v1/forecast`` body (see :func:`parse`)."""

    sensors: tuple[str, ...] = ()
    series: tuple[tuple[str, Series], ...] = ()
    horizon: int | None = None
    model: str | None = None
    model_version: int | None = None
    next_values: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    covariates: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)

    @property
    def ids(self) -> tuple[str, ...]:
        return self.sensors or tuple(sensor for sensor, _ in self.series)


def parse(body: Mapping, now: float | None = None) -> Request:
    """Check a body beyond its JSON shape: sensor ids, readings (as the stream validates
    them), times in increasing order, caps, and overrides naming sensors of the request."""
    now = time.time() if now is None else now
    sensors = tuple(body.get("sensors") or ())
    posted = body.get("series") or ()
    if bool(sensors) == bool(posted):
        raise bad("give either sensors or series (one of them, not empty)")
    if max(len(sensors), len(posted)) > MAX_SENSORS:
        raise bad(f"at most {MAX_SENSORS} sensors or series per request", "too_large")
    series = tuple(_series(item, now) for item in posted)
    ids = sensors or tuple(sensor for sensor, _ in series)
    for sensor in ids:
        _sensor_id(sensor)
    if len(set(ids)) != len(ids):
        raise bad("a sensor is named twice")
    what_if = body.get("what_if") or {}
    next_values = {
        s: _numbers(v, f"what_if.next_values.{s}")
        for s, v in (what_if.get("next_values") or {}).items()
    }
    covariates = {
        s: {name: _numbers(v, f"what_if.covariates.{s}.{name}") for name, v in given.items()}
        for s, given in (what_if.get("covariates") or {}).items()
    }
    for sensor in (*next_values, *covariates):
        if sensor not in ids:
            raise bad(f"what_if names sensor {sensor!r}, which the request does not forecast")
    for sensor, values in next_values.items():
        if len(values) > MAX_NEXT:
            raise bad(f"what_if.next_values.{sensor}: at most {MAX_NEXT} values", "too_large")
    return Request(
        sensors,
        series,
        body.get("horizon"),
        body.get("model"),
        body.get("model_version"),
        next_values,
        covariates,
    )


def _sensor_id(sensor: object) -> str:
    if not isinstance(sensor, str) or not 0 < len(sensor) <= 200 or set(sensor) - SENSOR_ID_CHARS:
        raise bad(f"sensor_id {str(sensor)[:60]!r} is not [A-Za-z0-9_.:-]{{1,200}}")
    return sensor


def _series(item: Mapping, now: float) -> tuple[str, Series]:
    sensor = _sensor_id(item.get("sensor_id"))
    readings = item.get("readings") or ()
    if len(readings) > MAX_READINGS:
        raise bad(f"series {sensor!r}: at most {MAX_READINGS} readings", "too_large")
    if not readings:
        raise bad(f"series {sensor!r} has no readings")
    ts, values = np.empty(len(readings)), np.empty(len(readings))
    for i, reading in enumerate(readings):
        try:
            ts[i] = parse_time(reading.get("ts"))
        except Invalid as exc:
            raise bad(f"series {sensor!r} reading {i}: {exc.detail}") from None
        value = reading.get("value")
        number = None if isinstance(value, bool) else finite_float(value)
        if number is None:
            raise bad(f"series {sensor!r} reading {i}: value must be a finite number")
        values[i] = number
    if ts.min() < 86_400 or ts.max() > now + 86_400:
        raise bad(f"series {sensor!r}: a ts is outside 1970-01-02 .. now + 1 day")
    if len(ts) > 1 and not (np.diff(ts) > 0).all():
        raise bad(f"series {sensor!r}: readings must be in increasing time order")
    return sensor, Series(values, ts)


def _numbers(raw: object, where: str) -> tuple[float, ...]:
    if not isinstance(raw, list | tuple) or not raw:
        raise bad(f"{where}: a non-empty list of numbers")
    out = tuple(None if isinstance(v, bool) else finite_float(v) for v in raw)
    if any(v is None for v in out):
        raise bad(f"{where}: every value must be a finite number")
    return out  # type: ignore[return-value]


class Models:
    """Registry versions loaded once and reused; the production one followed."""

    def __init__(self, registry: Registry | None, horizon: int, season: int, keep: int = 4):
        self.registry = registry
        self.horizon, self.season, self.keep = horizon, season, keep
        self._loaded: OrderedDict[tuple[str, int], StreamingForecaster] = OrderedDict()
        self._production: tuple[float, ModelRef | None] | None = None
        self._baselines: dict[int, SeasonalNaive] = {}
        self._lock = threading.Lock()

    def production(self) -> ModelRef | None:
        if self.registry is None:
            return None
        revision = self.registry.revision()
        if self._production is None or self._production[0] != revision:
            self._production = (revision, self.registry.stage("production"))
        return self._production[1]

    def get(self, name: str, version: int) -> StreamingForecaster:
        with self._lock:
            found = self._loaded.get((name, version))
            if found is None:
                if self.registry is None:
                    raise bad("this process serves no model registry", "unknown_model")
                try:
                    found = self.registry.load(name, version)
                except ModelError as exc:
                    raise bad(exc.message, "unknown_model") from None
                self._loaded[(name, version)] = found
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end((name, version))
            return found

    def baseline(self, horizon: int) -> SeasonalNaive:
        """The stream's fallback for a production model of ``horizon`` steps."""
        if horizon not in self._baselines:
            self._baselines[horizon] = SeasonalNaive(horizon=horizon, season=self.season)
        return self._baselines[horizon]

    def choose(self, name: str | None, version: int | None) -> tuple[StreamingForecaster, bool]:
        """The model a request names (True) or the production one, else the baseline."""
        if version is None and name is None:
            ref = self.production()
            if ref is None:
                return self.baseline(self.horizon), False
            return self.get(ref.name, ref.version), False
        if version is None:
            raise bad("model needs model_version")
        if self.registry is None:
            raise bad("this process serves no model registry", "unknown_model")
        if name is None:
            name = self._name_of(version)
        return self.get(name, version), True

    def _name_of(self, version: int) -> str:
        ref = self.production()
        if ref is not None and (self.registry.root / ref.name / f"v{version}").is_dir():
            return ref.name
        names = sorted(p.parent.name for p in self.registry.root.glob(f"*/v{version}"))
        if len(names) != 1:
            which = "no model has" if not names else f"{', '.join(names)} have"
            raise bad(f"{which} version {version}; name the model", "unknown_model")
        return names[0]


class Answers:
    """A small LRU of answers for ``ttl`` seconds."""

    def __init__(self, size: int = 256, ttl: float = 30.0) -> None:
        self.size, self.ttl = size, ttl
        self._items: OrderedDict[bytes, tuple[float, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: bytes) -> dict | None:
        with self._lock:
            found = self._items.get(key)
            if found is None or time.monotonic() - found[0] > self.ttl:
                self._items.pop(key, None)
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return found[1]

    def put(self, key: bytes, answer: dict) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), answer)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class OnDemand:
    """Answers ``POST /v1/forecast`` bodies (blocking: run it in a thread)."""

    def __init__(
        self,
        registry: Registry | None,
        store: Store | None,
        horizon: int = 24,
        season: int = 24,
        history: int = HISTORY,
        cache: Answers | None = None,
    ) -> None:
        self.models = Models(registry, horizon, season)
        self.store = store
        self.history = history
        self.answers = cache or Answers()

    def answer(self, body: Mapping, who: Principal) -> dict:
        request = parse(body)
        for sensor in request.ids:
            if not who.sees(sensor):
                if request.sensors:
                    raise bad(f"no readings of sensor {sensor!r}", "unknown_sensor")
                raise bad(f"this key may not forecast sensor {sensor!r}", "out_of_scope")
        model, named = self.models.choose(request.model, request.model_version)
        horizon = self._horizon(request, model)
        self._check_overrides(request, model, horizon)
        state = self._state(request.sensors) if request.sensors else {}
        key = _key(body, model, state)
        cached = self.answers.get(key)
        if cached is not None:
            return cached
        if request.sensors:
            series = self._stored(request.sensors, state, model)
        else:
            series = dict(request.series)
        answer = {"forecasts": self._forecasts(request, series, model, named, horizon)}
        self.answers.put(key, answer)
        return answer

    # -- checks ------------------------------------------------------------------------

    @staticmethod
    def _horizon(request: Request, model: StreamingForecaster) -> int:
        horizon = model.horizon if request.horizon is None else request.horizon
        if isinstance(horizon, bool) or not isinstance(horizon, int):
            raise bad("horizon must be an integer", "bad_horizon")
        if not 1 <= horizon <= model.horizon:
            raise bad(
                f"horizon {horizon} is outside 1..{model.horizon} ({model.name} "
                f"v{model.version} forecasts {model.horizon} steps)",
                "bad_horizon",
            )
        return horizon

    @staticmethod
    def _check_overrides(request: Request, model: StreamingForecaster, horizon: int) -> None:
        if not request.covariates:
            return
        takes = covariate_names(model)
        if not takes:
            raise bad(
                f"{model.name} v{model.version} takes no future covariates; only next "
                "values can be assumed for it",
                "unsupported_override",
            )
        for sensor, given in request.covariates.items():
            for name, values in given.items():
                if name not in takes:
                    raise bad(
                        f"{model.name} v{model.version} has no future covariate {name!r}; "
                        f"it takes {', '.join(takes)}",
                        "unsupported_override",
                    )
                if len(values) > horizon:
                    raise bad(f"what_if.covariates.{sensor}.{name}: at most {horizon} values")

    # -- live state --------------------------------------------------------------------

    def _state(self, sensors: Sequence[str]) -> dict[str, tuple[float, int]]:
        """Each sensor's latest reading time and reading count (its state's identity)."""
        store = self._need_store()
        rows = store.query(
            f"SELECT sensor_id, toFloat64(max(ts)), count() FROM {DATABASE}.readings "
            "WHERE sensor_id IN {ids:Array(String)} GROUP BY sensor_id",
            {"ids": list(sensors)},
        )
        state = {sensor: (float(ts), int(n)) for sensor, ts, n in rows}
        for sensor in sensors:
            if sensor not in state:
                raise bad(f"no readings of sensor {sensor!r}", "unknown_sensor")
        return state

    def _stored(
        self, sensors: Sequence[str], state: Mapping, model: StreamingForecaster
    ) -> dict[str, Series]:
        """The latest readings of each sensor, as many as the model's state spans."""
        limit = _span(model, self.history)
        rows = self._need_store().query(
            f"""SELECT sensor_id, arraySort(groupArray(toFloat64(ts))),
                       arrayMap(p -> p.2, arraySort(groupArray((toFloat64(ts), value))))
                FROM (SELECT sensor_id, ts, value FROM {DATABASE}.readings
                      WHERE sensor_id IN {{ids:Array(String)}}
                      ORDER BY sensor_id, ts DESC LIMIT {{n:UInt32}} BY sensor_id)
                GROUP BY sensor_id""",
            {"ids": list(sensors), "n": limit},
        )
        found = {
            s: Series(np.asarray(v, np.float64), np.asarray(t, np.float64)) for s, t, v in rows
        }
        missing = [s for s in sensors if s not in found]
        if missing:
            raise bad(f"no readings of sensor {missing[0]!r}", "unknown_sensor")
        return found

    def _need_store(self) -> Store:
        if self.store is None:
            raise StoreError("the store is not served by this process (post series instead)")
        return self.store

    # -- forecasting -------------------------------------------------------------------

    def _forecasts(
        self,
        request: Request,
        series: Mapping[str, Series],
        model: StreamingForecaster,
        named: bool,
        horizon: int,
    ) -> list[dict]:
        ids = request.ids
        for sensor in ids:
            if len(series[sensor].values) < 2:
                raise bad(
                    f"sensor {sensor!r} has one reading; a forecast needs two (its step)",
                    "not_enough_readings",
                )
        what_if = {s: _assumed(series[s], request, s) for s in ids if _overridden(request, s)}
        plain_made, if_made = self._run(model, ids, series, what_if)
        chosen = dict.fromkeys(ids, model)
        short = [s for s in ids if plain_made[s] is None or (s in what_if and if_made[s] is None)]
        if short and named:
            raise bad(
                f"sensor {short[0]!r} has fewer than the {needed(model)} readings "
                f"{model.name} v{model.version} needs",
                "not_enough_readings",
            )
        if short:  # as the stream: the baseline serves a sensor the model cannot yet
            fallback = self.models.baseline(model.horizon)
            plain_more, if_more = self._run(
                fallback, short, series, {s: what_if[s] for s in short if s in what_if}
            )
            for sensor in short:
                chosen[sensor] = fallback
                plain_made[sensor] = plain_more[sensor]
                if sensor in what_if:
                    if_made[sensor] = if_more[sensor]
        failed = [s for s in ids if plain_made[s] is None or (s in what_if and if_made[s] is None)]
        if failed:
            raise bad(
                f"no finite forecast of sensor {failed[0]!r} from these readings", "forecast_failed"
            )
        out = []
        for sensor in ids:
            s, used = series[sensor], chosen[sensor]
            item = {
                "sensor_id": sensor,
                "ts": iso(float(s.ts[-1])),
                "model": used.name,
                "model_version": int(used.version),
                "step_seconds": s.step,
                **_cut(plain_made[sensor], horizon),
                "what_if": None,
            }
            if sensor in what_if:
                item["what_if"] = {
                    "ts": iso(float(what_if[sensor].ts[-1])),
                    **_cut(if_made[sensor], horizon),
                }
            out.append(item)
        return out

    @staticmethod
    def _run(
        model: StreamingForecaster,
        ids: Sequence[str],
        series: Mapping[str, Series],
        what_if: Mapping[str, Series],
    ) -> tuple[dict[str, Made | None], dict[str, Made | None]]:
        """Plain and what-if forecasts of ``ids`` in one pass of ``model``."""
        extra = [s for s in ids if s in what_if]
        made = forecast_many(model, [series[s] for s in ids] + [what_if[s] for s in extra])
        made = [m if m is None or _finite(m) else None for m in made]  # unusable, as streamed
        return dict(zip(ids, made[: len(ids)], strict=True)), dict(
            zip(extra, made[len(ids) :], strict=True)
        )


def _span(model: StreamingForecaster, history: int) -> int:
    """Readings that rebuild a sensor's state for ``model``: ``history`` for the LSTM
    (its recurrence carries back to the sensor's first reading), enough for the TFT's
    features and the baseline's error variance to forget where they started."""
    if isinstance(model, SeasonalNaive):
        return min(history, 40 * model.max_season + 1)
    if isinstance(model, TFTForecaster):
        return min(history, needed(model) + TFT_TAIL)
    return history


def _finite(made: Made) -> bool:
    return bool(
        np.isfinite(made.yhat).all() & np.isfinite(made.lower).all() & np.isfinite(made.upper).all()
    )


def _overridden(request: Request, sensor: str) -> bool:
    return sensor in request.next_values or sensor in request.covariates


def _assumed(series: Series, request: Request, sensor: str) -> Series:
    """The series with the assumed next readings (one step apart) and future covariates."""
    nxt = np.asarray(request.next_values.get(sensor, ()), np.float64)
    ts = series.ts[-1] + series.step * np.arange(1, len(nxt) + 1)
    covariates = request.covariates.get(sensor)
    return Series(np.r_[series.values, nxt], np.r_[series.ts, ts], covariates)


def _cut(made: Made, horizon: int) -> dict[str, list[float]]:
    return {
        "yhat": made.yhat[:horizon].tolist(),
        "lower": made.lower[:horizon].tolist(),
        "upper": made.upper[:horizon].tolist(),
    }


def _key(body: Mapping, model: StreamingForecaster, state: Mapping) -> bytes:
    """The cache key: the body, the model and the state each sensor is forecast from."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    digest.update(f"|{model.name}|{model.version}|{id(model)}|".encode())
    digest.update(orjson.dumps(sorted(state.items())))
    return digest.digest()
