"""What every ``forecast`` command module shares: settings with logging, the decorator
that turns a ForecastError into one line and exit status 1, and the machine line of
``forecast bench``. The command modules import this one, never each other."""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import click

from forecast.errors import ForecastError
from forecast.logs import setup_logging
from forecast.settings import Settings, load_settings


def settings_from_env() -> Settings:
    """The validated ``FORECAST_*`` settings, with logging set up at their level."""
    settings = load_settings()
    setup_logging(settings.log_level)
    return settings


def command(group: click.Group | None, name: str | None = None, **kwargs: Any) -> Callable:
    """A click command (of ``group``, or standalone for None) whose ForecastError becomes
    one line on stderr and exit 1."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except ForecastError as exc:
                click.echo(f"error: {exc.message}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                sys.exit(130)

        return (group.command if group is not None else click.command)(name, **kwargs)(wrapper)

    return decorate


def machine() -> str:
    """The line that says where a benchmark ran."""
    import torch

    return (
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python "
        f"{platform.python_version()}, torch {torch.__version__}, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
