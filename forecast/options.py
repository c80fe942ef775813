"""Typed values parsed from configuration, shared by the settings and the parts that use
them: rate rules (``60/minute,1000/hour``), trusted networks, the drift detectors."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
RULE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")

SIGNALS = {"adwin": "residual", "page_hinkley": "level", "kswin": "distribution"}
"""Each drift detector and the signal it watches (see :mod:`streams.drift`)."""


def parse_rules(text: str) -> list[tuple[int, float]]:
    """``"60/minute,1000/hour"`` to ``[(60, 60.0), (1000, 3600.0)]``; ValueError if bad."""
    rules = []
    for part in text.split(","):
        match = RULE.match(part)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"bad rate {part.strip()!r}: use N/second|minute|hour|day")
        rules.append((int(match.group(1)), PERIODS[match.group(2)]))
    return rules


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 127.0.0.1"`` to networks; ValueError naming a bad entry."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"bad address or CIDR {part!r}") from None
    return tuple(networks)


@dataclass(frozen=True)
class DriftConfig:
    """The drift detectors to run per sensor, and their parameters."""

    detectors: tuple[str, ...] = ("adwin", "page_hinkley")
    adwin_delta: float = 0.002
    ph_threshold: float = 100.0
    ph_delta: float = 0.005
    ks_alpha: float = 1e-5
    ks_window: int = 300
    ks_stat: int = 100
    reference: int = 168
    cooldown: int = 24
    max_sensors: int = 100_000

    def __post_init__(self) -> None:
        unknown = set(self.detectors) - set(SIGNALS)
        if unknown:
            raise ValueError(f"unknown detectors {sorted(unknown)}; known: {sorted(SIGNALS)}")
