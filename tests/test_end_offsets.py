"""EndOffsetProbe (streaming/end_offsets.py) and IdlePoller with it, on the real embedded broker: the probe
sees new records and committed transactions (not open ones), an idle poller fetches for real only about
once per ``full_poll_s`` yet delivers a record at once, and a probe that cannot tell falls back to fetching."""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.config import Settings
from streaming.consumer import IdlePoller, consumer_config
from streaming.end_offsets import EndOffsetProbe, _decode, _encode
from streaming.producer import producer_config
from streaming.topics import TopicSpec, ensure_topics
from tests.helpers import wait_until


def _topic(settings: Settings, partitions: int = 2) -> str:
    name = settings.topic(f"probe-{uuid.uuid4().hex[:6]}")
    ensure_topics(settings, [TopicSpec(name, partitions, 3_600_000, "delete", None, "test_end_offsets")])
    return name


def _assigned(settings: Settings, topic: str, partitions: int = 2) -> KafkaConsumer:
    consumer = KafkaConsumer(**consumer_config(settings))
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    wait_until(lambda: consumer.poll(10) == {} and all(consumer.position(tp) is not None for tp in tps),
               timeout=30, message="positions")
    return consumer


def _drain(consumer: KafkaConsumer, n: int) -> list[Any]:
    seen: list[Any] = []

    def step() -> bool:
        for recs in consumer.poll(100).values():
            seen.extend(recs)
        return len(seen) >= n
    wait_until(step, timeout=30, interval=0.0, message=f"{n} records")
    return seen


def test_request_and_answer_codec() -> None:
    """The request frame has the Kafka layout (size, api key 2, version 2, correlation id, client id, ...)."""
    frame = _encode(7, 1, {"t": [0, 3]})
    size, api, version, correlation = int.from_bytes(frame[:4], "big"), frame[4:6], frame[6:8], frame[8:12]
    assert size == len(frame) - 4 and api == b"\x00\x02" and version == b"\x00\x02"
    assert int.from_bytes(correlation, "big") == 7
    answer = (b"\x00\x00\x00\x07" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x01" + b"\x00\x01t" + b"\x00\x00\x00\x01"
              + b"\x00\x00\x00\x03" + b"\x00\x00" + (-1).to_bytes(8, "big", signed=True) + (42).to_bytes(8, "big"))
    assert _decode(answer) == (7, {TopicPartition("t", 3): (0, 42)})


def test_probe_sees_new_records_and_committed_transactions_only(settings: Settings) -> None:
    topic = _topic(settings)
    consumer = _assigned(settings, topic)
    producer = KafkaProducer(**producer_config(settings))
    tx = KafkaProducer(**producer_config(settings, transactional_id=f"probe-tx-{uuid.uuid4().hex[:6]}"))
    probe = EndOffsetProbe(consumer)
    tps = consumer.assignment()
    try:
        assert probe.isolation == 1  # consumer_config reads committed
        assert probe.has_news(tps) is False
        producer.send(topic, b"a", partition=1).get(timeout=30)
        assert probe.has_news(tps) is True
        assert probe.has_news({TopicPartition(topic, 0)}) is False  # only the partitions asked about
        _drain(consumer, 1)
        assert probe.has_news(tps) is False
        tx.init_transactions()
        tx.begin_transaction()
        tx.send(topic, b"open", partition=0)
        tx.flush()
        assert probe.has_news(tps) is False  # the last stable offset stops at the open transaction
        tx.commit_transaction()
        assert probe.has_news(tps) is True
        assert [r.value for r in _drain(consumer, 1)] == [b"open"]
        assert probe.has_news(tps) is False  # the position moved past the commit marker too
        assert probe.failures == 0
    finally:
        probe.close()
        tx.close()
        producer.close()
        consumer.close()


def test_idle_poller_fetches_about_once_per_full_poll_and_still_delivers_at_once(settings: Settings) -> None:
    topic = _topic(settings)
    consumer = _assigned(settings, topic)
    producer = KafkaProducer(**producer_config(settings))
    poller = IdlePoller(consumer, max_idle_s=0.016, full_poll_s=10.0)
    try:
        # Idle: after the first empty fetches, every due check is a probe, not a fetch.
        wait_until(lambda: poller.poll(50) == {} and poller.probe is not None and poller.probe.probes >= 20,
                   timeout=30, interval=0.0, message="20 probes")
        fetches = poller.fetches
        probes = poller.probe.probes if poller.probe is not None else 0
        assert fetches <= 12, f"{fetches} real fetches next to {probes} probes on an idle topic"
        producer.send(topic, b"x", partition=0).get(timeout=30)
        got = wait_until(lambda: poller.poll(200), timeout=30, interval=0.0, message="the record")
        assert [r.value for recs in got.values() for r in recs] == [b"x"]
        assert poller.fetches > fetches  # the probe's news led to a real fetch
    finally:
        poller.close()
        producer.close()
        consumer.close()


def test_a_probe_that_cannot_tell_falls_back_to_fetching(settings: Settings) -> None:
    """A broker connection that dies mid-probe: None, the poller fetches, and records still arrive."""
    topic = _topic(settings, 1)
    consumer = _assigned(settings, topic, 1)
    producer = KafkaProducer(**producer_config(settings))
    poller = IdlePoller(consumer, max_idle_s=0.016)
    server = socket.create_server(("127.0.0.1", 0))

    def accept_and_hang_up() -> None:
        conn, _ = server.accept()
        conn.close()
    threading.Thread(target=accept_and_hang_up, daemon=True).start()
    try:
        probe = poller.probe
        assert probe is not None
        tp = TopicPartition(topic, 0)
        leader = consumer._cluster.leader_for_partition(tp)  # noqa: SLF001 - plant a dead connection
        probe._socks[leader] = socket.create_connection(server.getsockname(), timeout=5)  # noqa: SLF001
        assert probe.has_news({tp}) is None
        assert probe.failures == 1 and probe._socks == {}  # noqa: SLF001
        assert probe.has_news({tp}) is None  # no reconnect storm: it waits RETRY_AFTER_S first
        producer.send(topic, b"y", partition=0).get(timeout=30)
        got = wait_until(lambda: poller.poll(200), timeout=30, interval=0.0, message="the record")
        assert [r.value for recs in got.values() for r in recs] == [b"y"]
        secured = EndOffsetProbe(KafkaConsumer(**consumer_config(settings)))
        secured.enabled = False  # what a SASL/TLS consumer gets: the probe never runs
        assert secured.has_news({tp}) is None
        secured.consumer.close()
    finally:
        server.close()
        poller.close()
        producer.close()
        consumer.close()
