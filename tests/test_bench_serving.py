"""The serving benchmark measures latency when an answer is visible to a read_committed reader.

The figure itself lives in ``benchmarks/bench_serving.py`` (JSON out); this test checks the reader
it measures with: it reads read_committed from the topic's end, and stamps an answer no earlier than
its ``commit_transaction`` (the answer is on the broker, in an open transaction, before). No TensorFlow.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaProducer

from benchmarks import bench_serving
from benchmarks.run_all import BENCHMARKS
from schemas.catalog import load_schema
from schemas.registry import open_registry
from schemas.serde import AvroSerializer
from streaming import config
from streaming.producer import producer_config
from streaming.topics import TopicSpec, ensure_topics
from tests.helpers import wait_until


def _answer(rid: str) -> dict[str, Any]:
    return {"request_id": rid, "model": "m", "model_version": 1, "outputs": [0.5, 0.5], "predicted_label": None,
            "latency_ms": 1.0, "input_topic": "t", "input_partition": 0, "input_offset": 0, "error": None}


def _raw_offsets(settings: config.Settings, topic: str) -> int:
    """1 once the open transaction's record is on the broker (end offsets read_uncommitted, past the old
    record and its commit marker), else 0."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=settings.bootstrap, isolation_level="read_uncommitted")
    try:
        tps = [TopicPartition(topic, p) for p in (c.partitions_for_topic(topic) or set())]
        return int(sum(c.end_offsets(tps).values()) > 2)  # the old record + its commit marker, then ours
    finally:
        c.close()


def test_visible_reader_sees_only_committed_answers_after_the_commit(settings: config.Settings) -> None:
    topic = settings.topic("bench.visible")
    ensure_topics(settings, [TopicSpec(topic, 2, 3_600_000, "delete", None, "test")])
    ser = AvroSerializer(open_registry(settings.registry_url, settings.registry_dir), f"{topic}-value",
                         load_schema("Prediction"))
    producer = KafkaProducer(**producer_config(settings, transactional_id=f"{topic}.tx", linger_ms=0))
    producer.init_transactions()
    try:
        producer.begin_transaction()  # before the reader: it starts at the end and must skip this one
        producer.send(topic, key=b"old", value=ser(_answer(f"lv-0-{time.time_ns() // 1_000_000}")))
        producer.commit_transaction()
        now = time.time_ns() // 1_000_000
        old, ok = f"lv-0-{now}", f"lv-1-{now}"  # load-generator ids carry their send time (ms)
        reader = bench_serving._VisibleReader(settings, topic)
        try:
            producer.begin_transaction()
            producer.send(topic, key=b"b", value=ser(_answer(ok)))
            producer.flush()  # on the broker, in an open transaction: not visible to read_committed yet
            wait_until(lambda: _raw_offsets(settings, topic), timeout=30, message="the record on the broker")
            before_commit = time.time_ns() / 1e6
            producer.commit_transaction()
            wait_until(lambda: ok in reader.visible, timeout=30)
            visible, stamped = reader.wait_for("lv-", 1, timeout=5)
        finally:
            reader.close()
    finally:
        producer.close()
    assert reader._consumer.config["isolation_level"] == "read_committed"
    assert set(reader.visible) == {ok} and old not in reader.visible  # not the answer from before the reader
    assert reader.visible[ok] >= before_commit - now  # stamped after its transaction committed
    assert visible == [reader.visible[ok]] and stamped == [1.0]
    assert "bench_serving" in BENCHMARKS


def test_the_load_generator_runs_in_its_own_process_and_stamps_its_ids(settings: config.Settings) -> None:
    """_offered_load's child publishes valid requests whose ids carry their send time (read by _sent_ms)."""
    from streaming.consumer import Subscriber

    topic = settings.topic("bench.load")
    ensure_topics(settings, [TopicSpec(topic, 1, 3_600_000, "delete", None, "test")])
    before = time.time_ns() / 1e6
    sent = bench_serving._offered_load(settings, topic, rate=50, seconds=0.3, seed=7)
    assert 5 <= sent <= 20
    with Subscriber(settings, [topic], until="end") as sub:
        ids = [item.value["request_id"] for item in sub]
    assert len(ids) == sent and ids[0].startswith("l7-0-")
    stamps = [bench_serving._sent_ms(i) for i in ids]
    assert all(s is not None and before <= s <= time.time_ns() / 1e6 for s in stamps)
    assert bench_serving._sent_ms("vis-ok") is None and bench_serving._sent_ms("a-b-c") is None
