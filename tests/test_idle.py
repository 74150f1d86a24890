"""IdlePoller (streaming/consumer.py) on the real embedded broker: it backs off, delivers every record
once, keeps the caller's pauses, and lets group rebalances complete (docs/IDLE.md)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streaming.config import Settings
from streaming.consumer import IdlePoller, consumer_config
from streaming.producer import producer_config
from streaming.topics import TopicSpec, ensure_topics
from tests.helpers import wait_until


def _topic(settings: Settings, partitions: int = 2) -> str:
    name = settings.topic(f"idle-{uuid.uuid4().hex[:6]}")
    ensure_topics(settings, [TopicSpec(name, partitions, 3_600_000, "delete", None, "test_idle")])
    return name


def _consumer(settings: Settings, topic: str, group: str) -> KafkaConsumer:
    consumer = KafkaConsumer(**consumer_config(settings, group_id=group))
    consumer.subscribe([topic])
    return consumer


def _take(poller: IdlePoller, seen: list[Any], timeout_ms: int = 100) -> list[Any]:
    """One poll through the helper; its records appended to ``seen`` (returned, for wait_until)."""
    for recs in poller.poll(timeout_ms).values():
        seen.extend(recs)
    return seen


def _drain(pollers: list[IdlePoller], seen: list[tuple[int, int]], until: int, timeout: float = 30.0) -> None:
    def step() -> bool:
        for poller in pollers:
            for tp, recs in poller.poll(timeout_ms=50).items():
                seen.extend((tp.partition, r.offset) for r in recs)
        return len(seen) >= until
    wait_until(step, timeout=timeout, interval=0.0, message=f"{until} records")


def test_backs_off_while_idle_and_resets_on_records(settings: Settings) -> None:
    topic = _topic(settings, 1)
    consumer = _consumer(settings, topic, f"g-{uuid.uuid4().hex[:6]}")
    producer = KafkaProducer(**producer_config(settings))
    try:
        poller = IdlePoller(consumer, min_idle_s=0.001, max_idle_s=0.032)
        wait_until(lambda: poller.poll(timeout_ms=100) == {} and consumer.assignment(), timeout=30,
                   message="assignment")
        # 1, 2, 4, ... ms: the back-off reaches its cap within a few empty calls (bounded under load)
        wait_until(lambda: poller.poll(timeout_ms=100) == {} and poller._idle_s == poller.max_idle_s,
                   timeout=30, interval=0.0, message="the back-off to reach its cap")
        assert consumer.paused() == set()  # the back-off never pauses fetching
        producer.send(topic, b"one").get(timeout=30)
        got = wait_until(lambda: poller.poll(timeout_ms=200), timeout=30, interval=0.0, message="the record")
        assert [r.value for recs in got.values() for r in recs] == [b"one"]
        assert poller._idle_s == poller.min_idle_s
    finally:
        producer.close()
        consumer.close()


def test_keeps_the_callers_pauses(settings: Settings) -> None:
    topic = _topic(settings, 2)
    consumer = KafkaConsumer(**consumer_config(settings))
    producer = KafkaProducer(**producer_config(settings))
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        consumer.pause(tps[0])
        for p in (0, 1):
            producer.send(topic, f"p{p}".encode(), partition=p).get(timeout=30)
        poller = IdlePoller(consumer)
        seen: list[Any] = []
        wait_until(lambda: _take(poller, seen), timeout=30, interval=0.0, message="the unpaused partition's record")
        for _ in range(5):
            _take(poller, seen, 50)
        assert [r.partition for r in seen] == [1]
        assert consumer.paused() == {tps[0]}  # still paused by the caller, never resumed by the helper
        consumer.pause(tps[1])  # everything paused: the helper is a plain poll, which does not spin
        assert poller.poll(100) == {}
        consumer.resume(*tps)
        wait_until(lambda: len(_take(poller, seen)) == 2, timeout=30, interval=0.0,
                   message="the resumed partition's record")
        assert sorted(r.partition for r in seen) == [0, 1]
    finally:
        producer.close()
        consumer.close()


@pytest.mark.xfail(strict=True, reason="known bug, docs/IDLE.md: after the merge with static membership a group "
                   "member behind the IdlePoller does not complete the rebalance; group members (stream, serve, "
                   "subscribe --group) use PlainPoller until it is fixed, and this test then passes (strict)")
def test_group_rebalances_complete_and_no_record_is_lost(settings: Settings) -> None:
    """Second member joins (partitions split), then leaves (the first takes all back); every record
    is delivered once while both poll only through the back-off."""
    topic = _topic(settings, 2)
    group = f"g-{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(**producer_config(settings))
    a = _consumer(settings, topic, group)
    b = None
    try:
        pa = IdlePoller(a)
        wait_until(lambda: pa.poll(100) == {} and len(a.assignment()) == 2, timeout=60, interval=0.0,
                   message="first member owns both partitions")
        seen: list[tuple[int, int]] = []
        for i in range(10):
            producer.send(topic, f"a{i}".encode(), partition=i % 2)
        producer.flush()
        _drain([pa], seen, 10)
        b = second = _consumer(settings, topic, group)
        pb = IdlePoller(second)

        def split() -> bool:
            for poller in (pa, pb):
                for tp, recs in poller.poll(timeout_ms=50).items():
                    seen.extend((tp.partition, r.offset) for r in recs)
            return len(a.assignment()) == 1 and len(second.assignment()) == 1
        wait_until(split, timeout=60, interval=0.0, message="the two members to split the partitions")
        for tp in a.assignment() | second.assignment():  # commit nothing; position from the start for both
            (a if tp in a.assignment() else second).seek_to_beginning(tp)
        seen.clear()
        for i in range(10):
            producer.send(topic, f"b{i}".encode(), partition=i % 2)
        producer.flush()
        _drain([pa, pb], seen, 20)
        b.close()
        b = None

        def back() -> bool:
            pa.poll(timeout_ms=50)
            return len(a.assignment()) == 2
        wait_until(back, timeout=60, interval=0.0, message="the survivor to take both partitions back")
        for tp in a.assignment():
            a.seek_to_beginning(tp)
        seen.clear()
        _drain([pa], seen, 20)
        for _ in range(3):  # a few more polls: a duplicate would show up here
            for tp, recs in pa.poll(timeout_ms=100).items():
                seen.extend((tp.partition, r.offset) for r in recs)
        assert sorted(seen) == sorted({(p, o) for p in (0, 1) for o in range(10)})
    finally:
        producer.close()
        a.close()
        if b is not None:
            b.close()
