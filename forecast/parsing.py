"""Values of the contract parsed from JSON, shared by the stream's validation, the HTTP
API and the CLI: times are RFC 3339 text or epoch seconds (design §3)."""

from __future__ import annotations

import math
from datetime import UTC, datetime


class Invalid(ValueError):
    """A value refused, with the reason code a dead letter carries (``bad_time``, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def finite_float(raw: int | float) -> float | None:
    """A JSON number as a finite float, or None: NaN, an infinity, or an integer too
    large for a float (``float(10**400)`` raises rather than giving infinity)."""
    try:
        value = float(raw)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def parse_time(raw: object) -> float:
    """RFC 3339 text or epoch seconds to epoch seconds (UTC)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise Invalid("bad_time", f"ts must be RFC 3339 or epoch seconds, not {kind(raw)}")
    if isinstance(raw, int | float):
        seconds = finite_float(raw)
        if seconds is None:
            raise Invalid("bad_time", "ts is not finite")
        return seconds
    text = raw.strip()
    if not text or len(text) > 40:
        raise Invalid("bad_time", f"unparsable ts {raw[:40]!r}")
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1] in "Zz" else text)
    except ValueError:
        raise Invalid("bad_time", f"unparsable ts {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


_KINDS = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
    type(None): "null",
}


def kind(value: object) -> str:
    """The JSON name of a decoded value's type, for messages (``object``, ``array``, ...)."""
    return _KINDS.get(type(value), type(value).__name__)
