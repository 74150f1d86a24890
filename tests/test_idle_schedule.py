"""IdlePoller's back-off keeps its own schedule across calls (streaming/consumer.py, docs/IDLE.md
"Fetches per back-off"): a caller that polls in calls shorter than the cap still fetches at most once
per cap. Before, every call fetched at its start and again at its deadline, so a worker polling in
100 ms calls with a 64 ms cap fetched ~30 times a second instead of ~15. Real broker; the consumer's
``poll`` is wrapped (not replaced) to count the fetches."""

from __future__ import annotations

import time
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer

from streaming.config import Settings
from streaming.consumer import IdlePoller, consumer_config
from streaming.producer import producer_config
from streaming.topics import TopicSpec, ensure_topics
from tests.helpers import wait_until


def test_short_calls_fetch_at_most_once_per_cap_and_still_see_a_record(settings: Settings) -> None:
    topic = settings.topic(f"idle-sched-{uuid.uuid4().hex[:6]}")
    ensure_topics(settings, [TopicSpec(topic, 1, 3_600_000, "delete", None, "test_idle_schedule")])
    consumer = KafkaConsumer(**consumer_config(settings, group_id=f"g-{uuid.uuid4().hex[:6]}"))
    consumer.subscribe([topic])
    producer = KafkaProducer(**producer_config(settings))
    cap = 0.064
    fetches: list[float] = []
    original = consumer.poll

    def counting_poll(*args: Any, **kwargs: Any) -> Any:
        fetches.append(time.monotonic())
        return original(*args, **kwargs)

    try:
        poller = IdlePoller(consumer, max_idle_s=cap)
        wait_until(lambda: poller.poll(timeout_ms=100) == {} and poller._idle_s == cap and consumer.assignment(),
                   timeout=60, interval=0.0, message="assignment and a capped back-off")
        consumer.poll = counting_poll
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 1.0:
            assert poller.poll(timeout_ms=10) == {}  # calls far shorter than the cap
            calls += 1
        elapsed = time.monotonic() - started
        # Each empty fetch schedules the next one a cap later, so load can only lower the count.
        assert len(fetches) <= elapsed / cap + 2, f"{len(fetches)} fetches in {elapsed:.2f} s of {calls} calls"
        assert calls > len(fetches)  # most calls ended inside the back-off, without a fetch
        assert all(b - a >= cap * 0.9 for a, b in zip(fetches, fetches[1:], strict=False))
        producer.send(topic, b"after").get(timeout=30)
        got = wait_until(lambda: poller.poll(timeout_ms=10), timeout=30, interval=0.0, message="the record")
        assert [r.value for recs in got.values() for r in recs] == [b"after"]
    finally:
        consumer.poll = original
        producer.close()
        consumer.close()
