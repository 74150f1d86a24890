"""The built-in Avro schemas shipped as ``schemas/<Name>.avsc``, and a cache of parsed schemas.

Schemas are read through :mod:`importlib.resources` so they load the same from a source checkout,
an editable install or a wheel. Parsing with fastavro is costly (it walks and validates the whole
schema), so :func:`parse` caches by canonical JSON text: every serializer, deserializer and registry
lookup that sees the same schema shares one parsed object.
"""

from __future__ import annotations

import copy
import json
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import fastavro

from schemas.exceptions import InvalidSchemaError, SchemaNotFoundError

#: Record names of the built-in schemas (one ``<name>.avsc`` each).
SCHEMA_NAMES: tuple[str, ...] = (
    "WebLogEvent",
    "SensorReading",
    "ImageEvent",
    "PredictionRequest",
    "Prediction",
    "ModelUpdate",
    "DeadLetter",
)

_PRIMITIVE_NAMES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


@cache
def _schema_text(name: str) -> str:
    return (resources.files("schemas") / f"{name}.avsc").read_text(encoding="utf-8")


def load_schema(name: str) -> dict[str, Any]:
    """Parsed JSON of the built-in schema ``name`` (a fresh dict the caller may modify)."""
    if name not in SCHEMA_NAMES:
        raise SchemaNotFoundError(
            f"name: no built-in schema {name!r}; choose one of {', '.join(SCHEMA_NAMES)}"
        )
    result: dict[str, Any] = json.loads(_schema_text(name))
    return result


def schema_to_dict(schema: str | dict[str, Any] | list[Any]) -> Any:
    """JSON text or an already parsed JSON value -> JSON value; bad JSON is an InvalidSchemaError."""
    if isinstance(schema, str):
        if schema in _PRIMITIVE_NAMES:  # a bare primitive name is what people type for key schemas
            return schema
        try:
            return json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidSchemaError(f"schema: not valid JSON ({exc}); pass Avro schema JSON text") from exc
    return schema


def canonical_text(schema: str | dict[str, Any] | list[Any]) -> str:
    """Stable compact JSON text of a schema: the key for caches and for idempotent registration."""
    return json.dumps(schema_to_dict(schema), sort_keys=True, separators=(",", ":"))


def strip_logical_types(schema: Any) -> Any:
    """A deep copy of ``schema`` with every ``logicalType`` key removed.

    Why: our dicts carry ``timestamp-millis`` as plain ints of epoch milliseconds (see
    docs/ARCHITECTURE.md), and fastavro has no switch to turn logical-type conversion off, so
    encoding and decoding use this stripped copy. The binary encoding is identical.
    """
    if isinstance(schema, dict):
        return {k: strip_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [strip_logical_types(v) for v in schema]
    return copy.copy(schema)


@lru_cache(maxsize=512)
def _parse_text(text: str, plain: bool) -> Any:
    schema = json.loads(text)
    if plain:
        schema = strip_logical_types(schema)
    try:
        return fastavro.parse_schema(schema)
    except Exception as exc:  # fastavro raises SchemaParseException, ValueError, KeyError, TypeError...
        raise InvalidSchemaError(f"schema: not a valid Avro schema: {exc}") from exc


def parse(schema: str | dict[str, Any] | list[Any], *, plain: bool = True) -> Any:
    """The fastavro parsed form of ``schema``, cached.

    ``plain=True`` (the default) strips logical types first, which is what serde uses; pass
    ``plain=False`` to keep them (e.g. for container files read by tools that want datetimes).
    """
    return _parse_text(canonical_text(schema), plain)


def value_subject(topic: str) -> str:
    """Registry subject of a topic's values (Confluent TopicNameStrategy): ``<topic>-value``."""
    return f"{topic}-value"
