"""The store's part of a backup, from the process that owns it (``forecast backup``).

The tables are dumped into a temporary folder with the store held, then streamed (see
:mod:`sinks.backup` for the stream); the folder goes once the stream ends. Allowed to
an admin, and to this process's own token (the one in ``<data_dir>/run/owner.json``
that ``forecast query`` uses): an analyst key may read its sensors through SQL, not
every table whole.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from forecast.errors import AuthError
from gateway.api.context import Analyst, Context, need
from gateway.api.errors import responses
from sinks.backup import StoreDump, dump_store, encode

router = APIRouter(tags=["backup"])
MEDIA_TYPE = "application/vnd.forecast.store-dump"


@router.get(
    "/backup/store",
    summary="Every table of the store, at one moment (admin, or the local CLI)",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "a JSON line describing the tables, then each in Native format",
            "content": {MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **responses(503),
    },
)
def backup_store(ctx: Context, who: Analyst) -> StreamingResponse:
    if not (who.can("admin") or who.key_id.startswith("process-")):
        raise AuthError("a backup of the store needs the admin role", code="forbidden")
    store = need(ctx.store, "the store")
    folder = Path(tempfile.mkdtemp(prefix="forecast-backup-"))
    try:
        dump = dump_store(store, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return StreamingResponse(
        _stream(dump, folder),
        media_type=MEDIA_TYPE,
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )


def _stream(dump: StoreDump, folder: Path) -> Iterator[bytes]:
    try:
        yield from encode(dump, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
