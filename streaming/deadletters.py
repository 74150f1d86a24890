"""One dead letter per source offset, across stream-worker crashes.

Why: a worker dead-letters a bad record as soon as it reads it, but records the offset as handled
only when the batch holding it is persisted. A ``kill -9`` in between, and the restarted worker
reads the record again and dead-letters it again (seen: 18,178 dead letters for 17,040 source
offsets).

How (the read-back the file sources already use, keyed by source coordinates): every batch
manifest records ``dead_letter_floor``, the dead-letter topic's end offsets taken *before* any
later record was read (a cached value taken earlier is lower, hence still safe). When a partition
is (re)assigned, the worker reads the dead-letter topic from the newest manifest's floor (from the
beginning when the store holds no batch of the partition yet) to its end and collects the
``dl.source_offset`` headers of its partition (``dl.source_topic``, ``dl.source_partition``) past
the store's end; those records are recorded as dead letters in their batch again but not produced
a second time.

A dead letter the broker lost together with the worker (both killed within the broker's loss window)
is sent again from the worker's ack journal when the same command restarts it (``streaming/ackjournal.py``).
Readers that want to be safe against the remaining double fault (a broker ``kill -9`` that loses
the floor's offsets *and* a worker crash before the batch) deduplicate by the key
``(dl.source_topic, dl.source_partition, dl.source_offset)``: :func:`dedupe` does that.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

FLOOR_KEY = "dead_letter_floor"
FLOOR_REFRESH_S = 5.0


def source_key(headers: Iterable[tuple[str, bytes]] | None) -> tuple[str, int, int] | None:
    """``(source topic, partition, offset)`` of a stream worker's dead letter, None for other sources."""
    h = {k: v for k, v in headers or ()}
    try:
        return (h["dl.source_topic"].decode(), int(h["dl.source_partition"]), int(h["dl.source_offset"]))
    except (KeyError, ValueError):
        return None


def dedupe(records: Iterable[Any]) -> list[Any]:
    """Keep the first dead letter per source coordinate (records with ``headers``), in order;
    dead letters without Kafka source coordinates (file sources, the gateway) are all kept."""
    seen: set[tuple[str, int, int]] = set()
    out = []
    for rec in records:
        key = source_key(rec.headers)
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(rec)
    return out


class DeadLetterIndex:
    """The floor to write into manifests, and the read-back of already dead-lettered offsets."""

    def __init__(self, bootstrap: str, dl_topic: str, *, security: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.security = security or {}  # streaming.kafka_security kwargs (SASL/TLS)
        self.dl_topic = dl_topic
        self._consumer: Any = None
        self._floor: dict[str, int] | None = None
        self._floor_at = 0.0

    def _client(self) -> Any:
        if self._consumer is None:
            from kafka import KafkaConsumer

            from streaming.kafka_compat import FETCH_RESPONSE_MAX_BYTES

            # the embedded broker answers with the whole backlog past the position (kafka_compat, fix 4)
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                           request_timeout_ms=10_000,
                                           receive_message_max_bytes=FETCH_RESPONSE_MAX_BYTES, **self.security)
        return self._consumer

    def _partitions(self) -> list[Any]:
        from kafka import TopicPartition

        parts = self._client().partitions_for_topic(self.dl_topic) or set()
        return [TopicPartition(self.dl_topic, p) for p in sorted(parts)]

    def floor(self) -> dict[str, int]:
        """End offsets of the dead-letter topic, refreshed at most every ``FLOOR_REFRESH_S`` (an older
        value is lower, so it stays a valid floor)."""
        now = time.monotonic()
        if self._floor is None or now - self._floor_at > FLOOR_REFRESH_S:
            tps = self._partitions()
            ends = self._client().end_offsets(tps) if tps else {}
            self._floor = {str(tp.partition): int(off) for tp, off in ends.items()}
            self._floor_at = now
        return dict(self._floor)

    def already_written(self, floor: dict[str, int] | None, topic: str, partition: int, after: int,
                        timeout_s: float = 60.0) -> set[int]:
        """Source offsets ``>= after`` of ``topic[partition]`` that already have a dead letter,
        reading the dead-letter topic from ``floor`` (None: from the beginning) to its end now."""
        consumer = self._client()
        tps = self._partitions()
        if not tps:
            return set()
        ends = consumer.end_offsets(tps)
        starts = {tp: int((floor or {}).get(str(tp.partition), 0)) for tp in tps}
        todo = [tp for tp in tps if starts[tp] < ends[tp]]
        found: set[int] = set()
        if not todo:
            return found
        consumer.assign(todo)
        for tp in todo:
            consumer.seek(tp, min(starts[tp], ends[tp]))
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in todo):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self.dl_topic} to its end within {timeout_s} s")
            for msgs in consumer.poll(timeout_ms=500).values():
                for m in msgs:
                    key = source_key(m.headers)
                    if key is not None and key[0] == topic and key[1] == partition and key[2] >= after:
                        found.add(key[2])
        return found

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
