"""A read to the end that the broker shortens under it still ends (recovery after a broker crash).

``Subscriber(until="end")`` takes the end offsets when it starts. The embedded broker killed with -9 loses
its last writes and comes back with lower end offsets; before, such a read waited for offsets that were
gone until new records took them (a restarted source's read-back waited on itself). Both fetch paths.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kafka import KafkaProducer

from streaming.consumer import Subscriber
from streaming.producer import Publisher, producer_config
from streaming.topics import raw_topic
from tests.broker_crash_helpers import crash_broker_fixture  # noqa: F401 (the crash_broker fixture)


def _weblog(i: int) -> dict[str, Any]:
    return {"event_id": f"e{i}", "client_ip": f"10.0.0.{i % 50}", "timestamp": 1_700_000_000_000 + i,
            "method": "GET", "path": f"/p/{i}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 10}


def _end_offsets(sub: Subscriber) -> dict[Any, int]:
    """kafka-python's ``end_offsets`` right after a broker restart can miss a partition (KeyError): ask again."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return dict(sub.consumer.end_offsets(list(sub.assignment())))
        except KeyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # bounded by the deadline: the broker is still loading its partitions


@pytest.mark.parametrize("fast_reader", [True, False], ids=["librdkafka", "kafka-python"])
def test_a_read_to_the_end_finishes_when_the_broker_loses_its_tail(crash_broker, fast_reader: bool) -> None:  # type: ignore[no-untyped-def]
    base, kill9_restart = crash_broker
    settings = base.with_(fast_reader=fast_reader)
    topic = raw_topic(settings, "weblog")
    stop = threading.Event()
    sent = [0]

    def publish() -> None:  # keeps writing until the kill, so the broker's loss window holds records
        producer = KafkaProducer(**producer_config(settings, linger_ms=5))
        try:
            while not stop.is_set():
                producer.send(topic, value=b"x" * 100, key=str(sent[0] % 30).encode())
                sent[0] += 1
                if sent[0] % 500 == 0:
                    producer.flush(timeout=10)
        except Exception as exc:  # noqa: BLE001 - the broker went away under it
            print(f"writer stopped: {exc!r}")
        finally:
            try:
                producer.close(timeout=1)
            except Exception as exc:  # noqa: BLE001 - records still buffered for the dead broker
                print(f"writer closed with buffered records: {exc!r}")

    # First records the broker surely keeps (the ack ledger's confirmation: acked, then its loss window with
    # no broker restart), so the topic and its partitions survive the kill; the writer's tail does not.
    with Publisher(settings) as pub:
        for i in range(300):
            pub.publish("weblog", _weblog(i))
        pub.flush()
        assert pub.settle(timeout=60), "the ledger never confirmed the first records"
    writer = threading.Thread(target=publish, daemon=True)
    writer.start()
    deadline = time.monotonic() + 30
    while sent[0] < 5000 and time.monotonic() < deadline:
        time.sleep(0.05)  # bounded: waits for the writer's progress
    sub = Subscriber(settings, topic, start="beginning", until="end", decode=False)
    try:
        bound = sum(sub._stop_at.values())  # noqa: SLF001 - the end offsets the read took
        stop.set()
        kill9_restart()
        writer.join(timeout=15)
        got = 0
        deadline = time.monotonic() + 60
        while not sub.finished and time.monotonic() < deadline:
            got += len(sub.poll_batch(timeout_ms=300))
        assert sub.finished, f"the read to the end never ended ({got} records, bound {bound})"
        now_end = sum(_end_offsets(sub).values())
    finally:
        sub.close()
    if now_end >= bound:
        pytest.skip(f"the broker kept every record this time (end {now_end} >= bound {bound}): no tail was lost")
    assert now_end <= got <= bound
