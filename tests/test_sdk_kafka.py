"""Publisher/Subscriber SDK against the real embedded broker over TCP."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from schemas.exceptions import RecordValidationError
from streaming.config import Settings
from streaming.consumer import ErrorItem, Record, Subscriber
from streaming.exceptions import OffsetOutOfRangeError, RecordTooLargeError
from streaming.polling import poll_until
from streaming.producer import Publisher, header_dict
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic

NOW = int(time.time() * 1000)

PNG_1PX = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c63600000000200015d0b2a3a0000000049454e44ae426082")


def weblog(i: int, ip: str = "10.0.0.1") -> dict:
    return {"event_id": f"w{i}", "client_ip": ip, "timestamp": NOW + i, "method": "GET",
            "path": f"/p/{i}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 512,
            "user_agent": "Mozilla/5.0", "latency_ms": 12.5, "label": "normal"}


def sensor(i: int, sid: str = "s-1") -> dict:
    return {"sensor_id": sid, "timestamp": NOW + i * 1000, "value": 20.0 + i, "unit": "celsius",
            "values": {"humidity": 0.4}, "label": False}


def image(i: int) -> dict:
    return {"image_id": f"img-{i}", "timestamp": NOW + i, "content_type": "PNG", "width": 1, "height": 1,
            "data": PNG_1PX, "label": "7"}


@pytest.mark.parametrize("kind,make", [("weblog", weblog), ("sensor", sensor), ("image", image)])
def test_round_trip_every_kind(settings: Settings, kind: str, make) -> None:
    records = [make(i) for i in range(20)]
    with Publisher(settings) as pub:
        metas = [pub.publish(kind, r).get(timeout=10) for r in records]
    assert all(m.offset >= 0 for m in metas)
    items = read_topic(settings, raw_topic(settings, kind), expect=20)
    assert all(isinstance(i, Record) for i in items)
    got = sorted((i.value for i in items), key=lambda v: str(v.get("event_id") or v.get("image_id") or v["timestamp"]))
    want = sorted(records, key=lambda v: str(v.get("event_id") or v.get("image_id") or v["timestamp"]))
    for g, w in zip(got, want, strict=True):
        for k, v in w.items():
            assert g[k] == v, (k, g[k], v)
    assert all(i.schema_id and i.schema_id > 0 for i in items)


def test_same_key_same_partition(settings: Settings) -> None:
    with Publisher(settings) as pub:
        metas = [pub.publish("sensor", sensor(i, sid=f"s-{i % 4}")).get(timeout=10) for i in range(40)]
    by_key: dict[str, set[int]] = {}
    for i, m in enumerate(metas):
        by_key.setdefault(f"s-{i % 4}", set()).add(m.partition)
    assert all(len(parts) == 1 for parts in by_key.values())
    # murmur2 (Java-compatible) puts different keys on more than one partition
    assert len({next(iter(p)) for p in by_key.values()}) > 1


def test_snappy_on_the_wire(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The producer's bytes on the TCP socket hold a v2 record batch whose codec bits say snappy.

    The broker itself (noida-db) re-serves batches uncompressed, so the check is made on what the
    producer sends: batches are found by their magic byte and a valid CRC-32C.
    """
    import crc32c

    sent: list[bytes] = []
    real_send = socket.socket.send

    def spy(sock: socket.socket, data, *args):  # type: ignore[no-untyped-def]
        sent.append(bytes(data))
        return real_send(sock, data, *args)

    monkeypatch.setattr(socket.socket, "send", spy)
    # kafka-python: its sockets are Python's, so the spy sees its bytes (librdkafka's are C sockets; its
    # setting is checked in test_librdkafka_publisher_compresses_with_snappy below)
    with Publisher(settings.with_(fast_publisher=False)) as pub:  # a batch: kafka-python sends uncompressed
        # when snappy would not shrink it
        futures = [pub.publish("weblog", weblog(i)) for i in range(50)]
        pub.flush()
        [f.get(timeout=10) for f in futures]
    monkeypatch.undo()
    wire = b"".join(sent)
    codecs = []
    for i in range(len(wire) - 61):
        if wire[i + 16] != 2:
            continue
        length = struct.unpack(">i", wire[i + 8:i + 12])[0]
        if not 49 <= length <= len(wire) - i - 12:
            continue
        crc = struct.unpack(">I", wire[i + 17:i + 21])[0]
        if crc32c.crc32c(wire[i + 21:i + 12 + length]) == crc:
            codecs.append(struct.unpack(">h", wire[i + 21:i + 23])[0] & 0x7)
    assert codecs, "no record batch found in the producer's bytes"
    assert set(codecs) == {2}, f"compression codecs {codecs} (2 = snappy)"


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk
        buf += chunk
    return buf


def test_invalid_record_refused_with_field_name(settings: Settings) -> None:
    bad = sensor(1)
    bad["value"] = "hot"
    with Publisher(settings) as pub, pytest.raises(RecordValidationError) as err:
        pub.publish("sensor", bad)
    assert "value" in str(err.value) and "hot" in str(err.value)
    missing = weblog(1)
    del missing["status"]
    with Publisher(settings) as pub, pytest.raises(RecordValidationError) as err:
        pub.publish("weblog", missing)
    assert "status" in str(err.value)


def test_oversized_record_refused_before_sending(settings: Settings) -> None:
    big = image(1)
    big["data"] = b"\x89PNG" + b"x" * 5000
    with Publisher(settings, max_record_bytes=4096) as pub, pytest.raises(RecordTooLargeError) as err:
        pub.publish("image", big)
    assert "4096" in str(err.value)


def test_replay_from_timestamp_returns_exactly_records_at_or_after(settings: Settings) -> None:
    topic = raw_topic(settings, "sensor")
    with Publisher(settings) as pub:
        first = [pub.publish("sensor", sensor(i, sid=f"s-{i % 3}")) for i in range(30)]
        pub.flush()
        metas1 = [f.get(timeout=10) for f in first]
        cut = max(m.timestamp for m in metas1) + 1
        # the broker stamps CreateTime from the producer clock: let it pass the cut (a few ms)
        assert poll_until(lambda: int(time.time() * 1000) > cut, 5, interval_s=0.002)
        second = [pub.publish("sensor", sensor(100 + i, sid=f"s-{i % 3}")) for i in range(20)]
        pub.flush()
        metas2 = [f.get(timeout=10) for f in second]
    with Subscriber(settings, topic, start={"timestamp": cut}, until="end") as sub:
        items = list(sub)
    got = {(i.partition, i.offset) for i in items}
    assert got == {(m.partition, m.offset) for m in metas2}
    assert all(i.timestamp >= cut for i in items)


def test_until_offset_and_from_offset(settings: Settings) -> None:
    with Publisher(settings) as pub:
        for i in range(10):
            pub.publish("sensor", sensor(i))  # one key -> one partition
    items = read_topic(settings, raw_topic(settings, "sensor"), expect=10)
    part = items[0].partition
    with Subscriber(settings, raw_topic(settings, "sensor"), start={"offset": 3}, until={"offset": 7},
                    partitions=[part]) as sub:
        assert [i.offset for i in sub] == [3, 4, 5, 6]


def test_undecodable_records_become_error_items(settings: Settings) -> None:
    topic = raw_topic(settings, "weblog")
    with Publisher(settings) as pub:
        good = pub.encode(topic, "WebLogEvent", weblog(1))
        payloads = [b"\x01garbage", b"\x00\x00", b"\x00\x00\x01\x86\xa0" + good[5:], good[:-3], good]
        for p in payloads:
            pub.send_bytes(topic, p, key="k")
    items = read_topic(settings, topic, expect=5)
    ordered = sorted(items, key=lambda x: x.offset)
    kinds = [type(i.error).__name__ if isinstance(i, ErrorItem) else "ok" for i in ordered]
    assert kinds == ["BadMagicByteError", "ShortPayloadError", "UnknownSchemaIdError", "TruncatedRecordError", "ok"]
    assert all(i.offset >= 0 and i.topic == topic for i in items)


def test_timestamp_beyond_retention_is_an_error(settings: Settings) -> None:
    """A partition whose head was deleted reports what it still holds instead of jumping."""
    from kafka import KafkaAdminClient

    topic = raw_topic(settings, "sensor")
    with Publisher(settings) as pub:
        metas = [pub.publish("sensor", sensor(i)).get(timeout=10) for i in range(6)]
    tp = TopicPartition(topic, metas[0].partition)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap)
    try:
        admin.delete_records({tp: 3})
    except Exception as exc:  # noqa: BLE001 - capability probe of the broker
        pytest.skip(f"broker does not support DeleteRecords: {exc}")
    finally:
        admin.close()
    with pytest.raises(OffsetOutOfRangeError) as err:
        Subscriber(settings, topic, start={"timestamp": metas[0].timestamp - 10_000}, partitions=[tp.partition])
    assert "earliest available is offset 3" in str(err.value)


def test_dead_letter_keeps_original_bytes_and_reason(settings: Settings) -> None:
    with Publisher(settings) as pub:
        pub.dead_letter("weblog", b"not a log line", stage="parse", error=ValueError("no request line"),
                        source={"file": "access.log", "line": 12}).get(timeout=10)
    items = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, expect=1)
    assert items[0].raw == b"not a log line"
    h = header_dict(items[0].headers)
    assert h["dl.stage"] == "parse" and h["dl.error_class"] == "ValueError"
    assert h["dl.source_file"] == "access.log" and h["dl.source_line"] == "12"


def test_group_commit_resumes(settings: Settings) -> None:
    topic = raw_topic(settings, "sensor")
    with Publisher(settings) as pub:
        for i in range(10):
            pub.publish("sensor", sensor(i))
    group = settings.group("g1")
    seen = []
    last_committed: dict[int, int] = {}
    with Subscriber(settings, topic, group=group) as sub:
        deadline = time.monotonic() + 20
        while len(seen) < 4 and time.monotonic() < deadline:
            for item in sub.poll_batch(300, max_records=1):
                seen.append(item.offset)
                sub.commit({TopicPartition(item.topic, item.partition): item.offset + 1})
                last_committed[item.partition] = item.offset + 1
    assert len(seen) == 4 and len(last_committed) == 1, "all ten events share one key, so one partition"
    rest = []
    with Subscriber(settings, topic, group=group) as sub:
        deadline = time.monotonic() + 20
        while len(seen) + len(rest) < 10 and time.monotonic() < deadline:
            rest += [i.offset for i in sub.poll_batch(300)]
    assert sorted(seen + rest) == list(range(10))
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group, enable_auto_commit=False)
    try:  # the second subscriber committed nothing: the group's offset is still the first one's last commit
        committed = {p: c.committed(TopicPartition(topic, p)) for p in range(settings.partitions)}
        assert committed == {p: last_committed.get(p) for p in range(settings.partitions)}
        assert committed[next(iter(last_committed))] == max(seen) + 1 == 4
    finally:
        c.close()


def test_librdkafka_publisher_compresses_with_snappy(settings: Settings) -> None:
    """The default Publisher (librdkafka) is configured like kafka-python's: snappy, acks=all, idempotence,
    and the Java client's murmur2 key partitioner (the wire check above cannot see C sockets)."""
    from streaming.cproduce import CProducer, librdkafka_config
    from streaming.producer import producer_config

    with Publisher(settings) as pub:
        assert isinstance(pub.producer, CProducer)
    cfg = librdkafka_config(producer_config(settings))
    assert (cfg["compression.type"], cfg["acks"], cfg["enable.idempotence"], cfg["partitioner"]) == \
        ("snappy", "all", True, "murmur2_random")
