"""The model registry: versioned artifacts and their stages, in a folder.

Layout under ``<data_dir>/models``::

    registry.json            stages: production and shadow (name, version), and history
    <name>/v<N>/model.pt     weights and configuration (loaded with weights_only=True)
    <name>/v<N>/meta.json    parameters, metrics, data fingerprint, artifact checksum

``meta.json`` (written by :func:`models.fit.fit`; older versions lack the later fields,
which :func:`step_and_season` and :func:`warm_up` fill in)::

    kind, params                 the artifact kind and the training configuration
    data.rows / data.file_rows   rows the split used / rows in the file
    data.targets                 the columns forecast (also ``data.channels``)
    data.covariates              extra input columns (none yet)
    data.step_seconds            the step: the most common spacing of the times
    data.season                  readings in one season (one day of readings)
    data.timing                  the same with gaps and whether the season was given
    split                        protocol, rows and windows of train/valid/test
    warm_up                      readings of a sensor before the model forecasts it
    metrics, metrics_by_target   scaled valid/test scores, overall and per target
    baseline                     the seasonal naive's test scores, steps the model beats
    best_epoch, epochs_run, stopped_early, history, train_seconds

One production model serves the stream; a shadow model, if any, runs beside it and its
predictions are stored with its own name and version. A version replaced in a stage is
``archived``. Writers take an exclusive lock; ``registry.json`` is replaced atomically,
so workers can poll it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import torch

from forecast.errors import ModelError
from models.base import StreamingForecaster

FORMAT = 1
STAGES = ("production", "shadow")


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "registry.json"

    # -- reading ------------------------------------------------------------------------

    def state(self) -> dict:
        try:
            return orjson.loads(self.file.read_bytes())
        except FileNotFoundError:
            return {"production": None, "shadow": None, "history": []}
        except orjson.JSONDecodeError as exc:
            raise ModelError(f"{self.file} is corrupt: {exc}") from exc

    def revision(self) -> float:
        """Changes whenever the stages change (for polling)."""
        try:
            return self.file.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def stage(self, stage: str) -> ModelRef | None:
        ref = self.state().get(stage)
        return ModelRef(ref["name"], ref["version"]) if ref else None

    def versions(self) -> list[dict]:
        state = self.state()
        staged = {(r["name"], r["version"]): s for s in STAGES if (r := state.get(s))}
        out = []
        for meta_file in sorted(self.root.glob("*/v*/meta.json")):
            meta = orjson.loads(meta_file.read_bytes())
            key = (meta["name"], meta["version"])
            archived = any((h["name"], h["version"]) == key for h in state["history"])
            meta["stage"] = staged.get(key, "archived" if archived else "registered")
            out.append(meta)
        return sorted(out, key=lambda m: (m["name"], m["version"]))

    def meta(self, name: str, version: int) -> dict:
        for meta in self.versions():
            if (meta["name"], meta["version"]) == (name, version):
                return meta
        raise ModelError(f"no model {name} v{version}")

    # -- writing ------------------------------------------------------------------------

    def register(self, name: str, artifact: dict, meta: dict) -> int:
        with self._locked():
            existing = [int(p.name[1:]) for p in (self.root / name).glob("v*") if p.is_dir()]
            version = max(existing, default=0) + 1
            folder = self.root / name / f"v{version}"
            folder.mkdir(parents=True)
            torch.save({**artifact, "format": FORMAT}, folder / "model.pt")
            meta = {
                **meta,
                "name": name,
                "version": version,
                "created_at": time.time(),
                "artifact_sha256": _sha256(folder / "model.pt"),
            }
            (folder / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        return version

    def promote(self, name: str, version: int, stage: str = "production") -> None:
        if stage not in STAGES:
            raise ModelError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        self.load(name, version)  # refuse what cannot serve
        with self._locked():
            state = self.state()
            previous = state.get(stage)
            if previous:
                state["history"].append({**previous, "stage": stage, "until": time.time()})
            state[stage] = {"name": name, "version": version, "since": time.time()}
            shadow = state.get("shadow")
            if (
                stage == "production"
                and shadow
                and (shadow["name"], shadow["version"]) == (name, version)
            ):
                state["shadow"] = None  # the challenger won: it serves now
            self._write(state)

    def retire(self, stage: str) -> None:
        """Empty ``stage``; its version becomes archived (a shadow that lost)."""
        with self._locked():
            state = self.state()
            current = state.get(stage)
            if current:
                state["history"].append({**current, "stage": stage, "until": time.time()})
                state[stage] = None
                self._write(state)

    def rollback(self, stage: str = "production") -> ModelRef:
        """Return ``stage`` to the version it had before the current one."""
        with self._locked():
            state = self.state()
            earlier = [h for h in state["history"] if h["stage"] == stage]
            if not earlier:
                raise ModelError(f"nothing to roll back to in {stage}")
            back = earlier[-1]
            state["history"].remove(back)
            state[stage] = {"name": back["name"], "version": back["version"], "since": time.time()}
            self._write(state)
        return ModelRef(back["name"], back["version"])

    # -- loading ------------------------------------------------------------------------

    def load(self, name: str, version: int, device: str = "cpu") -> StreamingForecaster:
        """Load and check an artifact; ModelError if it is missing, corrupt or foreign."""
        folder = self.root / name / f"v{version}"
        if not folder.is_dir():
            raise ModelError(f"no model {name} v{version}")
        try:
            meta = orjson.loads((folder / "meta.json").read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError) as exc:
            raise ModelError(f"model {name} v{version}: unreadable metadata ({exc})") from exc
        if _sha256(folder / "model.pt") != meta.get("artifact_sha256"):
            raise ModelError(f"model {name} v{version}: artifact checksum mismatch (corrupt)")
        try:
            artifact = torch.load(folder / "model.pt", map_location=device, weights_only=True)
            loader = _loader(artifact.get("kind"))
            if artifact.get("format") != FORMAT or loader is None:
                raise ModelError(f"model {name} v{version}: incompatible artifact format")
            forecaster = loader(artifact, version, device)
        except ModelError:
            raise
        except Exception as exc:  # torch raises many types for a bad file
            raise ModelError(f"model {name} v{version}: cannot load ({exc})") from exc
        forecaster.name = name
        return forecaster

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, state: dict) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.file)


def step_and_season(meta: dict) -> tuple[float, int]:
    """A version's step in seconds and season in readings (hourly and 24 for versions
    trained before they were recorded, which assumed hourly data)."""
    data = meta.get("data", {})
    step = float(data.get("step_seconds") or 3600.0)
    season = data.get("season") or meta.get("params", {}).get("season") or 24
    return step, int(season)


def warm_up(meta: dict) -> int:
    """Readings a sensor needs before this version forecasts it (until then the
    fallback baseline serves it)."""
    if "warm_up" in meta:
        return int(meta["warm_up"])
    lookback = int(meta.get("params", {}).get("lookback", 0))
    return lookback + (step_and_season(meta)[1] if meta.get("kind") == "tft" else 0)


def _loader(kind: str | None):
    """The function that turns an artifact of this kind into a forecaster."""
    if kind == "linear-lstm":
        from models.lstm import from_artifact
    elif kind == "tft":
        from models.tft import from_artifact
    else:
        return None
    return from_artifact


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "missing"
