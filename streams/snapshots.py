"""Per-sensor state snapshots in a compact binary form (pure).

A snapshot is a JSON document whose numpy arrays travel as raw bytes after it:

    b"FS2" | header length (4 bytes, little endian) | header (JSON) | array bytes

In the header an array is ``{"$": [offset, dtype, shape]}`` into the bytes that follow.
A window of 336 float32 values costs its 1,344 bytes and a copy, not the formatting of
336 numbers. Snapshots written as plain JSON (:meth:`streams.state.SensorState.to_bytes`)
are read too.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import orjson

MAGIC = b"FS2"
_LENGTH = struct.Struct("<I")


def pack(doc: dict) -> bytes:
    """``doc`` (JSON-able, with numpy arrays anywhere) as a snapshot. orjson walks the
    document; it hands each array to ``refer``, which sets its bytes aside."""
    blobs: list[bytes] = []
    size = 0

    def refer(value: object) -> dict:
        nonlocal size
        if not isinstance(value, np.ndarray):
            to_json = getattr(value, "to_json", None)  # a model's live object
            if to_json is None:
                raise TypeError(f"cannot store {type(value).__name__} in a snapshot")
            return to_json()
        data = value.tobytes()
        blobs.append(data)
        ref = {"$": [size, value.dtype.str, list(value.shape)]}
        size += len(data)
        return ref

    header = orjson.dumps(doc, default=refer)
    return b"".join((MAGIC, _LENGTH.pack(len(header)), header, *blobs))


def unpack(raw: bytes) -> dict:
    """A snapshot (binary or plain JSON) as a document, arrays as numpy arrays."""
    if not raw.startswith(MAGIC):
        return orjson.loads(raw)
    (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    header = orjson.loads(raw[start : start + length])
    body = memoryview(raw)[start + length :]

    nested = (dict, list)

    def resolve(value: dict | list) -> object:  # only containers: scalars stay as they are
        if isinstance(value, dict):
            ref = value.get("$")
            if ref is not None and len(value) == 1:
                offset, dtype, shape = ref
                count = math.prod(shape)  # 1 for a scalar's empty shape
                array = np.frombuffer(body, np.dtype(dtype), count, offset)
                return array.reshape(shape).copy()
            return {
                key: resolve(item) if isinstance(item, nested) else item
                for key, item in value.items()
            }
        return [resolve(item) if isinstance(item, nested) else item for item in value]

    return resolve(header) if isinstance(header, nested) else header


def clock(raw: bytes) -> tuple[float, int]:
    """How far a snapshot has seen its sensor: (latest reading time, seq). Of two copies
    of one sensor's state, the one with the greater clock is the newer."""
    doc = unpack(raw)
    last_ts = doc.get("last_ts")
    return (-np.inf if last_ts is None else float(last_ts), int(doc.get("seq", 0)))
