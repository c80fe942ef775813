"""LSTM forecaster on a ridge-initialised linear skip path, streamable step by step.

For a sensor at time t, with ``window`` its last ``lookback`` values, ``m``/``s`` their
mean and standard deviation:

    yhat = m + (window - m) @ W  +  s * head(h_t)

``W`` (lookback x horizon) starts at the closed-form ridge solution; ``h_t`` is the state
of an LSTM fed, one step per reading, with ``(x_t - m) / s`` and calendar features. The
head starts at zero, so training starts from the ridge model and early stopping keeps the
LSTM only where it helps on validation. The model is affine-equivariant (scale and shift
a sensor and its forecast follows), so it serves sensors it was not trained on.

Offline (a whole segment at once) and streaming (a carried ``(h, c)`` per sensor) run the
same recurrence from a zero state at the first full window: the LSTM costs one step per
reading whatever the lookback; the linear path is one batched matmul per forecast.
Intervals are split-conformal: ``yhat ± q_h * s`` with ``q_h`` the 90% quantile of
``|error| / s`` per step on validation.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from models.base import Interval, placed, slide
from models.data import calendar

EPS = 1e-3
INPUTS = 5  # normalised value + 4 calendar features


class LinearLSTMNet(nn.Module):
    def __init__(self, lookback: int, horizon: int, hidden: int, ridge: np.ndarray | None = None):
        super().__init__()
        self.lookback, self.horizon, self.hidden = lookback, horizon, hidden
        self.lstm = nn.LSTM(INPUTS, hidden, batch_first=True)
        self.head = nn.Linear(hidden, horizon)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        weights = np.zeros((lookback, horizon)) if ridge is None else ridge
        self.linear = nn.Parameter(torch.as_tensor(weights, dtype=torch.float32))

    def segment(
        self, values: torch.Tensor, ts: np.ndarray, state: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Forecasts at every full window of (C, T) series: (C, T-L+1, H), the window
        std (C, T-L+1), and the LSTM state after the last step."""
        win = values.unfold(1, self.lookback, 1)
        mean = win.mean(-1)
        std = win.std(-1, unbiased=False) + EPS
        latest = values[:, self.lookback - 1 :]
        cal = torch.as_tensor(calendar(ts[self.lookback - 1 :]), dtype=values.dtype)
        inputs = torch.cat(
            [((latest - mean) / std).unsqueeze(-1), cal.expand(values.shape[0], -1, -1)], -1
        )
        out, state = self.lstm(inputs, state)
        linear = (win - mean.unsqueeze(-1)) @ self.linear + mean.unsqueeze(-1)
        return linear + std.unsqueeze(-1) * self.head(out), std, state

    def step(
        self, win: torch.Tensor, ts: np.ndarray, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One reading for each of B sensors: windows (B, L) ending at the new value."""
        yhat, std, h, c = self.steps(win.unsqueeze(1), np.asarray(ts)[:, None], h, c)
        return yhat[:, 0], std[:, 0], h, c

    def steps(
        self, win: torch.Tensor, ts: np.ndarray, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """F readings in order for each of B sensors: windows (B, F, L) ending at each,
        their times (B, F). What F calls of :meth:`step` give, in one recurrent pass."""
        mean = win.mean(-1)
        std = win.std(-1, unbiased=False) + EPS
        cal = torch.as_tensor(calendar(ts), dtype=win.dtype, device=win.device)
        inputs = torch.cat([((win[..., -1] - mean) / std).unsqueeze(-1), cal], -1)
        out, (h, c) = self.lstm(inputs, (h.unsqueeze(0), c.unsqueeze(0)))
        linear = (win - mean.unsqueeze(-1)) @ self.linear + mean.unsqueeze(-1)
        return linear + std.unsqueeze(-1) * self.head(out), std, h[0], c[0]


class LSTMForecaster:
    """The streaming side: per-sensor state is the last ``lookback`` values and (h, c)."""

    name = "lstm"

    def __init__(
        self, net: LinearLSTMNet, version: int, quantiles: np.ndarray, device: str = "cpu"
    ) -> None:
        self.net = net.to(device).eval()
        self.version = version
        self.horizon = net.horizon
        self.lookback = net.lookback
        self.device = device
        self.quantiles = torch.as_tensor(quantiles, dtype=torch.float32, device=device)

    def init_state(self) -> dict:
        return {"buf": [], "h": None, "c": None}

    def correct(self, state: dict, value: float, newer: int, replace: bool) -> None:
        """The window takes the late value; the recurrent summary is not rewound."""
        state["buf"] = placed(state["buf"], value, newer, replace, self.lookback)

    def step(self, items: list[tuple[dict, float, float]]) -> list[Interval | None]:
        """Advance each (state, value, ts) in order; forecast once a window is full."""
        results: list[Interval | None] = [None] * len(items)
        rounds: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, int] = defaultdict(int)
        for index, (state, _, _) in enumerate(items):
            rounds[seen[id(state)]].append(index)
            seen[id(state)] += 1
        for k in sorted(rounds):
            ready = []
            for index in rounds[k]:
                state, value, _ = items[index]
                buf = state["buf"] = slide(state["buf"], value, self.lookback)
                if len(buf) == self.lookback:
                    ready.append(index)
            if ready:
                self._forecast([items[i] for i in ready], ready, results)
        return results

    @torch.inference_mode()
    def _forecast(self, items: list, indexes: list[int], results: list) -> None:
        hidden = self.net.hidden
        win = torch.from_numpy(np.stack([s["buf"] for s, _, _ in items])).to(self.device)
        zeros = np.zeros(hidden, dtype=np.float32)
        h = _stack([s["h"] for s, _, _ in items], zeros).to(self.device)
        c = _stack([s["c"] for s, _, _ in items], zeros).to(self.device)
        ts = np.array([t for _, _, t in items])
        yhat, std, h, c = self.net.step(win, ts, h, c)
        half = std.unsqueeze(-1) * self.quantiles
        lower, upper = yhat - half, yhat + half
        h_rows, c_rows = h.cpu().numpy(), c.cpu().numpy()
        y_list, lo_list, up_list = yhat.tolist(), lower.tolist(), upper.tolist()
        for j, (index, (state, _, _)) in enumerate(zip(indexes, items, strict=True)):
            state["h"], state["c"] = h_rows[j].copy(), c_rows[j].copy()  # not views of the batch
            results[index] = (y_list[j], lo_list[j], up_list[j])


def _stack(rows: list, zeros: np.ndarray) -> torch.Tensor:
    """Recurrent states of a batch (a fresh sensor's is zeros; a restored one a list)."""
    return torch.from_numpy(
        np.stack([zeros if row is None else np.asarray(row, dtype=np.float32) for row in rows])
    )


def from_artifact(artifact: dict, version: int, device: str) -> LSTMForecaster:
    config = artifact["config"]
    net = LinearLSTMNet(config["lookback"], config["horizon"], config["hidden"])
    net.load_state_dict(artifact["state_dict"])
    return LSTMForecaster(net, version, artifact["quantiles"].numpy(), device)
