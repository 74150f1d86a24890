"""The SDK's hot paths (issue 13 item 4) keep the per-record checks: batch decode gives exactly the
per-record results and error classes, and the publisher's per-topic caches keep validation and the
tenant check. Broker-free except the last test, which needs the session broker for ``publish_many``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from schemas import catalog
from schemas.exceptions import RecordValidationError, SchemaError
from schemas.registry import FileRegistry
from schemas.serde import AvroDeserializer, AvroSerializer, Decoded, frame
from streaming.ackguard import GuardedSend
from streaming.config import Settings
from streaming.consumer import Subscriber
from streaming.producer import Publisher
from streaming.topics import raw_topic
from tests.helpers import read_topic

READING: dict[str, Any] = {"sensor_id": "s-1", "timestamp": 1_700_000_000_000, "value": 21.5,
                           "values": {"humidity": 40.0}, "unit": "C", "label": None, "event_id": None}


@pytest.fixture()
def registry(tmp_path: Path) -> FileRegistry:
    return FileRegistry(tmp_path / "registry")


def _outcome(result: Any) -> Any:
    return ("ok", result.value, result.schema_id) if isinstance(result, Decoded) else type(result).__name__


def _one(des: AvroDeserializer, data: Any) -> Any:
    try:
        return _outcome(des(data))
    except SchemaError as exc:
        return type(exc).__name__


def test_decode_many_equals_per_record_decode_good_and_bad(registry: FileRegistry) -> None:
    ser = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))
    good = ser(READING)
    other = ser({**READING, "sensor_id": "s-2", "values": {}})
    nested = {"type": "record", "name": "Z", "fields": [{"name": "x", "type": {"type": "array", "items": "null"}}]}
    guarded = AvroSerializer(registry, "z-value", nested)({"x": [None] * 3})  # a schema that needs the guard walk
    payloads: list[Any] = [good, None, b"", b"\x00\x00", b"\x01garbage", frame(999, good[5:]), good[:-3],
                           good + b"\x00\x00", frame(ser.schema_id, b"\x80"), bytearray(other),
                           memoryview(good), guarded, good]
    fresh = AvroDeserializer(registry)  # no plan cached yet: the first payload takes the slow path
    batch = fresh.decode_many(payloads)
    assert [_outcome(r) for r in batch] == [_one(AvroDeserializer(registry), p) for p in payloads]
    assert [_outcome(r)[0] if isinstance(r, Decoded) else _outcome(r) for r in batch] == [
        "ok", "ShortPayloadError", "ShortPayloadError", "ShortPayloadError", "BadMagicByteError",
        "UnknownSchemaIdError", "TruncatedRecordError", "TruncatedRecordError", "MalformedRecordError",
        "ok", "ok", "ok", "ok"]
    assert _outcome(batch[9])[1]["sensor_id"] == "s-2" and _outcome(batch[11])[1] == {"x": [None] * 3}


def test_decode_many_lets_a_registry_outage_through(registry: FileRegistry) -> None:
    """Only record faults stay in place; an error that is not the record's (here: any non-schema
    exception from the registry) must propagate, as from the per-record call."""
    good = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))(READING)

    class Down(FileRegistry):
        def get_schema(self, schema_id: int) -> str:
            raise ConnectionError("registry down")

    with pytest.raises(ConnectionError):
        AvroDeserializer(Down(registry.directory)).decode_many([good])


def test_serializer_still_refuses_invalid_records_after_caching(registry: FileRegistry) -> None:
    ser = AvroSerializer(registry, "s-value", catalog.load_schema("SensorReading"))
    ser(READING)
    with pytest.raises(RecordValidationError, match=r"SensorReading.value: expected double"):
        ser({**READING, "value": "warm"})


def test_guarded_send_get_waits_and_wakes_on_resolution() -> None:
    """The latch is built lazily: a waiter that starts before the ack must still be woken."""
    fut = GuardedSend("t", None, b"v", None)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(fut.get(timeout=10)))
    waiter.start()
    fut.success("md")
    waiter.join(timeout=10)
    assert got == ["md"] and fut.get(timeout=0) == "md"
    failed = GuardedSend("t", None, b"v", None).failure(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        failed.get(timeout=0)


def test_publish_many_validates_all_before_sending_then_sends_keyed(settings: Settings) -> None:
    """Uses the session broker: an invalid record stops the whole batch before any send; a valid batch
    arrives whole, keyed like ``publish`` (same sensor, same partition) and decodes through poll_batch."""
    topic = raw_topic(settings, "sensor")
    rows = [{**READING, "timestamp": READING["timestamp"] + i, "sensor_id": f"s-{i % 2}"} for i in range(6)]
    with Publisher(settings) as pub:
        with pytest.raises(RecordValidationError, match=r"SensorReading.value: expected double"):
            pub.publish_many("sensor", [*rows[:3], {**READING, "value": "warm"}, *rows[3:]])
        pub.flush()
        assert sum(_end_offsets(settings, topic).values()) == 0  # nothing of the bad batch was sent
        futures = pub.publish_many("sensor", rows)
        pub.flush()
        parts = {f.get(timeout=10).partition for f in futures}
    items = read_topic(settings, topic, expect=6)
    assert all(i.ok for i in items) and sorted(i.value["timestamp"] for i in items) == [r["timestamp"] for r in rows]
    by_sensor: dict[str, set[int]] = {}
    for i in items:
        by_sensor.setdefault(i.value["sensor_id"], set()).add(i.partition)
    assert all(len(p) == 1 for p in by_sensor.values()) and parts == set().union(*by_sensor.values())


def _end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """End offsets per partition of ``topic``."""
    with Subscriber(settings, topic, start="beginning", decode=False) as sub:
        ends = sub.consumer.end_offsets(sorted(sub.assignment(), key=lambda tp: tp.partition))
    return {tp.partition: off for tp, off in ends.items()}
