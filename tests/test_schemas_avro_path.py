"""The one Avro path (our validator, then fastavro) on random records of every built-in schema and
of a schema using every Avro type: what the validator accepts encodes to fastavro's own bytes and
decodes back equal; odd but valid values (a ``str`` subclass, an int for a double) are accepted;
hostile payloads fail fast and typed, never crash or spin.

(These checks once compared a per-schema code generator with fastavro; the generator was removed
when ``bench_sdk --codec`` showed it under 2x end to end, and the checks now hold the one path.)"""

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

from schemas import catalog
from schemas.exceptions import MalformedRecordError, RecordValidationError, TruncatedRecordError
from schemas.registry import FileRegistry
from schemas.serde import AvroDeserializer, AvroSerializer, frame
from tests.test_schemas_serde import _zigzag  # an Avro long written by hand, not by the code under test

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
def test_serde_round_trips_random_records_as_fastavro_writes_them(name: str, tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path)
    ser = AvroSerializer(registry, f"{name}-value", SCHEMAS[name])
    des = AvroDeserializer(registry)
    parsed = catalog.parse(SCHEMAS[name])

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_strategy(catalog.strip_logical_types(SCHEMAS[name]), {}))
    def check(value: Any) -> None:
        framed = ser(value)  # the validator must accept every valid record
        assert framed[5:] == _fastavro_bytes(parsed, value)
        decoded = des(framed)
        assert decoded.schema_id == ser.schema_id
        assert decoded.value == fastavro.schemaless_reader(io.BytesIO(framed[5:]), parsed, None)

    check()


class MyStr(str):
    pass


def test_odd_but_valid_values_are_accepted_and_encoded_as_fastavro_does(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path)
    schema = catalog.load_schema("SensorReading")
    ser = AvroSerializer(registry, "s-value", schema)
    parsed = catalog.parse(schema)
    odd: OrderedDict[str, Any] = OrderedDict(sensor_id=MyStr("s"), timestamp=5, value=1, values={}, unit="c",
                                             label=None)
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
        des(frame(schema_id, _zigzag(2**40) + b"\x00"))
    assert time.perf_counter() - start < 2.0
    with pytest.raises(MalformedRecordError):
        AvroDeserializer(registry)(frame(schema_id, b"\x81" + b"\x80" * 9 + b"\x01"))  # 11-byte varint


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_recursive_record_is_refused_not_a_crash(tmp_path: Path, depth: int) -> None:
    """fastavro's C reader recursed until SIGSEGV on 100,000 nested records; the guard refuses first."""
    registry = FileRegistry(tmp_path)
    schema = {"type": "record", "name": "Node", "fields": [
        {"name": "x", "type": "int"}, {"name": "next", "type": ["null", "Node"]}]}
    schema_id = registry.register("n", schema)
    des = AvroDeserializer(registry)
    assert des(frame(schema_id, b"\x00\x02" * 50 + b"\x00\x00")).value["next"]["next"]["x"] == 0
    with pytest.raises(MalformedRecordError, match="nested more than"):
        des(frame(schema_id, b"\x00\x02" * depth + b"\x00\x00"))
    reader = {**schema, "fields": [*schema["fields"], {"name": "z", "type": "int", "default": 0}]}
    with pytest.raises(MalformedRecordError, match="nested more than"):  # also when resolving
        AvroDeserializer(registry, reader_schema=reader)(frame(schema_id, b"\x00\x02" * depth + b"\x00\x00"))


def test_value_nested_past_the_stack_is_a_typed_validation_error(tmp_path: Path) -> None:
    schema = {"type": "record", "name": "Node", "fields": [{"name": "next", "type": ["null", "Node"]}]}
    ser = AvroSerializer(FileRegistry(tmp_path), "n", schema)
    value: dict[str, Any] = {"next": None}
    for _ in range(5_000):
        value = {"next": value}
    with pytest.raises(RecordValidationError, match="nested too deep"):
        ser(value)
