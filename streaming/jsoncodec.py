"""JSON form of records: the same dicts, with ``bytes`` fields as base64 text.

Used wherever people or HTTP clients hand records over as JSON (``streamlearn publish --file``,
the ingest gateway, prediction requests carrying a raw event, ``subscribe --json``).
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import cache
from typing import Any

from schemas.catalog import load_schema
from schemas.exceptions import RecordValidationError


@cache
def _bytes_fields(record_name: str) -> frozenset[str]:
    out = set()
    for f in load_schema(record_name)["fields"]:
        types = f["type"] if isinstance(f["type"], list) else [f["type"]]
        if "bytes" in types:
            out.add(f["name"])
    return frozenset(out)


def from_json(record_name: str, obj: Any) -> dict[str, Any]:
    """Turn a parsed JSON object into a record dict of ``record_name`` (base64 → bytes)."""
    if not isinstance(obj, dict):
        raise RecordValidationError(record_name, "<record>", obj, "expected a JSON object")
    out = dict(obj)
    for name in _bytes_fields(record_name):
        value = out.get(name)
        if isinstance(value, str):
            try:
                out[name] = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise RecordValidationError(record_name, name, value[:40], f"expected base64 text ({exc})") from exc
    return out


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def to_json(record: Any, **kwargs: Any) -> str:
    """JSON text of a record (bytes as base64)."""
    return json.dumps(record, default=_default, **kwargs)
