"""A C fetch engine (confluent-kafka / librdkafka) behind the Subscriber's consumer seam, for bounded reads.

Why: kafka-python parses every fetched record batch and varint in Python, about 10 µs a record, and the
Avro decode comes on top of that; measured with ``python -m benchmarks.bench_client_lever``, a
``Subscriber`` on kafka-python reads at about 0.3x a bare kafka-python consumer, while librdkafka
fetches 5-9x faster than that bare consumer, so fetch + the same decode reach about 1x (docs/SDK_PERF.md).

Where it is used, and why only there. :class:`streaming.consumer.Subscriber` positions itself with
kafka-python as always (partitions, seeks, ``until`` bounds, the "no longer holds records" checks)
and then hands the fetching to :class:`CFetchConsumer` when :func:`eligible` says so:

* **a bounded read** (``until`` given) whose every bound is at or below the partition's end offset
  when the read starts, so it is all backlog and ends. A tailing read stays on kafka-python with
  its idle back-off: librdkafka re-sends empty fetches at once on the embedded broker (which
  answers them at once) and takes ~0.65 core while idle, and pausing it between polls would drop
  what it had prefetched;
* **of topics no transaction writes**: the raw and dead-letter topics of the event kinds. On a
  topic with aborted transactions, the embedded broker lists stale aborted-transaction entries in
  every fetch answer; kafka-python is patched to drop them (:mod:`streaming.aborted_txns`),
  librdkafka cannot be, and would hide later committed records (prediction topics are written in
  transactions by the serving worker);
* **with no group, no consumer overrides and a PLAINTEXT listener** (the security settings are
  kafka-python's names; mapping them is not done);
* when ``Settings.fast_reader`` is on (default) and confluent-kafka is importable.

Everything that is not fetching (end/beginning offsets, offsets for times, metadata) still goes to
the kafka-python consumer, by attribute delegation, so the callers that reach through
``sub.consumer`` keep their exact answers. Positions are tracked here: the offset after the last
record handed out, or the end offset librdkafka reports at a partition's end (past a trailing
transaction marker of a user's producer, so ``until="end"`` still finishes). A record below a
partition's position is never handed out twice.
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streaming.config import Settings
from streaming.exceptions import StreamingError
from streaming.kafka_compat import FETCH_RESPONSE_MAX_BYTES
from streaming.kafka_security import kafka_security
from streaming.topics import KINDS, dead_letter_topic, raw_topic

log = logging.getLogger(__name__)

def available() -> bool:
    """True when confluent-kafka imports (it is a dependency; a broken wheel falls back, never fails)."""
    try:
        import confluent_kafka  # noqa: F401
    except Exception:  # an ImportError or a librdkafka load error: kafka-python reads instead
        return False
    return True


def transaction_free_topics(settings: Settings) -> set[str]:
    """Topics the platform never writes in a transaction: each event kind's raw and dead-letter topic."""
    return {t for k in KINDS for t in (raw_topic(settings, k), dead_letter_topic(settings, k))}


def eligible(settings: Settings, topics: list[str], overrides: dict[str, Any]) -> bool:
    """Whether a bounded, positioned (no group) read of ``topics`` may fetch with librdkafka; the module
    docstring says why each condition. Only such reads get here (:meth:`Subscriber.__init__`)."""
    return (settings.fast_reader and not overrides and not kafka_security(settings)
            and set(topics) <= transaction_free_topics(settings) and available())


def take_over(settings: Settings, consumer: KafkaConsumer, topics: list[str], *,
              stop_at: dict[TopicPartition, int], until_end: bool, overrides: dict[str, Any],
              isolation_level: str) -> KafkaConsumer | CFetchConsumer:
    """The consumer a positioned, bounded Subscriber fetches with: a :class:`CFetchConsumer` over ``consumer``
    where :func:`eligible` and every bound lies within the backlog, else ``consumer`` itself."""
    if not stop_at or not eligible(settings, topics, overrides):
        return consumer
    if not until_end:  # an offset or time bound past the end would wait for new records: kafka-python's job
        ends = consumer.end_offsets(list(stop_at))
        if any(stop > ends[tp] for tp, stop in stop_at.items()):
            return consumer
    return CFetchConsumer(settings, consumer, isolation_level)


class CMessage:
    """A fetched record with kafka-python's ``ConsumerRecord`` attribute names (what the Subscriber reads)."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "headers", "value")

    def __init__(self, topic: str, partition: int, offset: int, timestamp: int, key: bytes | None,
                 headers: list[tuple[str, bytes]], value: bytes | None) -> None:
        self.topic, self.partition, self.offset, self.timestamp = topic, partition, offset, timestamp
        self.key, self.headers, self.value = key, headers, value


class CFetchConsumer:
    """kafka-python's consumer, with fetching (poll, positions, pause) done by a librdkafka consumer.

    Built from a kafka-python consumer that is already assigned and positioned; takes over its
    positions and unassigns it (so it never fetches again). Only manual assignment: no group, no
    commits, no rebalances. Other attributes are the kafka-python consumer's.
    """

    def __init__(self, settings: Settings, consumer: KafkaConsumer, isolation_level: str = "read_committed") -> None:
        import confluent_kafka as ck

        self._ck = ck
        self._kc = consumer
        self._tps = {(tp.topic, tp.partition): tp for tp in consumer.assignment()}
        self._pos = {tp: int(consumer.position(tp)) for tp in self._tps.values()}
        self._paused = set(consumer.paused())
        self._max_records = int(consumer.config["max_poll_records"])  # per poll, as the consumer it replaces
        consumer.assign([])  # it must not fetch beside librdkafka
        self._c = ck.Consumer({
            "bootstrap.servers": settings.bootstrap,
            # librdkafka wants a group id even for a manual assignment; nothing joins it or commits to it.
            "group.id": settings.topic("streamlearn-cfetch"),
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "isolation.level": isolation_level,
            "enable.partition.eof": True,  # the end offset at a partition's end: positions past markers
            # A partition is fetched again once fewer than 2,000 of its records wait in the queue, and
            # checked again 10 ms later while more wait. The defaults (100,000; 1 s) made a partition at
            # its end re-fetch in a tight loop on the embedded broker (empty answers come at once) while
            # its last records waited: ~0.4 core more for the same read. A threshold of 1 stops that
            # but stalls the first fetch for the whole 1 s back-off ("Queue full" on the start op).
            "queued.min.messages": 2000, "fetch.queue.backoff.ms": 10,
            "client.id": "streamlearn-cfetch",
            "fetch.max.bytes": 32 * 1024 * 1024, "max.partition.fetch.bytes": 8 * 1024 * 1024,
            # The embedded broker answers with the partitions' whole unread backlog, whatever the two limits
            # above say (streaming/kafka_compat.py, fix 4): a cap below it made librdkafka drop the answer and
            # fetch it again forever ("Invalid response size"), so a bounded read of an image topic over 64 MiB
            # never ended. Apache Kafka keeps its answers within fetch.max.bytes.
            "message.max.bytes": 32 * 1024 * 1024, "receive.message.max.bytes": FETCH_RESPONSE_MAX_BYTES,
            "logger": log,
        })
        self._c.assign([ck.TopicPartition(tp.topic, tp.partition, self._pos[tp]) for tp in self._tps.values()])
        if self._paused:
            self._c.pause([self._ctp(tp) for tp in self._paused])

    def _ctp(self, tp: TopicPartition) -> Any:
        return self._ck.TopicPartition(tp.topic, tp.partition, self._pos[tp])

    def __getattr__(self, name: str) -> Any:  # metadata and offset lookups: kafka-python's own answers
        return getattr(self._kc, name)

    # -- what the Subscriber and its callers use --------------------------------------------------
    def assignment(self) -> set[TopicPartition]:
        return set(self._tps.values())

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def position(self, tp: TopicPartition) -> int:
        return self._pos[tp]

    def pause(self, *tps: TopicPartition) -> None:
        new = [tp for tp in tps if tp not in self._paused]
        self._paused.update(new)
        if new:
            self._c.pause([self._ctp(tp) for tp in new])

    def resume(self, *tps: TopicPartition) -> None:
        back = [tp for tp in tps if tp in self._paused]
        self._paused.difference_update(back)
        if back:  # from where the caller stands: librdkafka may have dropped what it prefetched
            self._c.resume([self._ctp(tp) for tp in back])
            for tp in back:
                self._c.seek(self._ctp(tp))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._pos[tp] = int(offset)
        self._c.seek(self._ctp(tp))

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[CMessage]]:
        """Records as soon as some are there (not after the whole timeout), grouped per partition.

        A partition whose position moved with no record (its end is past a transaction marker) is in the
        answer with an empty list."""
        n = max_records or self._max_records
        msgs = self._c.consume(n, 0)
        if not msgs and timeout_ms > 0:
            first = self._c.poll(timeout_ms / 1000)
            if first is not None:
                msgs = [first, *self._c.consume(n - 1, 0)] if n > 1 else [first]
        out: dict[TopicPartition, list[CMessage]] = {}
        pos, paused = self._pos, self._paused
        run_key: tuple[str, int] | None = None  # records come in runs of one partition: look it up once a run
        tp: TopicPartition | None = None
        bucket: list[CMessage] = []
        for m in msgs:
            if m.error() is not None:
                self._event(m, out)
                run_key = None  # the event may have moved a position
                continue
            key = (m.topic(), m.partition())
            if key != run_key:
                run_key, tp = key, self._tps.get(key)
                if tp is None or tp in paused:
                    tp = None
                else:
                    bucket = out.setdefault(tp, [])
            if tp is None:
                continue
            offset = m.offset()
            if offset < pos[tp]:
                continue  # already handed out (a re-fetch after a seek or resume)
            pos[tp] = offset + 1
            bucket.append(CMessage(key[0], key[1], offset, m.timestamp()[1], m.key(), m.headers() or [], m.value()))
        return out

    def _event(self, m: Any, out: dict[TopicPartition, list[CMessage]]) -> None:
        """A partition end (moves the position past a trailing transaction marker) or a client error."""
        err = m.error()
        tp = self._tps.get((m.topic(), m.partition()))
        if err.code() == self._ck.KafkaError._PARTITION_EOF:  # noqa: SLF001 - the documented constant's name
            if tp is not None and tp not in self._paused and m.offset() > self._pos[tp]:
                # The end lies past the last record (a transaction marker): an empty list tells the
                # caller this partition moved, so a Subscriber sees it reach its bound.
                self._pos[tp] = m.offset()
                out.setdefault(tp, [])
        elif err.fatal():
            raise StreamingError(f"confluent-kafka reader failed: {err}; set STREAMLEARN_FAST_READER=false "
                                 "to read with kafka-python instead")
        else:
            log.debug("confluent-kafka reader: %s", err)

    def close(self) -> None:
        try:
            self._c.close()
        finally:
            self._kc.close()
