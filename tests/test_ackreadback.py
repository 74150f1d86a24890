"""The ack ledger's read-back against the broker's answers after a crash (tests/test_cproduce.py kills one)."""

from __future__ import annotations

import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from streaming.ackreadback import ReadBack, _end_offsets, record_digest
from streaming.config import Settings


def test_a_partition_the_broker_no_longer_has_ends_at_zero_at_once(settings: Settings) -> None:
    """A topic the broker lost in a kill -9 comes back with one partition (re-created by the next metadata
    request). kafka-python's end_offsets for a partition outside the metadata retried until its timeout,
    on every tick, and the ledger never re-sent what it held there; now it ends at 0: lost, sent again."""
    topic = f"{settings.topic_prefix}readback.one"
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    producer.send(topic, b"kept", key=b"k", partition=0).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, request_timeout_ms=5000)
    try:
        started = time.monotonic()
        ends = _end_offsets(consumer, [TopicPartition(topic, p) for p in range(3)])
        took = time.monotonic() - started
    finally:
        consumer.close()
    assert ends == {TopicPartition(topic, 0): 1, TopicPartition(topic, 1): 0, TopicPartition(topic, 2): 0}
    assert took < 4.5, f"{took:.1f} s: waited for kafka-python's timeout instead of reading the metadata"

    reader = ReadBack(settings.bootstrap)
    try:
        held = reader.held({(topic, 0): {0, 5}, (topic, 2): {3}})
    finally:
        reader.close()
    assert held == {(topic, 0): {0: record_digest(b"k", b"kept", [])}, (topic, 2): {}}
