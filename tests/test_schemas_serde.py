"""Wire format: every built-in schema round-trips, bad bytes give typed errors fast, bad records
name the field. Uses a real FileRegistry in a temp directory (no broker needed)."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path
from typing import Any

import fastavro
import pytest

from schemas import catalog
from schemas.exceptions import (
    BadMagicByteError,
    FramingError,
    IncompatibleReaderError,
    InvalidSchemaError,
    MalformedRecordError,
    RecordValidationError,
    SchemaNotFoundError,
    ShortPayloadError,
    TruncatedRecordError,
    UnknownSchemaIdError,
)
from schemas.registry import FileRegistry
from schemas.serde import MAGIC, AvroDeserializer, AvroSerializer, Decoded, frame, unframe

TS = 1_700_000_000_123  # epoch ms with a non-zero millisecond part: must survive exactly

RECORDS: dict[str, dict[str, Any]] = {
    "WebLogEvent": {
        "event_id": "e1", "client_ip": "83.149.9.216", "ident": None, "user": "bob",
        "timestamp": TS, "method": "GET", "path": "/presentations/logstash/?q=1", "protocol": "HTTP/1.1",
        "status": 200, "bytes_sent": 203023, "referrer": "http://semicomplete.com/",
        "user_agent": "Mozilla/5.0 (Macintosh)", "latency_ms": 12.5, "label": "normal", "source": "f:1",
    },
    "SensorReading": {
        "sensor_id": "s-1", "timestamp": TS, "value": 21.5, "values": {"humidity": 40.0},
        "unit": "celsius", "label": False, "event_id": None,
    },
    "ImageEvent": {
        "image_id": "abc", "timestamp": TS, "content_type": "PNG", "width": 28, "height": 28,
        "data": b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "label": "7", "source": None,
    },
    "PredictionRequest": {
        "request_id": "r1", "model": "digits_cnn", "timestamp": TS, "event_json": None,
        "features": [0.5, 1.0, -2.0], "reply_topic": None,
    },
    "Prediction": {
        "request_id": "r1", "model": "digits_cnn", "model_version": 3, "outputs": [0.1, 0.9],
        "predicted_label": "7", "latency_ms": 4.25, "input_topic": "t", "input_partition": 2,
        "input_offset": 2**40, "error": None,
    },
    "ModelUpdate": {
        "model": "digits_cnn", "version": 4, "action": "PROMOTED", "path": "/m/digits_cnn/4",
        "timestamp": TS, "primary_metric": "accuracy", "candidate_score": 0.97, "current_score": None,
        "reason": "better",
    },
    "DeadLetter": {"stage": "decode", "error_class": "BadMagicByteError", "message": "m", "source": None},
}


@pytest.fixture()
def registry(tmp_path: Path) -> FileRegistry:
    return FileRegistry(tmp_path / "registry")


def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_catalog_lists_every_avsc_and_parses_them() -> None:
    assert set(catalog.SCHEMA_NAMES) == set(RECORDS)
    for name in catalog.SCHEMA_NAMES:
        assert catalog.load_schema(name)["name"] == name
        assert catalog.parse(catalog.load_schema(name)) is catalog.parse(catalog.load_schema(name))
    with pytest.raises(SchemaNotFoundError, match="choose one of"):
        catalog.load_schema("Nope")
    with pytest.raises(InvalidSchemaError, match="not valid JSON"):
        catalog.parse("{nope")


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_round_trip_every_schema(registry: FileRegistry, name: str) -> None:
    ser = AvroSerializer(registry, f"t.{name}-value", catalog.load_schema(name))
    data = ser(RECORDS[name], None)
    assert data[0] == MAGIC and struct.unpack(">I", data[1:5])[0] == ser.schema_id
    decoded = AvroDeserializer(registry)(data, None)
    assert isinstance(decoded, Decoded)
    assert decoded.schema_id == ser.schema_id
    assert decoded.value == RECORDS[name]
    if "timestamp" in RECORDS[name]:
        assert type(decoded.value["timestamp"]) is int  # logical types off: plain epoch millis
    # The body is standard Avro: fastavro with the registered schema reads the same record back.
    body = io.BytesIO(bytes(unframe(data)[1]))
    plain = catalog.strip_logical_types(catalog.load_schema(name))
    assert fastavro.schemaless_reader(body, fastavro.parse_schema(plain), None) == RECORDS[name]


def test_defaults_fill_missing_optional_fields(registry: FileRegistry) -> None:
    ser = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))
    record = {"sensor_id": "a", "timestamp": 5, "value": 1, "unit": "c"}
    value = AvroDeserializer(registry)(ser(record)).value
    assert value == {**record, "value": 1.0, "values": {}, "label": None, "event_id": None}


def test_frame_unframe() -> None:
    data = frame(7, b"abc")
    assert data == b"\x00\x00\x00\x00\x07abc"
    schema_id, body = unframe(data)
    assert schema_id == 7 and bytes(body) == b"abc"


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"", ShortPayloadError, "0 bytes is shorter than the 5-byte"),
        (None, ShortPayloadError, r"the value is null \(a Kafka tombstone"),  # kafka-python's value of a tombstone
        (b"\x00\x00\x01", ShortPayloadError, "3 bytes"),
        (b'{"json": 1}', BadMagicByteError, "0x7b"),
        (b"\x00\x00\x00\x03\xe7\x02", UnknownSchemaIdError, "schema id 999"),
    ],
)
def test_framing_errors_are_typed(registry: FileRegistry, data: bytes | None, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        AvroDeserializer(registry)(data)
    assert isinstance(info.value, FramingError)


def test_truncated_and_trailing_bytes(registry: FileRegistry) -> None:
    ser = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))
    data = ser(RECORDS["SensorReading"])
    des = AvroDeserializer(registry)
    with pytest.raises(TruncatedRecordError, match="ends early"):
        des(data[:-3])
    with pytest.raises(TruncatedRecordError, match="2 trailing bytes"):
        des(data + b"\x00\x00")


def test_malformed_union_index_is_typed(registry: FileRegistry) -> None:
    schema = {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", "string"]}]}
    schema_id = registry.register("u-value", schema)
    with pytest.raises(MalformedRecordError):
        AvroDeserializer(registry)(frame(schema_id, _zigzag(9)))


@pytest.mark.parametrize(
    "field_type",
    [
        {"type": "array", "items": "double"},
        {"type": "array", "items": "null"},  # zero-byte items: only the guard can bound this
        {"type": "array", "items": {"type": "record", "name": "E", "fields": []}},
        {"type": "map", "values": "null"},
        "string",
        "bytes",
    ],
)
def test_absurd_declared_sizes_fail_fast(registry: FileRegistry, field_type: Any) -> None:
    schema = {"type": "record", "name": "H", "fields": [{"name": "x", "type": field_type}]}
    schema_id = registry.register("h-value", schema)
    des = AvroDeserializer(registry)
    for declared in (2**40, 2**62, -(2**40)):
        start = time.perf_counter()
        with pytest.raises((TruncatedRecordError, MalformedRecordError)):
            des(frame(schema_id, _zigzag(declared) + b"\x00\x01\x02"))
        assert time.perf_counter() - start < 2.0  # generous: a real bug would take hours or OOM


def test_zero_size_items_still_decode_when_honest(registry: FileRegistry) -> None:
    array_of_null = {"type": "array", "items": "null"}
    schema = {"type": "record", "name": "Z", "fields": [{"name": "x", "type": array_of_null}]}
    ser = AvroSerializer(registry, "z-value", schema)
    assert AvroDeserializer(registry)(ser({"x": [None] * 5})).value == {"x": [None] * 5}


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("SensorReading", {"value": "abc"}, "SensorReading.value: expected double (got 'abc')"),
        ("SensorReading", {"value": True}, "SensorReading.value: expected double (got True)"),
        ("SensorReading", {"values": {"humidity": "x"}}, "SensorReading.values[humidity]: expected double"),
        ("SensorReading", {"unit": None}, "SensorReading.unit: expected string (got None)"),
        ("SensorReading", {"label": "yes"}, "SensorReading.label: expected one of null, boolean"),
        ("WebLogEvent", {"status": 2**31}, "WebLogEvent.status: expected int: out of range"),
        ("WebLogEvent", {"timestamp": "2024-01-01"}, "WebLogEvent.timestamp: expected long"),
        ("ImageEvent", {"content_type": "GIF"},
         "ImageEvent.content_type: expected one of the symbols PNG, JPEG (got 'GIF')"),
        ("ImageEvent", {"data": "not bytes"}, "ImageEvent.data: expected bytes"),
        ("Prediction", {"outputs": [0.1, "x"]}, "Prediction.outputs[1]: expected double (got 'x')"),
        ("PredictionRequest", {"features": [1.0, None]}, "PredictionRequest.features[1]: expected float"),
    ],
)
def test_validation_errors_name_the_field(
    registry: FileRegistry, name: str, change: dict[str, Any], message: str
) -> None:
    ser = AvroSerializer(registry, f"{name}-value", catalog.load_schema(name))
    with pytest.raises(RecordValidationError) as info:
        ser({**RECORDS[name], **change})
    assert str(info.value).startswith(message)
    assert info.value.field == message.split(":")[0].split(".", 1)[1]


def test_missing_required_field_and_non_dict(registry: FileRegistry) -> None:
    ser = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))
    record = dict(RECORDS["SensorReading"])
    del record["unit"]
    with pytest.raises(RecordValidationError, match=r"^SensorReading\.unit: missing required field"):
        ser(record)
    with pytest.raises(RecordValidationError, match=r"^SensorReading: expected a dict"):
        ser(["not", "a", "dict"])


def test_nested_and_recursive_records_validate(registry: FileRegistry) -> None:
    schema = {
        "type": "record", "name": "Node", "fields": [
            {"name": "v", "type": "int"},
            {"name": "next", "type": ["null", "Node"], "default": None},
        ],
    }
    ser = AvroSerializer(registry, "n-value", schema)
    good = {"v": 1, "next": {"v": 2, "next": None}}
    assert AvroDeserializer(registry)(ser(good)).value == good
    with pytest.raises(RecordValidationError, match=r"^Node\.next\.next\.v: expected int"):
        ser({"v": 1, "next": {"v": 2, "next": {"v": "x"}}})


def test_serializer_registers_once_and_ids_are_stable(registry: FileRegistry) -> None:
    schema = catalog.load_schema("SensorReading")
    a = AvroSerializer(registry, "s-value", schema)
    b = AvroSerializer(registry, "s-value", schema)
    a(RECORDS["SensorReading"])
    b(RECORDS["SensorReading"])
    assert a.schema_id == b.schema_id == 1
    assert registry.versions("s-value") == [1]


def test_reader_schema_incompatible_with_writer_is_typed(registry: FileRegistry) -> None:
    ser = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))
    reader = catalog.load_schema("SensorReading")
    reader["fields"].append({"name": "site", "type": "string"})
    with pytest.raises(IncompatibleReaderError, match="reader field 'site' of SensorReading has no default"):
        AvroDeserializer(registry, reader_schema=reader)(ser(RECORDS["SensorReading"]))


def test_deserializer_accepts_any_bytes_like(registry: FileRegistry) -> None:
    ser = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))
    data = ser(RECORDS["SensorReading"])
    des = AvroDeserializer(registry)
    for form in (bytearray(data), memoryview(data)):
        assert des(form) == Decoded(RECORDS["SensorReading"], ser.schema_id)


def test_bad_record_is_reported_even_when_registry_is_down() -> None:
    from schemas.http_client import HttpRegistryClient

    ser = AvroSerializer(HttpRegistryClient("http://127.0.0.1:9", timeout=2), "s-value",
                         catalog.load_schema("SensorReading"))
    with pytest.raises(RecordValidationError, match="SensorReading.value"):
        ser({**RECORDS["SensorReading"], "value": "abc"})


@pytest.mark.parametrize(
    ("schema", "value"),
    [("string", "key-1"), ("long", -(2**40)), (["null", "double"], 2.5), ({"type": "array", "items": "int"}, [1, 2])],
)
def test_non_record_schemas_round_trip(registry: FileRegistry, schema: Any, value: Any) -> None:
    ser = AvroSerializer(registry, "k-key", schema)
    assert AvroDeserializer(registry)(ser(value)).value == value
    with pytest.raises(RecordValidationError, match=r"^value: expected"):
        ser(object())


def test_a_pair_the_checker_lets_through_but_fastavro_cannot_resolve_is_a_typed_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fastavro's SchemaResolutionError is a plain Exception: it escaped every caller's handler (the gateway
    answered 500 with a traceback, a Subscriber stopped at the record at every restart). Whatever the
    compatibility check misses now reaches callers as the IncompatibleReaderError they handle."""
    from schemas import compat

    registry = FileRegistry(tmp_path)
    writer = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "string"}]}
    reader = {"type": "record", "name": "R", "fields": [{"name": "b", "type": "string"}]}
    data = AvroSerializer(registry, "r-value", writer)({"a": "x"})
    monkeypatch.setattr(compat, "reader_errors", lambda *a, **k: [])  # a checker that misses the pair
    with pytest.raises(IncompatibleReaderError, match="No default value for field b"):
        AvroDeserializer(registry, reader_schema=reader)(data)
    assert isinstance(AvroDeserializer(registry, reader_schema=reader).decode_many([data])[0], IncompatibleReaderError)
