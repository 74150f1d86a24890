"""Probe: does a live read_committed reader lose commits after an aborted transaction on this broker?

Why (docs/READ_COMMITTED.md): noida-db 0.2.3 lists aborted transactions that ended before the fetch
offset, and kafka-python then skips the producer's later commits; ``streaming.aborted_txns`` drops
such entries. This probe tells whether that workaround is still needed (after a noida-db or
kafka-python upgrade, or on another broker) and what it costs. Two parts, JSON out:

* **cases**: commit A, abort B, commit C and D, with two readers of the topic side by side: one with
  kafka-python's own handling (``unfiltered``), one as every streamlearn consumer runs (filtered).
  Varied: the same producer or a re-initialised one (same transactional id) for C and D; 1 or 3 records
  per transaction; the reader follows live from the start (polls between A, B and C) or starts at the
  end after the abort. Each reader polls until its position is at the read_committed end, so what it
  did not return by then it skipped. ``lost`` counts committed records after the abort it never returned.
* **cost**: the filter scans a response only when it holds an entry below the fetch offset (on
  noida-db: every fetch after an old abort). Seconds to read N committed transactions after one
  aborted transaction, against the same read of a topic without the abort (nothing to scan). Ratio =
  with abort / without (goal <= 1.5). It asks for small responses (16 KiB); noida-db 0.2.3 ignores the
  limit and answers in one response, so there it measures one scan over every batch.

    python -m benchmarks.probe_read_committed [--txns 400]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks.common import bench_settings, machine, write_report
from streaming import aborted_txns, config
from streaming.consumer import consumer_config
from streaming.producer import producer_config
from streaming.topics import TopicSpec, ensure_topics

DEADLINE_S = 20.0


def _topic(settings: config.Settings, tag: str) -> str:
    name = settings.topic(f"probe.{tag}.{uuid.uuid4().hex[:6]}")
    ensure_topics(settings, [TopicSpec(name, 1, 3_600_000, "delete", None, "read_committed probe")])
    return name


def transactional_producer(settings: config.Settings, tid: str) -> KafkaProducer:
    """A transactional producer of ``tid``, initialised (also used by tests/test_read_committed_gap.py)."""
    producer = KafkaProducer(**producer_config(settings, transactional_id=tid, linger_ms=0))
    producer.init_transactions()
    return producer


def txn(producer: KafkaProducer, topic: str, values: list[bytes], *, commit: bool) -> None:
    """One transaction of ``values``, committed or aborted."""
    producer.begin_transaction()
    for v in values:
        producer.send(topic, value=v)
    producer.flush()
    (producer.commit_transaction if commit else producer.abort_transaction)()


class _Reader:
    def __init__(self, settings: config.Settings, topic: str, filtered: bool, at_end: bool, **extra: Any) -> None:
        self.consumer = KafkaConsumer(**consumer_config(settings, **extra))
        if not filtered:
            aborted_txns.unfiltered(self.consumer)
        self.tp = TopicPartition(topic, 0)
        self.consumer.assign([self.tp])
        if at_end:
            self.consumer.seek(self.tp, self.consumer.end_offsets([self.tp])[self.tp])
        else:
            self.consumer.seek_to_beginning(self.tp)
        self.seen: list[bytes] = []

    def to_end(self) -> None:
        """Poll until the position is at the read_committed end offset (or the deadline)."""
        deadline = time.monotonic() + DEADLINE_S
        end = self.consumer.end_offsets([self.tp])[self.tp]
        while time.monotonic() < deadline:
            for recs in self.consumer.poll(timeout_ms=100).values():
                self.seen += [r.value for r in recs]
            if self.consumer.position(self.tp) >= end:
                return

    def close(self) -> None:
        self.consumer.close()


def _case(settings: config.Settings, refence: bool, per_txn: int, start: str) -> dict[str, Any]:
    topic = _topic(settings, "case")
    tid = f"{topic}.tx"
    vals = {t: [f"{t}{i}".encode() for i in range(per_txn)] for t in "ABCD"}
    producer = transactional_producer(settings, tid)
    readers: dict[str, _Reader] = {}
    try:
        if start == "live":
            readers = {k: _Reader(settings, topic, k == "filtered", False) for k in ("unfiltered", "filtered")}
        txn(producer, topic, vals["A"], commit=True)
        for r in readers.values():
            r.to_end()
        txn(producer, topic, vals["B"], commit=False)
        if start == "end":
            readers = {k: _Reader(settings, topic, k == "filtered", True) for k in ("unfiltered", "filtered")}
        for r in readers.values():
            r.to_end()
        if refence:
            producer.close()
            producer = transactional_producer(settings, tid)
        txn(producer, topic, vals["C"], commit=True)
        txn(producer, topic, vals["D"], commit=True)
        for r in readers.values():
            r.to_end()
        after = vals["C"] + vals["D"]
        return {"producer": "re-initialised" if refence else "same", "records_per_txn": per_txn, "reader": start,
                "committed_after_abort": len(after),
                **{f"lost_{k}": sum(v not in r.seen for v in after) for k, r in readers.items()}}
    finally:
        for r in readers.values():
            r.close()
        producer.close()


def _read_all(settings: config.Settings, topic: str, expect: int) -> float:
    reader = _Reader(settings, topic, True, False, max_partition_fetch_bytes=16 * 1024)
    try:
        start = time.perf_counter()
        reader.to_end()
        took = time.perf_counter() - start
    finally:
        reader.close()
    if len(reader.seen) != expect:
        raise RuntimeError(f"read {len(reader.seen)} of {expect} committed records from {topic}")
    return took


def _cost(settings: config.Settings, txns: int, per_txn: int = 10) -> dict[str, Any]:
    topics = {}
    for label, abort_first in (("without_abort", False), ("with_abort", True)):
        topic = _topic(settings, label)
        producer = transactional_producer(settings, f"{topic}.tx")
        try:
            if abort_first:
                txn(producer, topic, [b"aborted"] * per_txn, commit=False)
            for t in range(txns):
                txn(producer, topic, [f"{t}.{i}".encode().ljust(100, b".") for i in range(per_txn)], commit=True)
        finally:
            producer.close()
        topics[label] = topic
    runs: dict[str, list[float]] = {label: [] for label in topics}
    for _ in range(3):  # alternate, so load drifts hit both sides
        for label, topic in topics.items():
            runs[label].append(_read_all(settings, topic, txns * per_txn))
    base, with_abort = statistics.median(runs["without_abort"]), statistics.median(runs["with_abort"])
    return {"records": txns * per_txn, "transactions": txns, "fetch_bytes": 16 * 1024,
            "seconds_without_abort": round(base, 4), "seconds_with_abort": round(with_abort, 4),
            "ratio": round(with_abort / base, 3), "goal": "<= 1.5", "runs": runs}


def run(settings: config.Settings, txns: int = 400) -> dict[str, Any]:
    cases = [_case(settings, refence, n, start)
             for refence in (False, True) for n in (1, 3) for start in ("live", "end")]
    return {"benchmark": "probe_read_committed", "machine": machine(), "broker": settings.bootstrap,
            "cases": cases,
            "cases_losing_unfiltered": sum(c["lost_unfiltered"] > 0 for c in cases),
            "cases_losing_filtered": sum(c["lost_filtered"] > 0 for c in cases),
            "cost": _cost(settings, txns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--txns", type=int, default=400, help="committed transactions in the cost part")
    args = parser.parse_args()
    with bench_settings() as settings:
        result = run(settings, args.txns)
    path = write_report("probe_read_committed", result)
    print(json.dumps(result, indent=2, default=str))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
