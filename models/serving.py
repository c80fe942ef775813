"""Which models serve the stream: the registry's production and shadow versions, picked
up within seconds of a promotion or rollback, without a restart.

A version that cannot load (corrupt, incompatible) is refused with an error log and a
metric; the models already serving stay.
"""

from __future__ import annotations

import asyncio
import logging
import os

import torch

from forecast import metrics
from forecast.errors import ModelError
from models.base import ModelSet
from models.baseline import SeasonalNaive
from models.registry import ModelRef, Registry

log = logging.getLogger(__name__)


def pick_device(wanted: str = "auto") -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def cpu_share(threads: int, processes: int = 1) -> int:
    """``threads``, or with 0 one process's share of the CPUs among ``processes`` (at
    least one). Several processes each running as many threads as there are CPUs wait on
    each other's time slices in every parallel op: two workers on 2 CPUs took 25 s
    instead of 0.3 s for a replay's batch."""
    return threads or max(1, (os.cpu_count() or 1) // max(1, processes))


def share_cpus(threads: int) -> int:
    """Set torch's CPU threads for inference to :func:`cpu_share` of this one process
    (``forecast up --workers N`` hands each child its share); returns the count."""
    count = cpu_share(threads)
    torch.set_num_threads(count)
    return count


class ModelWatcher:
    """Holds the current ModelSet and refreshes it when the registry changes."""

    def __init__(
        self,
        registry: Registry,
        horizon: int,
        season: int,
        device: str = "cpu",
        interval: float = 1.0,
    ) -> None:
        self.registry = registry
        self.season = season
        self.device = device
        self.interval = interval
        self.current = ModelSet(SeasonalNaive(horizon=horizon, season=season))
        self._revision: float | None = None
        self._loaded: dict[str, ModelRef | None] = {"production": None, "shadow": None}

    def refresh(self) -> bool:
        """Load what the registry's stages name, if they changed; True if anything did."""
        revision = self.registry.revision()
        if revision == self._revision:
            return False
        self._revision = revision
        try:
            wanted = {stage: self.registry.stage(stage) for stage in self._loaded}
        except ModelError as exc:
            log.error("model registry unreadable, keeping the serving models: %s", exc)
            metrics.MODEL_LOAD_FAILURES.inc()
            return False
        current = self.current
        models = {"production": current.production, "shadow": current.shadow}
        changed = False
        for stage, ref in wanted.items():
            if ref == self._loaded[stage]:
                continue
            try:
                models[stage] = (
                    None if ref is None else self.registry.load(ref.name, ref.version, self.device)
                )
            except ModelError as exc:
                log.error("refused %s model: %s; the serving model stays", stage, exc)
                metrics.MODEL_LOAD_FAILURES.inc()
                continue
            self._loaded[stage] = ref
            changed = True
            log.info("%s model is now %s", stage, f"{ref.name} v{ref.version}" if ref else "none")
        if changed:
            production = models["production"]
            horizon = production.horizon if production else current.baseline.horizon
            baseline = current.baseline
            if horizon != baseline.horizon:
                baseline = SeasonalNaive(horizon=horizon, season=self.season)
            self.current = ModelSet(baseline, production, models["shadow"])
            self._export()
        return changed

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.interval)

    def _export(self) -> None:
        metrics.MODEL_INFO.clear()
        metrics.MODEL_INFO.labels("baseline", "1", "fallback").set(1)
        for stage, model in (
            ("production", self.current.production),
            ("shadow", self.current.shadow),
        ):
            if model is not None:
                metrics.MODEL_INFO.labels(model.name, str(model.version), stage).set(1)
