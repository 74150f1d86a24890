"""Bounded reads of raw and dead-letter topics fetch with librdkafka (streaming/cfetch.py) and hand out
exactly what kafka-python hands out; every other read stays on kafka-python.

All over the real embedded broker. The comparison side of each check is the same Subscriber with
``fast_reader=False``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from kafka import KafkaProducer

from benchmarks.probe_read_committed import transactional_producer, txn
from streaming import config
from streaming.consumer import Record, Subscriber
from streaming.producer import Publisher, producer_config
from streaming.topics import dead_letter_topic, predictions_topic, raw_topic

pytest.importorskip("confluent_kafka", reason="confluent-kafka is a pinned dependency (requirements.lock)")


def _sensor(i: int) -> dict[str, Any]:
    return {"sensor_id": f"s-{i % 50}", "timestamp": 1_700_000_000_000 + i * 1000, "value": float(i), "unit": "C"}


def _publish(settings: config.Settings, n: int) -> None:
    with Publisher(settings) as pub:
        for i in range(n):
            pub.publish("sensor", _sensor(i))
        pub.flush()


def _items(settings: config.Settings, topic: str, **kw: Any) -> tuple[str, list[tuple[Any, ...]]]:
    with Subscriber(settings, topic, **kw) as sub:
        got = [(i.partition, i.offset, i.timestamp, i.key, list(i.headers), i.ok,
                i.value if isinstance(i, Record) else i.reason) for i in sub.iterate(idle_timeout_s=20)]
        assert sub.finished, "the bounded read ended before its bound"
        return sub.fetcher, got


def test_a_bounded_read_of_a_raw_topic_hands_out_what_kafka_python_does(settings: config.Settings) -> None:
    _publish(settings, 3000)
    topic = raw_topic(settings, "sensor")
    producer = KafkaProducer(**producer_config(settings))  # one undecodable record: an error item either way
    try:
        producer.send(topic, value=b"\x00\x00\x00\x00\x07junk", key=b"bad").get(timeout=10)
    finally:
        producer.close()
    fast = _items(settings, topic, start="beginning", until="end")
    slow = _items(settings.with_(fast_reader=False), topic, start="beginning", until="end")
    assert fast[0] == "librdkafka" and slow[0] == "kafka-python"
    assert len(fast[1]) == 3001
    assert sorted(fast[1]) == sorted(slow[1])
    assert sum(1 for row in fast[1] if not row[5]) == 1
    for p in {row[0] for row in fast[1]}:  # offsets ascend within a partition, no gap, no repeat
        offsets = [row[1] for row in fast[1] if row[0] == p]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


def test_offset_and_time_bounds_within_the_backlog_match_kafka_python(settings: config.Settings) -> None:
    _publish(settings, 600)
    topic = raw_topic(settings, "sensor")
    with Subscriber(settings, topic, start="end", decode=False) as sub:
        assert min(sub.consumer.position(tp) for tp in sub.assignment()) > 150, "50 sensors over 3 partitions"
    stamps = sorted(row[2] for row in _items(settings, topic, decode=False, start="beginning", until="end")[1])
    for kw in ({"start": {"offset": 20}, "until": {"offset": 150}},
               {"start": {"offsets": {0: 5, 1: 0, 2: 30}}, "until": "end"},
               {"start": {"timestamp": stamps[100]}, "until": {"timestamp": stamps[400]}}):
        fast = _items(settings, topic, decode=False, **kw)
        slow = _items(settings.with_(fast_reader=False), topic, decode=False, **kw)
        assert fast[0] == "librdkafka", kw
        assert fast[1] == slow[1] or sorted(fast[1]) == sorted(slow[1]), kw
        assert fast[1], kw


def test_reads_that_are_not_bounded_backlog_of_transaction_free_topics_stay_on_kafka_python(
        settings: config.Settings) -> None:
    _publish(settings, 50)
    raw = raw_topic(settings, "sensor")
    cases: list[tuple[str, dict[str, Any]]] = [
        (raw, {"start": "beginning"}),  # tailing: librdkafka would spin on the idle broker
        (raw, {"start": "beginning", "until": {"offset": 10_000}}),  # a bound past the end waits for records
        (predictions_topic(settings, "sensor_forecaster"), {"start": "beginning", "until": "end"}),  # transactional
    ]
    for topic, kw in cases:
        with Subscriber(settings, topic, decode=False, **kw) as sub:
            assert sub.fetcher == "kafka-python", (topic, kw)
    with Subscriber(settings.with_(fast_reader=False), raw, start="beginning", until="end") as sub:
        assert sub.fetcher == "kafka-python"
    with Subscriber(settings, dead_letter_topic(settings, "sensor"), start="beginning", until="end") as sub:
        assert sub.fetcher == "librdkafka"
        assert list(sub.iterate(idle_timeout_s=10)) == [] and sub.finished


def test_until_end_finishes_past_a_trailing_transaction_marker(settings: config.Settings) -> None:
    """A user's transactional producer wrote the raw topic last: its end offset is a commit marker's, which
    no record carries. The read still ends there (the position comes from librdkafka's partition end)."""
    topic = raw_topic(settings, "weblog")
    producer = transactional_producer(settings, f"{topic}.user-tx")
    try:
        txn(producer, topic, [b"a", b"b", b"c"], commit=True)
        txn(producer, topic, [b"d"], commit=True)
    finally:
        producer.close()
    fast = _items(settings, topic, decode=False, start="beginning", until="end")
    slow = _items(settings.with_(fast_reader=False), topic, decode=False, start="beginning", until="end")
    assert fast[0] == "librdkafka"
    assert sorted(row[6] for row in fast[1]) == [b"a", b"b", b"c", b"d"]
    assert sorted(fast[1]) == sorted(slow[1])


def test_pause_resume_and_seek_neither_lose_nor_repeat_records(settings: config.Settings) -> None:
    _publish(settings, 3000)
    topic = raw_topic(settings, "sensor")
    with Subscriber(settings, topic, start="beginning", until="end", decode=False) as sub:
        assert sub.fetcher == "librdkafka"
        p0, p1, p2 = sorted(sub.assignment(), key=lambda tp: tp.partition)
        got = {p0.partition: [], p1.partition: [], p2.partition: []}  # type: dict[int, list[int]]
        for item in sub.poll_batch(timeout_ms=5000, max_records=100):
            got[item.partition].append(item.offset)
        assert not sub.finished
        sub.consumer.seek(p1, 0)  # back to the start of one partition: its records come again, in order
        got[p1.partition] = []
        sub.pause(p0)
        for _ in range(5):
            for item in sub.poll_batch(timeout_ms=1000, max_records=200):
                assert item.partition != p0.partition, "a paused partition handed out records"
                got[item.partition].append(item.offset)
        sub.resume(p0)
        while not sub.finished:
            for item in sub.poll_batch(timeout_ms=1000):
                got[item.partition].append(item.offset)
        ends = {tp.partition: sub.consumer.position(tp) for tp in (p0, p1, p2)}
    for p, offsets in got.items():
        assert offsets == list(range(ends[p])), f"partition {p}: records lost, repeated or out of order"
    assert sum(ends.values()) == 3000


def test_a_backlog_over_the_old_receive_caps_is_read_by_both_clients(settings: config.Settings) -> None:
    """The embedded broker answers a fetch with the partition's whole unread backlog, whatever its size limits
    say (streaming/kafka_compat.py, fix 4). librdkafka refused answers over its 64 MiB cap and fetched the same
    answer again forever: a bounded read of an image topic over 64 MiB never ended (`subscribe --until-end`,
    replays, restart read-backs). kafka-python's cap (100 MB) is raised the same way; every consumer made
    after streaming.consumer was imported gets the new default."""
    from kafka import KafkaConsumer

    from streaming.kafka_compat import FETCH_RESPONSE_MAX_BYTES, installed

    assert installed()
    probe = KafkaConsumer(bootstrap_servers=settings.bootstrap)
    try:
        assert probe.config["receive_message_max_bytes"] == FETCH_RESPONSE_MAX_BYTES
    finally:
        probe.close()
    topic = raw_topic(settings, "image")
    producer = KafkaProducer(**producer_config(settings))
    try:
        for i in range(80):  # ~72 MB on one partition, as incompressible as photos: one fetch answer over 64 MiB
            blob = random.Random(i).randbytes(896_000)  # one record under the broker's ~1 MiB limit
            producer.send(topic, value=blob, key=b"k%d" % i, partition=0)
        producer.flush(timeout=60)
    finally:
        producer.close()
    for s in (settings, settings.with_(fast_reader=False)):
        with Subscriber(s, topic, start="beginning", until="end", decode=False) as sub:
            offsets = [item.offset for item in sub.iterate(idle_timeout_s=20) if item.partition == 0]
            assert sub.finished, f"the bounded read ({sub.fetcher}) never finished: {len(offsets)} of 80 records"
            assert offsets == list(range(80))
