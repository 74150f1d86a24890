"""Where each partition of a stream worker resumes: (re)assignment, revocation, broker restarts.

Split from :mod:`streaming.worker` by responsibility: the worker's loop reads, batches and flushes;
this mixin decides from which offset each owned partition is read. The rules:

* on (re)assignment a partition resumes after the highest offset the *store* holds (the store is
  the source of truth, the Kafka commit an optimization), with the featurizer state checkpointed in
  that batch, so a crash between a batch's rename and its commit never produces an overlap;
* before that, the newest batches are compared with the topic (:mod:`streaming.divergence`): a
  broker that lost acked writes and re-used their offsets makes them diverge; those batches are
  quarantined and the partition resumes at the divergence;
* on revocation the partition's open and held batches are dropped (the next owner re-reads them
  from the store's end; writing them late could overlap its batches);
* on a broker restart every owned partition is paused, its unwritten batches dropped, and it is
  re-checked against the store before reading on.

Why a mixin rather than a helper object: every rule above moves the same few pieces of worker state
(the consumer's positions and pauses, ``floor``, the sink's open batches, the committer), and a
mixin keeps them in one object without a web of back references.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, Any

from kafka import ConsumerRebalanceListener, TopicPartition

from streaming.divergence import find_divergence, quarantine
from streaming.epochwatch import EpochWatch
from streaming.kafka_security import kafka_security

if TYPE_CHECKING:
    from streaming.batcher import Pipeline
    from streaming.config import Settings
    from streaming.sink import FeatureSink, OffsetCommitter

log = logging.getLogger("streaming.worker")  # one logger for the worker's messages, as before the split


class _Rebalance(ConsumerRebalanceListener):
    """Queues rebalance events for the worker's thread.

    Why not act here: kafka-python 3 calls listeners on its IO thread, where blocking consumer
    calls (committed, commit) are refused and where the worker's own thread may be mid-batch.
    The worker applies the events right after the poll that delivered them, before its records.
    """

    def __init__(self, events: queue.SimpleQueue[tuple[str, list[TopicPartition]]]) -> None:
        self.events = events

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.events.put(("revoked", list(revoked)))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.events.put(("assigned", list(assigned)))


class PartitionPositions:
    """Mixin of :class:`~streaming.worker.StreamWorker`: the positions of its owned partitions."""

    # provided by the worker
    settings: Settings
    kind: str
    topic: str
    sub: Any
    pipeline: Pipeline
    sink: FeatureSink
    committer: OffsetCommitter
    paused_for_backpressure: bool
    registry_backoff: dict[TopicPartition, float]

    def _init_positions(self) -> None:
        """Subscribe with the rebalance listener; set up the broker-restart watch."""
        self._events: queue.SimpleQueue[tuple[str, list[TopicPartition]]] = queue.SimpleQueue()
        self.sub.consumer.subscribe([self.topic], listener=_Rebalance(self._events))
        self.floor: dict[TopicPartition, int] = {}  # next offset to process, per partition
        # Broker restarts (offset reuse): a plain connection a dying broker closes; partitions to re-check.
        self._watch = EpochWatch(self.settings.bootstrap)
        self._watch_at = 0.0
        self._reverify: set[TopicPartition] = set()
        self._reverify_at = 0.0
        self._check_consumer: Any = None
        self.quarantined: list[str] = []

    # ---- rebalance ---------------------------------------------------------------------------
    def _apply_rebalance_events(self) -> set[TopicPartition]:
        """Apply queued rebalance events; returns the partitions (re)assigned, whose records in the
        current poll must be ignored (fetched from a position that the assignment has replaced)."""
        fresh: set[TopicPartition] = set()
        while True:
            try:
                what, tps = self._events.get_nowait()
            except queue.Empty:
                return fresh
            if what == "revoked":
                self._on_revoked(tps)
                fresh -= set(tps)
            else:
                self._on_assigned(tps)
                fresh |= set(tps)

    def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Forget revoked partitions' open and held batches: the partition may already belong to
        another worker, which resumes from the store; persisting late could overlap its batches."""
        for tp in revoked:
            dropped = self.pipeline.forget(tp.partition)  # and off the run's counts: re-read, counted again
            if dropped:
                log.info("%s[%d] revoked: %d unpersisted records will be re-read by the next owner",
                         tp.topic, tp.partition, dropped)
            self.registry_backoff.pop(tp, None)
            self.floor.pop(tp, None)
            self.committer.forget(tp.partition)

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Resume each partition after the highest offset its store batches hold (the store is the
        truth; a commit lost in a crash after the rename must not produce an overlapping batch) and
        restore the featurizer state checkpointed with that batch."""
        consumer = self.sub.consumer
        log.info("assigned %s", sorted(tp.partition for tp in assigned))
        for tp in assigned:
            # Always position explicitly: a partition revoked and assigned back to this process may
            # keep its old fetch position, past records whose open batch the revocation dropped.
            from_store = self.pipeline.restore(tp.partition)
            committed = consumer.committed(tp)
            try:
                resume_at = self._check_store(tp)
            except Exception as exc:  # the broker is not answering yet: hold the partition, re-check soon
                log.warning("%s[%d]: cannot compare the store with the topic yet (%s); holding the partition",
                            tp.topic, tp.partition, exc)
                self._reverify.add(tp)
                consumer.pause(tp)
                continue
            if resume_at is not None:  # the store diverged from the topic: resume at the divergence
                self.pipeline.restore(tp.partition)
                self.committer.later({tp.partition: resume_at})  # the store's verified end: durable
                self.floor[tp] = resume_at
                consumer.seek(tp, resume_at)
                continue
            if from_store is not None and (committed is None or from_store > committed):
                log.info("%s[%d]: store holds up to offset %d (committed %s); resuming there",
                         tp.topic, tp.partition, from_store - 1, committed)
                # The store agrees with the topic (checked above): its end is durable, so commit it. A commit
                # refused by the rebalance (IllegalGeneration) was dropped at the revocation, and the group's
                # offsets (lag in `offsets show` and `status`) stayed behind the store until new records came.
                self.committer.later({tp.partition: from_store})
                target: int | None = from_store
            else:
                target = committed
            if target is None:
                consumer.seek_to_beginning(tp)
                self.floor.pop(tp, None)
            else:
                consumer.seek(tp, target)
                self.floor[tp] = target
        if self.paused_for_backpressure and assigned:
            consumer.pause(*assigned)

    # ---- offset reuse after a broker restart -------------------------------------------------
    def _check_store(self, tp: TopicPartition) -> int | None:
        """Compare the partition's stored batches with the topic; on divergence quarantine the
        batches past it and return the offset to resume at (None when the store agrees)."""
        from kafka import KafkaConsumer

        if self._check_consumer is None:
            self._check_consumer = KafkaConsumer(bootstrap_servers=self.settings.bootstrap,
                                                 enable_auto_commit=False, request_timeout_ms=10_000,
                                                 **kafka_security(self.settings))
        store, ns = self.pipeline.store, self.pipeline.namespace
        div = find_divergence(store, self.kind, tp.topic, tp.partition, ns, self._check_consumer)
        if div is None:
            return None
        qdir = quarantine(store, self.kind, ns, div)
        ids = [b.batch_id for b in div.bad]
        self.quarantined += ids
        log.warning("feature store of %s[%d] diverged from the topic (%s; the broker lost writes and re-used "
                    "their offsets): quarantined %d batches to %s: %s; resuming at offset %d",
                    tp.topic, tp.partition, div.reason, len(ids), qdir, ", ".join(ids), div.resume_at)
        return div.resume_at

    def _watch_broker(self) -> set[TopicPartition]:
        """On a broker restart, drop what was read since the store's end and re-check the store of
        every owned partition before reading on (records there may have vanished or changed).

        Returns the partitions it repositioned: records of the current poll were fetched from the old
        position and must be ignored, as after a rebalance."""
        now = time.monotonic()
        # the liveness check runs on every loop (records fetched from a restarted broker must never be
        # processed before the restart is noticed); reconnecting is throttled
        reconnect = now >= self._watch_at
        if reconnect:
            self._watch_at = now + 0.2
        if self._watch.poll(reconnect=reconnect):
            owned = self.sub.consumer.assignment()
            log.warning("broker connection lost; partitions %s will be re-checked against the store when "
                        "it is back", sorted(tp.partition for tp in owned))
            for tp in owned:
                self.pipeline.forget(tp.partition)  # open and held batches: re-read after the re-check
                self._reverify.add(tp)
            if owned:
                self.sub.consumer.pause(*owned)
        if not self._reverify or not self._watch.connected or now < self._reverify_at:
            return set()
        owned = self.sub.consumer.assignment()
        todo = [tp for tp in self._reverify if tp in owned]
        self._reverify.clear()
        self._on_assigned(todo)  # re-adds (and keeps paused) the partitions it could not check yet
        if self._reverify:
            self._reverify_at = now + 1.0
        resumable = [tp for tp in todo if tp not in self._reverify and tp not in self.registry_backoff
                     and not self.paused_for_backpressure]
        if resumable:
            self.sub.consumer.resume(*resumable)
        return set(todo)
