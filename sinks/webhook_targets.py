"""Where a webhook may post, and how its deliveries are signed (pure, except DNS).

A target is an ``http``/``https`` URL of at most :data:`MAX_URL` characters, without
credentials. Its host is resolved at creation and again before every delivery (DNS can
change), and every address it resolves to must be public: loopback, link-local,
private, multicast, reserved, unspecified and other non-global addresses are refused
unless the configuration allows them (``FORECAST_WEBHOOK_ALLOW_PRIVATE=1``, or a CIDR in
``FORECAST_WEBHOOK_ALLOW_NETWORKS``). The delivery then connects to the address that
was checked (:meth:`Target.pinned`), so a second lookup cannot swap it.

Signature: ``X-Forecast-Signature: t=<unix ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<body>")>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from forecast.errors import WebhookError
from forecast.options import Network

MAX_URL = 2048
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Policy:
    """Which addresses a target may resolve to beyond public ones."""

    allow_private: bool = False
    allow_networks: tuple[Network, ...] = ()

    def permits(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allow_networks):
            return True
        if _public(address):
            return True
        # multicast, reserved and unspecified are never a receiver, even when private is allowed
        return self.allow_private and not (
            address.is_multicast or address.is_unspecified or address.is_reserved
        )


def _public(address: Address) -> bool:
    return address.is_global and not (
        address.is_multicast
        or address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_reserved
        or address.is_unspecified
    )


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL and the address its host resolved to."""

    url: str
    host: str
    address: str

    def pinned(self) -> tuple[str, dict[str, str], dict[str, str]]:
        """(URL to the checked address, headers, httpx extensions): Host and TLS SNI name
        stay the original host, so certificates are verified against it."""
        parts = urlsplit(self.url)
        shown = f"[{self.address}]" if ":" in self.address else self.address
        netloc = shown if parts.port is None else f"{shown}:{parts.port}"
        url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host = parts.netloc  # host[:port] as given (no credentials: refused)
        extensions = {"sni_hostname": self.host} if parts.scheme == "https" else {}
        return url, {"Host": host}, extensions


def check_url(url: str) -> tuple[str, int]:
    """The host and port of an acceptable URL; WebhookError ``bad_url`` otherwise."""
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL:
        raise WebhookError(f"a webhook URL has 1..{MAX_URL} characters", code="bad_url")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise WebhookError("the webhook URL contains spaces or control characters", code="bad_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookError(f"bad webhook URL: {exc}", code="bad_url") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookError("a webhook URL is http:// or https://", code="bad_url")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise WebhookError("a webhook URL may not carry credentials", code="bad_url")
    if not parts.hostname:
        raise WebhookError("the webhook URL has no host", code="bad_url")
    if parts.fragment:
        raise WebhookError("a webhook URL has no #fragment", code="bad_url")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (blocking DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_target(url: str, policy: Policy, resolver: Resolver = resolve) -> Target:
    """The URL checked and its host resolved; WebhookError ``target_refused`` when any
    address it resolves to is not permitted, ``unresolvable`` when it resolves to none."""
    host, port = check_url(url)
    try:
        found = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise WebhookError(f"cannot resolve {host!r}: {exc}", code="unresolvable") from None
    if not found:
        raise WebhookError(f"{host!r} resolves to no address", code="unresolvable")
    for text in found:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not policy.permits(address):
            raise WebhookError(
                f"{host!r} resolves to {address}, which is not a public address "
                "(FORECAST_WEBHOOK_ALLOW_PRIVATE or FORECAST_WEBHOOK_ALLOW_NETWORKS allow it)",
                code="target_refused",
            )
    return Target(url, host, found[0].split("%", 1)[0])


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Forecast-Signature`` header's value."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance`` seconds."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def origin(url: str) -> str:
    """What the audit log keeps of a webhook's URL: its scheme, host and port (a hook's
    path or query often carries a secret of the receiving service)."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "(unparsable)"
