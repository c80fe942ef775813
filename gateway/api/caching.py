"""Conditional GETs and cache rules for forecast reads (RFC 9110 §8.8.3 and §13.1.2,
RFC 9111).

Entity tags are weak (``W/"..."``): the GZip middleware compresses large bodies on the
way out, and a weak tag stays true for every encoding of the same answer, so the tag
and a 304 survive compression. ``If-None-Match`` is compared weakly, as RFC 9110
requires: a list of tags, ``*`` (any current answer), several header lines; a
malformed value is ignored (the full answer is sent). It is evaluated only once the
caller is known to see the sensor, so a tag never tells a caller anything that the
answer itself would not.

Every answer depends on the caller's credentials (its role and sensor scope): it is
``private`` (no shared cache may keep it) and carries ``Vary: Authorization``. When the
credentials travel in the URL (``?token=``) the answer is ``no-store``: any cache keyed
by that URL would keep the secret with it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

LATEST_MAX_AGE = 1.0  # seconds: a sensor's latest forecast changes with every prediction
HISTORY_MAX_AGE = 1.0  # a range still open to new forecasts
SETTLED_AFTER = 3600.0  # seconds: the default allowed lateness of a reading
SETTLED_MAX_AGE = 60.0  # a range that ended more than SETTLED_AFTER ago
MAX_FIELD = 8192  # characters of If-None-Match looked at; a longer one is ignored

_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
_LIST = re.compile(rf"^(?:[ \t]*,)*[ \t]*{_TAG}(?:[ \t]*(?:,[ \t]*)+{_TAG})*(?:[ \t]*,)*[ \t]*$")
_TAGS = re.compile(_TAG)


def tag_of(*parts: object) -> str:
    """A weak entity tag for what an answer depends on (or for its body's bytes)."""
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\x1f")
    return f'W/"{digest.hexdigest()}"'


def requested_tags(value: str) -> set[str] | None:
    """The opaque tags of an ``If-None-Match`` value (``{"*"}`` for any), or None when
    it is malformed."""
    value = value.strip(" \t")
    if value == "*":
        return {"*"}
    if len(value) > MAX_FIELD or not _LIST.match(value):
        return None
    return {tag.removeprefix("W/") for tag in _TAGS.findall(value)}


def not_modified(request: Request, tag: str) -> bool:
    """Whether the caller's ``If-None-Match`` names ``tag`` (weak comparison) or ``*``."""
    lines = request.headers.getlist("if-none-match")
    if not lines:
        return False
    wanted = requested_tags(",".join(lines))
    return wanted is not None and ("*" in wanted or tag.removeprefix("W/") in wanted)


def cache_headers(request: Request, tag: str, max_age: float) -> dict[str, str]:
    """ETag, Cache-Control and Vary for an answer that may be kept ``max_age`` seconds."""
    in_url = "token" in request.query_params
    control = "no-store" if in_url else f"private, max-age={int(max_age)}"
    return {"ETag": tag, "Cache-Control": control, "Vary": "Authorization"}


def conditional(request: Request, tag: str, max_age: float, body: Callable[[], bytes]) -> Response:
    """304 without a body when the caller holds ``tag``, else the JSON ``body()``."""
    headers = cache_headers(request, tag, max_age)
    if not_modified(request, tag):
        # GZip adds Accept-Encoding to the Vary of the answers it compresses, never to an
        # empty 304: say it here, as the 200 it stands for may have said it
        return Response(
            status_code=304, headers={**headers, "Vary": "Authorization, Accept-Encoding"}
        )
    return Response(body(), media_type="application/json", headers=headers)
