"""Rate limits: token buckets per caller, for rules such as ``60/minute,1000/hour``; and
who the caller is behind trusted proxies (``X-Forwarded-For``)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable

from forecast.options import Network, parse_rules

MAX_CALLERS = 100_000


class RateLimiter:
    """Each rule is a bucket of N tokens refilled over its period; a hit takes one token
    from every bucket of the caller, or none if any is empty."""

    def __init__(self, rules: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.rules = parse_rules(rules)
        self.clock = clock
        self._buckets: dict[str, list[tuple[float, float]]] = {}  # caller -> (tokens, at)

    def hit(self, caller: str) -> float | None:
        """None if allowed; else the seconds until it would be."""
        now = self.clock()
        buckets = self._buckets.get(caller)
        if buckets is None:
            if len(self._buckets) >= MAX_CALLERS:
                self._buckets.clear()  # forgetting grants tokens, it never blocks anyone
            buckets = [(float(n), now) for n, _ in self.rules]
        refilled = [
            (min(float(n), tokens + (now - at) * n / period), now)
            for (n, period), (tokens, at) in zip(self.rules, buckets, strict=True)
        ]
        waits = [
            (1 - tokens) * period / n
            for (n, period), (tokens, _) in zip(self.rules, refilled, strict=True)
            if tokens < 1
        ]
        if waits:
            self._buckets[caller] = refilled
            return max(waits)
        self._buckets[caller] = [(tokens - 1, at) for tokens, at in refilled]
        return None


def client_address(peer: str, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The caller's address: the peer, unless the peer is a trusted proxy; then the
    right-most ``X-Forwarded-For`` entry that is not itself a trusted proxy.

    Entries left of that one were written by the client and are never believed; so is
    anything after an entry that is not an address (the nearest trusted hop is used).
    """
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    client = peer
    for hop in reversed(hops):
        if not _is_address(hop):
            break
        client = hop
        if not is_trusted(hop, trusted):
            break
    return client


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)
