"""The Publisher on librdkafka (streaming/cproduce.py): same partitions as kafka-python, kafka-python's
errors, and no acked record lost when the broker is killed with -9 under it."""

from __future__ import annotations

import threading
import time

import pytest
from kafka import errors as kerr

from streaming.config import Settings
from streaming.consumer import Subscriber
from streaming.cproduce import CProducer
from streaming.producer import Publisher, producer_config
from streaming.topics import ensure_topics, raw_topic
from tests.broker_crash_helpers import Kill9Restart, crash_broker_fixture  # noqa: F401 - the fixture


def _partitions_by_key(settings: Settings, topic: str) -> dict[bytes, set[int]]:
    out: dict[bytes, set[int]] = {}
    with Subscriber(settings, topic, start="beginning", until="end", decode=False) as sub:
        for item in sub:
            out.setdefault(item.key or b"", set()).add(item.partition)
    return out


def test_the_publisher_sends_with_librdkafka_by_default_and_the_setting_turns_it_off(settings: Settings) -> None:
    with Publisher(settings) as fast, Publisher(settings.with_(fast_publisher=False)) as slow:
        assert (fast.client, slow.client) == ("librdkafka", "kafka-python")
    with Publisher(settings, linger_ms=0) as tuned:  # overrides are kafka-python's names: kafka-python sends
        assert tuned.client == "kafka-python"


def test_keys_land_on_the_same_partitions_with_either_client(settings: Settings) -> None:
    """Per-key order needs one partition per key, whichever client (or version of the platform) sent it."""
    ensure_topics(settings)
    topic = raw_topic(settings, "sensor")
    keys = [f"sensor-{i}".encode() for i in range(60)]
    for fast in (True, False):
        with Publisher(settings.with_(fast_publisher=fast)) as pub:
            for k in keys:
                pub.send_bytes(topic, b"v", key=k)
            pub.flush()
    by_key = _partitions_by_key(settings, topic)
    assert set(by_key) >= set(keys)
    spread = {k: parts for k, parts in by_key.items() if k in keys}
    assert all(len(parts) == 1 for parts in spread.values()), {k: p for k, p in spread.items() if len(p) > 1}
    assert len({next(iter(p)) for p in spread.values()}) > 1  # the keys do spread over the partitions


def test_send_failures_are_kafka_python_errors(settings: Settings) -> None:
    ensure_topics(settings)
    producer = CProducer(producer_config(settings))
    try:
        with pytest.raises(kerr.UnknownTopicOrPartitionError):
            producer.send(raw_topic(settings, "sensor"), b"v", key=b"k", partition=99).get(timeout=30)
        md = producer.send(raw_topic(settings, "sensor"), b"v", key=b"k", partition=0,
                           timestamp_ms=1_000_000_000_000).get(timeout=30)
        assert (md.partition, md.timestamp) == (0, 1_000_000_000_000)
        assert producer.partitions_for(raw_topic(settings, "sensor")) == {0, 1, 2}
    finally:
        producer.close(10)


def test_no_acked_record_is_lost_when_the_broker_is_killed_under_librdkafka(
        crash_broker: tuple[Settings, Kill9Restart]) -> None:
    """librdkafka's idempotent producer fails for good when the broker comes back without its sequence
    state; the adapter replaces it and the ack ledger sends again what was lost or purged."""
    settings, kill9_restart = crash_broker
    topic = raw_topic(settings, "weblog")
    acked: set[bytes] = set()
    stop = threading.Event()
    with Publisher(settings) as pub:
        assert pub.client == "librdkafka"

        def send() -> None:
            i = 0
            while not stop.is_set() and i < 20_000:
                value = b"rec-%06d" % i
                pub.send_bytes(topic, value, key=b"k%d" % (i % 5)).add_callback(
                    lambda _md, v=value: acked.add(v))
                i += 1
                if i % 50 == 0:
                    time.sleep(0.01)  # a paced source: ~5,000 records/s at most

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        deadline = time.monotonic() + 60
        while len(acked) < 2_000:  # acks before the kill, so the broker has something to lose
            assert time.monotonic() < deadline, f"only {len(acked)} acks in 60 s"
            time.sleep(0.05)  # bounded wait for the sender's progress
        kill9_restart()
        time.sleep(1.0)  # keep sending across the restart
        stop.set()
        sender.join(timeout=30)
        assert pub.settle(timeout=120), "the ack ledger did not settle after the broker restart"
    with Subscriber(settings, topic, start="beginning", until="end", decode=False) as sub:
        seen = {item.raw for item in sub}
    assert seen  # the read worked
    lost = acked - seen
    assert not lost, f"{len(lost)} acked records are not on the topic, e.g. {sorted(lost)[:3]}"
