"""streaming.polling.poll_until: returns the first truthy value, or the last falsy one at the deadline."""

from __future__ import annotations

import threading
import time

import pytest

from streaming.config import Settings
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.topics import raw_topic
from tests.helpers import read_topic
from tests.test_sdk_kafka import sensor


def test_returns_the_first_truthy_value() -> None:
    calls = iter([0, None, "", 7, 8])
    assert poll_until(lambda: next(calls), 10, interval_s=0.001) == 7


def test_times_out_with_the_last_falsy_value_and_tries_at_the_deadline() -> None:
    calls: list[float] = []

    def never() -> int:
        calls.append(time.monotonic())
        return 0

    start = time.monotonic()
    assert poll_until(never, 0.2, interval_s=0.05) == 0
    assert calls[-1] - start >= 0.2  # one last try at (not before) the deadline
    assert len(calls) >= 3


def test_predicate_errors_abort_at_once() -> None:
    def boom() -> bool:
        raise RuntimeError("process died")

    with pytest.raises(RuntimeError, match="process died"):
        poll_until(boom, 10)


def test_stop_event_interrupts_the_wait() -> None:
    stop = threading.Event()
    stop.set()
    start = time.monotonic()
    assert poll_until(lambda: False, 60, interval_s=30, stop=stop) is False
    assert time.monotonic() - start < 5


def test_interval_must_not_be_negative_and_zero_means_no_sleep() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        poll_until(lambda: True, 1, interval_s=-1)
    calls = iter([0, 0, 0, 5])
    assert poll_until(lambda: next(calls), 10, interval_s=0) == 5  # a predicate that blocks by itself


def test_read_topic_with_expect_reads_on_to_the_end_offsets(settings: Settings) -> None:
    """A "published once" check must see the duplicate that follows the first record."""
    with Publisher(settings) as pub:
        for i in range(3):
            pub.publish("sensor", sensor(i))
    items = read_topic(settings, raw_topic(settings, "sensor"), decode=False, expect=1, timeout=20)
    assert len(items) == 3

