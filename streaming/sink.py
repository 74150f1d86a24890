"""The feature store as a batching sink: ``add`` / ``flush`` / ``write``, shared by the worker and replay.

Shaped after quix-streams' ``BatchingSink``: :meth:`FeatureSink.add` accumulates rows per
partition (in the :class:`~streaming.batcher.MicroBatcher`), :meth:`FeatureSink.flush` turns
what was accumulated into durable batches, :meth:`FeatureSink.write` is the durable write of one
batch, and a store that cannot take data raises :class:`SinkBackpressureError`, which the caller
answers by pausing its partitions, never by failing.

Why one class: the rule "no offset is committed before its effect is durable" used to be kept by
hand in three places (the worker's persist-and-commit, its retry of held batches, and replay's
close). Here :meth:`FeatureSink.flush` is the only code that reports offsets as safe to commit
(``on_durable``), and it does so only for batches whose :meth:`write` returned: their dead
letters acked and their ``.avro`` renamed into place. The live worker wires ``on_durable`` to an
:class:`OffsetCommitter`; replay passes nothing (it never commits).

Where we differ from quix-streams: a batch the store refused is *kept* (in order, per sink) and
written by the next ``flush`` rather than dropped and re-read from Kafka, because a batch's
featurizer state checkpoint is taken when it closes and windows must continue exactly. A batch
whose range another writer already persisted (a zombie owner) is dropped with the rest of its
partition's queue and reported in :attr:`Flushed.overlaps`: the caller re-reads from the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kafka import TopicPartition

from streaming import metrics
from streaming.exceptions import BackpressureError, BatchOverlapError, PublishError, SinkBackpressureError
from streaming.store import BatchInfo, FeatureStore, StoredRow

if TYPE_CHECKING:  # batcher.py builds the sink (Pipeline); importing it here at run time would be a cycle
    from streaming.batcher import ClosedBatch, MicroBatcher, WorkerStats

log = logging.getLogger(__name__)

#: Longest wait between two attempts to write a refused batch.
MAX_BACKOFF_S = 30.0
#: First wait after a refusal; doubled per refusal in a row.
MIN_BACKOFF_S = 0.2

#: ``(featurizer state JSON, extra manifest fields)`` of a partition at the moment its batch closes.
Checkpoint = Callable[[int], tuple["str | None", dict[str, Any]]]


@dataclass
class Flushed:
    """What one :meth:`FeatureSink.flush` made durable."""

    written: list[str] = field(default_factory=list)  # batch ids written by this flush
    existing: list[str] = field(default_factory=list)  # already in the store (a re-run, a restart)
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset, safe to commit
    overlaps: dict[int, BatchOverlapError] = field(default_factory=dict)  # partitions to re-read from the store


class FeatureSink:
    """Batches of one kind's raw topic into one namespace of the feature store.

    ``checkpoint(partition)`` gives the featurizer state (and extra manifest fields) to store with a
    batch when it closes; ``finish(batch)`` computes the rows the featurizer deferred to the batch;
    ``before_write(batch)`` makes the batch's side effects durable first (the dead letters; raises
    :class:`PublishError` when they are not acked, handled as backpressure); ``on_durable({partition:
    next_offset})`` is told what may be committed, after each flush.
    """

    def __init__(self, store: FeatureStore, kind: str, namespace: str, topic: str, batcher: MicroBatcher, *,
                 checkpoint: Checkpoint, stats: WorkerStats,
                 before_write: Callable[[ClosedBatch], None] | None = None,
                 finish: Callable[[ClosedBatch], None] | None = None,
                 on_durable: Callable[[dict[int, int]], None] | None = None) -> None:
        self.store = store
        self.kind = kind
        self.namespace = namespace
        self.topic = topic
        self.batcher = batcher
        self.checkpoint = checkpoint
        self.stats = stats
        self.before_write = before_write
        self.finish = finish
        self.on_durable = on_durable
        #: closed batches not yet durable, oldest first (written in this order: offsets stay ascending)
        self.held: list[ClosedBatch] = []
        self._backoff_s = 0.0

    # ---- add ---------------------------------------------------------------------------------
    def add(self, row: StoredRow, schema_id: int | None, fingerprint: str | None = None,
            deferred: Any = None) -> None:
        """One featurized record's row, into its partition's open batch. ``deferred``: the row's
        ``x`` is computed for the whole batch when it closes (``finish``; Featurizer.finish_rows)."""
        self.batcher.add_row(row, schema_id, fingerprint, deferred)

    def add_dead_letter(self, partition: int, offset: int, fingerprint: str | None = None) -> None:
        """An offset whose record went to the dead-letter topic: covered by the batch, no row."""
        self.batcher.add_dead_letter(self.topic, partition, offset, fingerprint)

    def pending(self, partition: int) -> int:
        """Records (rows and dead letters) in the partition's open batch."""
        return self.batcher.pending(self.topic, partition)

    def forget(self, partition: int) -> tuple[int, int]:
        """Drop the partition's open and held batches (revoked, or about to be re-read from the store);
        returns how many records and rows were dropped. Nothing of them was reported durable."""
        dropped, rows = self.batcher.drop(self.topic, partition)
        for c in self.held:
            if c.spec.partition == partition:
                dropped += c.spec.last_offset - c.spec.first_offset + 1
                rows += len(c.rows)
        self.held = [c for c in self.held if c.spec.partition != partition]
        return dropped, rows

    # ---- flush -------------------------------------------------------------------------------
    def flush(self, partitions: Iterable[int] = ()) -> Flushed:
        """Close ``partitions``' open batches, then write every closed batch, oldest first.

        Reports the durable offsets to ``on_durable`` (also when a later batch is refused) and
        returns them. Raises :class:`SinkBackpressureError` when the store (or the dead-letter
        topic) refused a batch: it and the batches after it stay held for the next flush.
        """
        for partition in partitions:
            if not self.batcher.pending(self.topic, partition):
                continue  # the checkpoint may ask the broker (dead-letter floor): only for a real batch
            state, extra = self.checkpoint(partition)
            closed = self.batcher.close(self.topic, partition, state)
            if closed is not None:
                if closed.deferred and self.finish is not None:
                    self.finish(closed)  # the batch's deferred rows get their x before anything sees it
                closed.spec.extra.update(extra)
                self.held.append(closed)
        flushed = Flushed()
        refused: BackpressureError | None = None
        while self.held:
            closed = self.held[0]
            partition = closed.spec.partition
            try:
                info, written = self.write(closed)
            except BackpressureError as exc:
                refused = exc
                break
            except BatchOverlapError as exc:
                self.forget(partition)  # its later batches follow a range someone else wrote
                flushed.overlaps[partition] = exc  # (batches of it written before this one stay durable)
                continue
            self.held.pop(0)
            (flushed.written if written else flushed.existing).append(info.batch_id)
            flushed.offsets[partition] = closed.next_offset
        if flushed.offsets and self.on_durable is not None:
            self.on_durable(dict(flushed.offsets))  # the one place offsets are handed on: after write()
        if refused is None:
            self._backoff_s = 0.0
            return flushed
        self._backoff_s = min(MAX_BACKOFF_S, max(MIN_BACKOFF_S, self._backoff_s * 2))
        raise SinkBackpressureError(str(refused), retry_after=self._backoff_s) from refused

    # ---- write -------------------------------------------------------------------------------
    def write(self, closed: ClosedBatch) -> tuple[BatchInfo, bool]:
        """The durable write of one batch: its dead letters acked first, then the store's atomic
        write. ``(info, written)``; ``written`` is False when the very same batch already existed."""
        if self.before_write is not None and closed.spec.dead_letter_offsets:
            try:
                self.before_write(closed)
            except PublishError as exc:
                raise BackpressureError(str(exc)) from exc
        info, written = self.store.write_batch(closed.spec, closed.rows, namespace=self.namespace)
        if written:
            self.stats.batches += 1
            metrics.BATCHES.labels(self.kind).inc()
            metrics.BATCH_SIZE.labels(self.kind).observe(closed.spec.last_offset - closed.spec.first_offset + 1)
            metrics.BATCH_AGE.labels(self.kind).observe(max(0.0, time.monotonic() - closed.opened_at))
        else:
            self.stats.batches_skipped += 1
        return info, written


class OffsetCommitter:
    """The consumer group's side of commit-after-flush.

    Commits only what a :class:`FeatureSink` reported durable (or, after a divergence check, the
    store's verified end); a failed commit (a rebalance in progress) is kept and retried on a later
    loop, so the group's offsets catch up with the store even when no further batch comes. The
    store stays the truth either way: a new owner resumes after the store's last batch.
    """

    def __init__(self, topic: str, commit: Callable[[dict[TopicPartition, int]], None],
                 retry_s: float = 1.0) -> None:
        self.topic = topic
        self._commit = commit
        self.retry_s = retry_s
        self.pending: dict[TopicPartition, int] = {}
        self._retry_at = 0.0

    def durable(self, offsets: dict[int, int]) -> None:
        """``{partition: next_offset}`` whose effects are durable: commit them now."""
        self.later(offsets)
        self.commit()

    def later(self, offsets: dict[int, int]) -> None:
        """Queue offsets whose effects are durable, committed by the next :meth:`retry`/:meth:`commit`."""
        self.pending.update({TopicPartition(self.topic, p): off for p, off in offsets.items()})

    def forget(self, partition: int) -> None:
        self.pending.pop(TopicPartition(self.topic, partition), None)

    def retry(self) -> None:
        """Commit the pending offsets when the retry delay has passed."""
        if self.pending and time.monotonic() >= self._retry_at:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        pending = dict(self.pending)
        try:
            self._commit(pending)
        except Exception as exc:  # rebalancing: the store is the truth, the next owner seeks past it
            self._retry_at = time.monotonic() + self.retry_s
            log.warning("commit of %s failed (%s); the store still records the progress; will retry",
                        pending, exc)
            return
        for tp, off in pending.items():
            if self.pending.get(tp) == off:
                del self.pending[tp]
