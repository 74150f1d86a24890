"""The generated Avro codecs must agree with fastavro byte for byte, on random records of every
built-in schema and of a schema using every Avro type; odd values fall back, never differ."""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import catalog, codegen
from schemas.exceptions import MalformedRecordError, TruncatedRecordError
from schemas.registry import FileRegistry
from schemas.serde import AvroDeserializer, AvroSerializer, frame

EVERYTHING: dict[str, Any] = {
    "type": "record", "name": "Everything", "namespace": "t",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "y", "type": "bytes"},
        {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
        {"name": "e", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "a", "type": {"type": "array", "items": ["null", "long"]}},
        {"name": "m", "type": {"type": "map", "values": {"type": "array", "items": "string"}}},
        {"name": "u", "type": ["null", "int", "string", {"type": "array", "items": "double"}]},
        {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [
            {"name": "x", "type": "Color"}, {"name": "next", "type": ["null", "Inner"], "default": None},
        ]}},
        {"name": "opt", "type": ["null", "string"], "default": None},
    ],
}


def _strategy(node: Any, named: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    if isinstance(node, str) and node in named:
        node = named[node]
    if isinstance(node, list):
        if depth > 2:
            return st.none() if "null" in node else _strategy(node[0], named, depth + 1)
        return st.one_of([_strategy(b, named, depth + 1) for b in node])
    kind = node if isinstance(node, str) else node["type"]
    if isinstance(kind, dict | list):
        return _strategy(kind, named, depth)
    simple: dict[str, st.SearchStrategy[Any]] = {
        "null": st.none(), "boolean": st.booleans(), "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(-(2**63), 2**63 - 1), "double": st.floats(allow_nan=False),
        "float": st.floats(width=32, allow_nan=False), "string": st.text(max_size=80),
        "bytes": st.binary(max_size=80),
    }
    if kind in simple:
        return simple[kind]
    if kind in ("fixed", "enum", "record", "error"):
        named[node["name"]] = node  # registered first, so recursive references resolve
    if kind == "fixed":
        return st.binary(min_size=node["size"], max_size=node["size"])
    if kind == "enum":
        return st.sampled_from(node["symbols"])
    if kind == "array":
        return st.lists(_strategy(node["items"], named, depth + 1), max_size=5)
    if kind == "map":
        return st.dictionaries(st.text(max_size=10), _strategy(node["values"], named, depth + 1), max_size=4)
    return st.fixed_dictionaries({f["name"]: _strategy(f["type"], named, depth + 1) for f in node["fields"]})


def _fastavro_bytes(parsed: Any, value: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, value)
    return buf.getvalue()


SCHEMAS = {name: catalog.load_schema(name) for name in catalog.SCHEMA_NAMES} | {"Everything": EVERYTHING}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generated_codec_matches_fastavro(name: str) -> None:
    parsed = catalog.parse(SCHEMAS[name])
    codec = codegen.generate(parsed)
    assert codec is not None
    encode, decode = codec

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_strategy(catalog.strip_logical_types(SCHEMAS[name]), {}))
    def check(value: Any) -> None:
        out = bytearray()
        encode(value, out)
        assert bytes(out) == _fastavro_bytes(parsed, value)
        decoded, end = decode(bytes(out), 0, len(out))
        assert end == len(out)
        assert decoded == fastavro.schemaless_reader(io.BytesIO(bytes(out)), parsed, None)

    check()


class MyStr(str):
    pass


def test_values_the_fast_path_cannot_vouch_for_fall_back(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path)
    schema = catalog.load_schema("SensorReading")
    ser = AvroSerializer(registry, "s-value", schema)
    parsed = catalog.parse(schema)
    odd = OrderedDict(sensor_id=MyStr("s"), timestamp=5, value=1, values={}, unit="c", label=None)
    expected = _fastavro_bytes(parsed, dict(odd, event_id=None))
    assert ser(odd)[5:] == expected
    assert AvroDeserializer(registry)(ser(odd)).value["sensor_id"] == "s"


def test_hostile_payload_on_the_resolution_path_fails_fast(tmp_path: Path) -> None:
    """With a reader schema fastavro decodes; the pre-walk guard bounds zero-byte arrays there."""
    registry = FileRegistry(tmp_path)
    writer = {"type": "record", "name": "H", "fields": [{"name": "x", "type": {"type": "array", "items": "null"}}]}
    reader = {**writer, "fields": [*writer["fields"], {"name": "z", "type": "int", "default": 0}]}
    schema_id = registry.register("h", writer)
    des = AvroDeserializer(registry, reader_schema=reader)
    assert des(frame(schema_id, b"\x04\x00")).value == {"x": [None, None], "z": 0}
    start = time.perf_counter()
    with pytest.raises(TruncatedRecordError, match="empty items"):
        des(frame(schema_id, codegen._zigzag_bytes(2**40) + b"\x00"))
    assert time.perf_counter() - start < 2.0
    with pytest.raises(MalformedRecordError):
        AvroDeserializer(registry)(frame(schema_id, b"\x81" + b"\x80" * 9 + b"\x01"))  # 11-byte varint
