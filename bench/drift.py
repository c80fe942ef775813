"""``forecast bench drift``: detection delay on injected shifts, false alarms without.

Each channel of a wide CSV is replayed through the worker's own pieces: the online
baseline forecasts one step ahead, the residual tracker scores it, and the drift
monitor watches residuals and inputs. Untouched, every event counts as a false alarm
(real data has real changes too, so this is an upper bound). Injected, a level shift of
``shift`` reference standard deviations, or a variance change by ``scale``, starts at
evenly spaced points; the delay is the number of readings until a detector fires (missed
if none within ``patience`` readings).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from forecast.schemas import Prediction, Reading
from models.baseline import SeasonalNaive
from models.data import Series
from streams.drift import SIGNALS, DriftConfig, DriftMonitor
from streams.residuals import ResidualTracker

WARM_UP = 1500  # readings replayed before an injection point


@dataclass
class Report:
    readings: int = 0
    false_alarms: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    delays: dict[tuple[str, str], list[int | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    seconds: float = 0.0

    def per_10k(self, detector: str) -> float:
        return self.false_alarms[detector] / self.readings * 10_000


def replay(values: np.ndarray, ts: np.ndarray, config: DriftConfig) -> list[tuple[int, str]]:
    """(index, detector) of every drift event over one channel."""
    baseline = SeasonalNaive(horizon=1, season=24)
    tracker = ResidualTracker((1,))
    monitor = DriftMonitor(config)
    state, book, events = baseline.init_state(), {}, []
    step = float(np.median(np.diff(ts))) if len(ts) > 1 else 1.0
    for i, (value, t) in enumerate(zip(values.tolist(), ts.tolist(), strict=True)):
        reading = Reading("bench", t, value)
        done = tracker.observe(book, "bench", t, value)
        events += [(i, e.detector) for e in monitor.observe(reading, done[0] if done else None)]
        yhat, lower, upper = baseline.step([(state, value, t)])[0]
        tracker.expect(book, Prediction("bench", t, t, "baseline", 1, step, yhat, lower, upper, i))
    return events


def run(
    series: Series,
    config: DriftConfig,
    injections: int = 3,
    shift: float = 2.0,
    scale: float = 3.0,
    patience: int = 500,
) -> Report:
    started = time.perf_counter()
    report = Report()
    for c in range(series.values.shape[1]):
        values = series.values[:, c]
        report.readings += len(values)
        for _, detector in replay(values, series.ts, config):
            report.false_alarms[detector] += 1
        for at in np.linspace(len(values) * 0.25, len(values) - patience - 1, injections):
            at = int(at)
            before = values[at - config.reference : at]
            for kind in ("level", "variance"):
                changed = values[at - WARM_UP : at + patience].copy()
                after = changed[WARM_UP:]
                if kind == "level":
                    after += shift * before.std()
                else:
                    after[:] = before.mean() + (after - before.mean()) * scale
                fired: dict[str, int] = {}
                for index, detector in replay(
                    changed, series.ts[at - WARM_UP : at + patience], config
                ):
                    if index >= WARM_UP:
                        fired.setdefault(detector, index - WARM_UP)
                for detector in config.detectors:
                    report.delays[(kind, detector)].append(fired.get(detector))
    report.seconds = time.perf_counter() - started
    return report


def summary(report: Report, config: DriftConfig) -> list[str]:
    lines = [
        f"{'detector':<14}{'signal':<14}{'false/10k':>10}"
        f"{'level: hit':>12}{'delay p50':>10}{'variance: hit':>15}{'delay p50':>10}"
    ]
    for detector in config.detectors:
        cells = []
        for kind in ("level", "variance"):
            delays = report.delays[(kind, detector)]
            hit = [d for d in delays if d is not None]
            median = f"{statistics.median(hit):.0f}" if hit else "-"
            cells.append((f"{len(hit)}/{len(delays)}", median))
        lines.append(
            f"{detector:<14}{SIGNALS[detector]:<14}{report.per_10k(detector):>10.1f}"
            f"{cells[0][0]:>12}{cells[0][1]:>10}{cells[1][0]:>15}{cells[1][1]:>10}"
        )
    return lines
