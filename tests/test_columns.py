"""The columnar forecasters give their reference forecasters' forecasts, reading for
reading, and their snapshots restore into the reference's dict states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.base import StreamingForecaster
from models.baseline import SeasonalNaive
from models.columns import columns_for, interval_rows
from models.lstm import LinearLSTMNet, LSTMForecaster


def lstm() -> LSTMForecaster:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = LinearLSTMNet(8, 5, 16, rng.normal(size=(8, 5)) * 0.1)
    torch.nn.init.normal_(net.head.weight, std=0.1)
    return LSTMForecaster(net, 1, np.linspace(1, 2, 5))


@pytest.mark.parametrize("forecaster", [SeasonalNaive(horizon=6, season=4), lstm()])
def test_columns_equal_the_reference_with_late_readings_and_growth(
    forecaster: StreamingForecaster,
) -> None:
    rng = np.random.default_rng(1)
    columns = columns_for(forecaster, 2)
    columns.grow(8)
    states = [forecaster.init_state() for _ in range(5)]
    made = 0
    for t in range(60):
        slots = np.sort(rng.choice(5, int(rng.integers(1, 6)), replace=False))
        values = rng.normal(size=len(slots))
        ts = 1.7e9 + 3600 * t + np.zeros(len(slots))
        items = [(states[s], float(v), float(x)) for s, v, x in zip(slots, values, ts, strict=True)]
        want = forecaster.step(items)
        got = columns.advance(slots, values, ts)
        for i, expected in enumerate(want):
            if expected is None:
                assert not got.made[i]
                continue
            assert interval_rows(got, i) == tuple(list(series) for series in expected)
            made += 1
        if t % 7 == 3:  # a late reading, two readings back
            slot, value = int(slots[0]), float(rng.normal())
            forecaster.correct(states[slot], value, 2, False)
            columns.correct(slot, value, 2, False)
    assert made > 50
    for slot, state in enumerate(states):
        doc = columns.to_doc(slot)
        for key, value in state.items():
            if value is None:
                assert doc[key] is None
            else:
                assert np.array_equal(np.asarray(doc[key]), np.asarray(value)), key
        columns.from_doc(slot, doc)
    assert columns.to_docs(np.arange(5))[3].keys() == states[3].keys()


def test_a_prediction_block_writes_the_messages_and_times_of_its_rows() -> None:
    """Byte for byte ``orjson.dumps(p.to_message())``; times rounded as ``datetime`` does
    (``ts * 1e6`` in float64 has too few bits: 11 in 100,000 came out 1 ms off)."""
    import orjson

    from forecast.columns import PredictionBlock, iso_many
    from forecast.schemas import iso

    rng = np.random.default_rng(2)
    ts = np.concatenate([1.7e9 + rng.random(20_000) * 1e8, [1700858911.8859994, 86_400.0]])
    assert iso_many(ts) == [iso(t) for t in ts.tolist()]
    n = 7
    block = PredictionBlock(
        [f"s{i}" for i in range(n)],
        ts[:n],
        1.7e9 + 5.5,
        ["lstm", "baseline"] * 3 + ["lstm"],
        rng.integers(0, 5, n),
        rng.choice([3600.0, 60.5], n),
        rng.normal(size=(n, 3)) * 10,
        rng.normal(size=(n, 3)),
        rng.normal(size=(n, 3)).astype(np.float32).astype(np.float64),
        np.arange(1, n + 1),
    )
    assert block.messages() == [orjson.dumps(p.to_message()) for p in block.rows()]


def test_the_lstm_takes_a_batch_of_rounds_as_it_takes_them_one_by_one() -> None:
    """Slots with full windows, slots whose windows fill within the batch, and different
    numbers of readings each: one recurrent pass per run length equals a step per round."""
    forecaster = lstm()
    rng = np.random.default_rng(2)
    one_by_one, at_once = columns_for(forecaster, 9), columns_for(forecaster, 9)
    for columns in (one_by_one, at_once):  # slots 0-3 warm, 4-8 empty or part full
        for t in range(10):
            slots = np.array([0, 1, 2, 3] + ([4, 5] if t >= 6 else []))
            columns.advance(slots, np.sin(t + slots), 1.7e9 + 3600 * t + 0 * slots)
    readings = {slot: int(rng.integers(1, 12)) for slot in range(9)}
    slots = np.array([s for s, n in readings.items() for _ in range(n)])
    order = rng.permutation(len(slots))
    slots = slots[order]
    values = rng.normal(size=len(slots))
    ts = 1.7e9 + 3600 * (10 + np.arange(len(slots)))
    rank = np.zeros(len(slots), int)
    seen: dict[int, int] = {}
    for i, slot in enumerate(slots.tolist()):
        rank[i] = seen[slot] = seen.get(slot, -1) + 1
    rounds = [np.flatnonzero(rank == k) for k in range(rank.max() + 1)]
    want = [one_by_one.advance(slots[at], values[at], ts[at]) for at in rounds]
    got = at_once.advance_rounds(slots, values, ts, rounds)
    assert sum(int(w.made.sum()) for w in want) > 20
    for w, g in zip(want, got, strict=True):
        assert np.array_equal(w.made, g.made)
        for name in ("yhat", "lower", "upper"):
            np.testing.assert_allclose(getattr(g, name), getattr(w, name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(at_once.h, one_by_one.h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(at_once.c, one_by_one.c, rtol=1e-5, atol=1e-6)
    assert np.array_equal(at_once.window.data, one_by_one.window.data)
