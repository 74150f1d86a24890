"""A read_committed reader that is past an aborted transaction still sees the producer's later commits.

noida-db lists, in every read_committed fetch response, also the aborted transactions whose abort marker
lies before the fetch offset; kafka-python then skipped every later committed transaction of that
producer for a consumer already past the marker (a live subscriber, or one that started at the end):
a serving worker that aborted one batch made its later answers invisible (docs/READ_COMMITTED.md,
streaming/aborted_txns.py). These tests run the live cases on the real broker: a plain consumer, the
Subscriber with and without the idle back-off, one that starts at the end after the abort, and the
predict client against a stand-in worker that aborts and redoes each batch. No TensorFlow; each case
takes about a second.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.probe_read_committed import transactional_producer, txn
from schemas.catalog import load_schema
from schemas.registry import open_registry
from schemas.serde import AvroSerializer
from serving.client import ensure_model_topics, predict, to_request
from streaming import aborted_txns, config
from streaming.aborted_txns import Marker, live_entries
from streaming.consumer import Subscriber, consumer_config
from streaming.topics import TopicSpec, ensure_topics, predictions_topic, requests_topic
from tests.helpers import wait_until

#: How long a committed record may take to reach a live reader before the test calls it lost.
SEEN_TIMEOUT_S = 15.0


# -- the rule, on hand-made responses (including Apache Kafka's legitimate case) -----------------------
class _Aborted(NamedTuple):  # the two fields of a fetch response's aborted-transaction entry
    producer_id: int
    first_offset: int


def _entry(pid: int, first: int) -> _Aborted:
    return _Aborted(pid, first)


def test_an_entry_whose_producer_commits_first_after_the_fetch_offset_is_dropped() -> None:
    # noida-db: txn of pid 7 aborted at 2..3; the fetch starts at 4, where pid 7 commits 4..5.
    assert live_entries(4, [_entry(7, 2)], [Marker(5, 7, abort=False)]) == []


def test_an_aborted_transaction_open_at_the_fetch_offset_is_kept() -> None:
    # Apache Kafka: the previous response stopped inside pid 7's aborted txn (2..9); this one starts at 6.
    assert live_entries(6, [_entry(7, 2)], [Marker(9, 7, abort=True), Marker(11, 7, abort=False)]) == [_entry(7, 2)]


def test_entries_inside_the_range_and_entries_without_a_marker_are_kept() -> None:
    entries = [_entry(7, 5), _entry(8, 1), _entry(9, 2)]
    found = [Marker(3, 9, abort=False), Marker(6, 7, abort=True)]
    # pid 7 starts in range; pid 8 has no marker here (cannot tell: kafka-python's own behaviour);
    # pid 9's only marker lies before the fetch offset, so it says nothing about offset 4.
    assert live_entries(4, entries, found) == entries


def test_only_the_stale_producer_loses_its_entry() -> None:
    entries = [_entry(7, 2), _entry(8, 3)]
    found = [Marker(4, 8, abort=True), Marker(6, 7, abort=False), Marker(8, 8, abort=False)]
    assert live_entries(4, entries, found) == [_entry(8, 3)]


def test_the_filter_is_installed_for_every_consumer() -> None:
    from kafka.consumer.fetcher import Fetcher

    assert aborted_txns.installed() and Fetcher.PartitionRecords.__name__ == "_StaleAbortsDropped"


# -- the live cases on the real broker ------------------------------------------------------------------
@pytest.fixture()
def topic(settings: config.Settings) -> str:
    name = settings.topic(f"rcgap.{uuid.uuid4().hex[:6]}")
    ensure_topics(settings, [TopicSpec(name, 1, 3_600_000, "delete", None, "read_committed gap test")])
    return name


def _values(tag: str, n: int) -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


class _Live:
    """A read_committed reader polled by the test; ``seen`` holds every value it returned, in order."""

    def __init__(self, poll: Any, position: Any, end: Any) -> None:
        self._poll, self._position, self._end = poll, position, end
        self.seen: list[bytes] = []

    def pump(self) -> None:
        self.seen += self._poll()

    def wait_for(self, values: list[bytes]) -> None:
        def arrived() -> bool:
            self.pump()
            return all(v in self.seen for v in values)

        try:
            wait_until(arrived, timeout=SEEN_TIMEOUT_S, interval=0.0)
        except AssertionError:
            missing = [v for v in values if v not in self.seen]
            raise AssertionError(f"the live read_committed reader never got {missing}; it saw {self.seen}") from None

    def pass_end(self) -> None:
        """Poll until the position is at the read_committed end: every marker up to there was fetched."""
        def passed() -> bool:
            self.pump()
            return self._position() >= self._end()

        wait_until(passed, timeout=SEEN_TIMEOUT_S, interval=0.0, message="the reader past the abort marker")


@contextmanager
def _consumer(settings: config.Settings, topic: str, start: str) -> Iterator[tuple[KafkaConsumer, TopicPartition]]:
    consumer = KafkaConsumer(**consumer_config(settings))
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    if start == "beginning":
        consumer.seek_to_beginning(tp)
    else:
        consumer.seek(tp, consumer.end_offsets([tp])[tp])
    try:
        yield consumer, tp
    finally:
        consumer.close()


def _plain_live(consumer: KafkaConsumer, tp: TopicPartition) -> _Live:
    def poll() -> list[bytes]:
        return [r.value for recs in consumer.poll(timeout_ms=100).values() for r in recs]

    return _Live(poll, lambda: consumer.position(tp), lambda: consumer.end_offsets([tp])[tp])


@pytest.mark.parametrize(("refence", "per_txn"), [(False, 1), (False, 3), (True, 1), (True, 3)],
                         ids=["same-producer-1", "same-producer-3", "re-initialised-1", "re-initialised-3"])
def test_a_live_consumer_past_an_abort_sees_the_next_commits(settings: config.Settings, topic: str,
                                                              refence: bool, per_txn: int) -> None:
    """Commit A, read it live, abort B and read past its marker, then commit C and D: both arrive.
    ``refence``: C and D come from a new producer with the same transactional id (fences the old one;
    same producer id, new epoch), as a restarted serving worker does."""
    tid = f"{topic}.tx"
    producer = transactional_producer(settings, tid)
    try:
        with _consumer(settings, topic, "beginning") as (consumer, tp):
            live = _plain_live(consumer, tp)
            txn(producer, topic, _values("A", per_txn), commit=True)
            live.wait_for(_values("A", per_txn))
            txn(producer, topic, _values("B", per_txn), commit=False)
            live.pass_end()
            if refence:
                producer.close()
                producer = transactional_producer(settings, tid)
            txn(producer, topic, _values("C", per_txn), commit=True)
            txn(producer, topic, _values("D", per_txn), commit=True)
            live.wait_for(_values("C", per_txn) + _values("D", per_txn))
            assert live.seen == _values("A", per_txn) + _values("C", per_txn) + _values("D", per_txn)
    finally:
        producer.close()


def test_a_consumer_that_starts_at_the_end_after_an_abort_sees_the_next_commit(settings: config.Settings,
                                                                              topic: str) -> None:
    """The predict client's position: the abort marker lies before where it starts reading."""
    producer = transactional_producer(settings, f"{topic}.tx")
    try:
        txn(producer, topic, _values("A", 2), commit=True)
        txn(producer, topic, _values("B", 2), commit=False)
        with _consumer(settings, topic, "end") as (consumer, tp):
            live = _plain_live(consumer, tp)
            live.pass_end()
            txn(producer, topic, _values("C", 2), commit=True)
            live.wait_for(_values("C", 2))
            assert live.seen == _values("C", 2)
    finally:
        producer.close()


@pytest.mark.parametrize("idle_backoff", [False, True], ids=["plain-poll", "idle-backoff"])
def test_a_live_subscriber_past_an_abort_sees_the_next_commit(settings: config.Settings, topic: str,
                                                               idle_backoff: bool) -> None:
    producer = transactional_producer(settings, f"{topic}.tx")
    try:
        with Subscriber(settings, topic, start="beginning", decode=False, idle_backoff=idle_backoff) as sub:
            tp = TopicPartition(topic, 0)
            live = _Live(lambda: [item.raw for item in sub.poll_batch(timeout_ms=100)],
                         lambda: sub.consumer.position(tp), lambda: sub.consumer.end_offsets([tp])[tp])
            txn(producer, topic, _values("A", 2), commit=True)
            live.wait_for(_values("A", 2))
            txn(producer, topic, _values("B", 2), commit=False)
            live.pass_end()
            txn(producer, topic, _values("C", 2), commit=True)
            live.wait_for(_values("C", 2))
            assert live.seen == _values("A", 2) + _values("C", 2)
    finally:
        producer.close()


# -- the predict client against a worker that aborts and redoes every batch --------------------------
def _answer(model: str, request: dict[str, Any], offset: int, partition: int) -> dict[str, Any]:
    return {"request_id": request["request_id"], "model": model, "model_version": 1, "outputs": [0.25, 0.75],
            "predicted_label": None, "latency_ms": 1.0, "input_topic": "requests", "input_partition": partition,
            "input_offset": offset, "error": None}


class _AbortingWorker(threading.Thread):
    """Stands in for a serving worker whose every batch fails once: it answers in a transaction, aborts
    it, and answers again in a committed one, all with one transactional producer (one producer id)."""

    def __init__(self, settings: config.Settings, model: str, producer: KafkaProducer) -> None:
        super().__init__(daemon=True, name="aborting-worker")
        self.settings, self.model, self.producer = settings, model, producer
        topic = predictions_topic(settings, model)
        self.topic = topic
        self.ser = AvroSerializer(open_registry(settings.registry_url, settings.registry_dir), f"{topic}-value",
                                  load_schema("Prediction"))
        self.stop = threading.Event()
        self.answered = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Subscriber(self.settings, requests_topic(self.settings, self.model), start="beginning") as sub:
                while not self.stop.is_set():
                    batch = [item for item in sub.poll_batch(timeout_ms=100) if item.ok]
                    if not batch:
                        continue
                    sends = [(self.ser(_answer(self.model, item.value, item.offset, item.partition), None),
                              item.value["request_id"].encode()) for item in batch]
                    for commit in (False, True):
                        self.producer.begin_transaction()
                        for value, key in sends:
                            self.producer.send(self.topic, key=key, value=value)
                        self.producer.flush()
                        if commit:
                            self.producer.commit_transaction()
                        else:
                            self.producer.abort_transaction()
                    self.answered += len(batch)
        except BaseException as exc:  # reported by the test, never lost in the thread
            self.error = exc


def test_predict_gets_every_answer_from_a_worker_that_aborted_before(settings: config.Settings) -> None:
    """An aborted batch on every partition before the client starts (so it starts past the markers),
    then a worker that aborts and redoes each batch: predict() still gets every answer."""
    model = f"rcgap{uuid.uuid4().hex[:4]}"
    ensure_model_topics(settings, model)
    topic = predictions_topic(settings, model)
    producer = transactional_producer(settings, f"{topic}.tx")
    worker = _AbortingWorker(settings, model, producer)
    try:
        probe = KafkaConsumer(**consumer_config(settings))
        try:
            parts = sorted(probe.partitions_for_topic(topic) or [])
        finally:
            probe.close()
        assert parts, "the predictions topic has partitions"
        producer.begin_transaction()
        for p in parts:
            producer.send(topic, value=b"never-visible", partition=p)
        producer.flush()
        producer.abort_transaction()
        worker.start()
        requests = [to_request(model, {"features": [float(i)]}) for i in range(6)]
        answers = predict(settings, model, requests, timeout_s=SEEN_TIMEOUT_S)
        assert [a["request_id"] for a in answers] == [r["request_id"] for r in requests]
        assert all(a["outputs"] == [0.25, 0.75] for a in answers)
    finally:
        worker.stop.set()
        worker.join(timeout=10)
        producer.close()
    assert worker.error is None, worker.error
    assert not worker.is_alive()

