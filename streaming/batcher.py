"""Micro-batcher (rows per partition until N records or T seconds) and the Pipeline around it.

:class:`Pipeline` is decode -> featurize -> batch for one kind, shared by the live worker
(:mod:`streaming.worker`) and replays (:mod:`streaming.replay`), so both build batches the same way;
its :class:`~streaming.sink.FeatureSink` (``pipeline.sink``) makes them durable and says which
offsets may be committed.

Why per partition: a batch's name is derived from one partition's offset range, which keeps
names deterministic (a restarted worker recomputes the same ids) and lets the worker commit one
partition's offsets as soon as that partition's batch is durable, independently of the others.

A dead-lettered record counts as a record of the batch (it occupies an offset the batch
covers, and its offset is listed in the manifest), so a batch can close with zero rows; the
worker then only flushes the dead-letter producer and commits. Closing by time is wall-clock
dependent, so replays pass ``max_seconds=None`` to get boundaries fixed by count alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.exceptions import RegistryUnavailableError
from schemas.registry import SchemaRegistry
from schemas.serde import AvroDeserializer
from streaming import eventtime, metrics, onerror
from streaming.batcher_runs import process_runs
from streaming.config import Settings
from streaming.deadletters import FLOOR_KEY, DeadLetterIndex
from streaming.divergence import FINGERPRINT_ALGO, FingerprintChain, record_fingerprint
from streaming.exceptions import (
    BatcherError,  # noqa: F401 (re-exported)
    FeatureValidationError,
    PublishError,
    StoreError,
)
from streaming.features.base import DeferredRow
from streaming.sink import FeatureSink
from streaming.store import BatchSpec, FeatureStore, StoredRow
from streaming.topics import KINDS, raw_topic

log = logging.getLogger(__name__)

#: Featurize latency is observed for one record in this many (by offset).
FEATURIZE_SAMPLE = 8
#: ``x`` of a row whose features are computed when its batch closes (never persisted as such).
_NO_X = np.zeros(0, dtype=np.float32)


@dataclass
class ClosedBatch:
    """What a partition's batcher hands to the store: the manifest fields and the rows."""

    spec: BatchSpec
    rows: list[StoredRow]
    opened_at: float
    closed_at: float
    #: rows whose ``x`` the featurizer computes for the whole batch (index in ``rows``, inputs);
    #: the sink's ``finish`` hook (:meth:`Pipeline._finish`) fills them in before anyone sees the batch
    deferred: list[tuple[int, DeferredRow]] = field(default_factory=list)

    @property
    def next_offset(self) -> int:
        """The offset to commit once this batch is durable."""
        return self.spec.last_offset + 1

    @property
    def age_s(self) -> float:
        return self.closed_at - self.opened_at


@dataclass
class PartitionBatch:
    """The open batch of one topic-partition."""

    topic: str
    partition: int
    rows: list[StoredRow] = field(default_factory=list)
    deferred: list[tuple[int, DeferredRow]] = field(default_factory=list)
    dead_letter_offsets: list[int] = field(default_factory=list)
    schema_ids: set[int] = field(default_factory=set)
    first_offset: int | None = None
    last_offset: int | None = None
    opened_at: float | None = None
    #: chain digest of the records' fingerprints (offset-reuse detection, streaming/divergence.py)
    chain: FingerprintChain | None = None

    def _fingerprint(self, offset: int, fingerprint: str | None) -> None:
        if fingerprint is not None:
            if self.chain is None:
                self.chain = FingerprintChain()
            self.chain.add(offset, fingerprint)

    @property
    def count(self) -> int:
        return len(self.rows) + len(self.dead_letter_offsets)

    def _advance(self, offset: int, now: float) -> None:
        if self.last_offset is not None and offset <= self.last_offset:
            raise BatcherError(
                f"offset: {offset} is not after {self.last_offset} on {self.topic}[{self.partition}]; "
                "drop the partition's batch (rebalance/seek) before re-reading older offsets"
            )
        if self.first_offset is None:
            self.first_offset = offset
            self.opened_at = now
        self.last_offset = offset


class MicroBatcher:
    """Open batches of every assigned partition; closes at ``max_records`` or ``max_seconds``."""

    def __init__(self, *, kind: str, featurizer_version: str, n_features: int, label_names: list[str],
                 max_records: int, max_seconds: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_records < 1:
            raise BatcherError(f"max_records: must be >= 1, got {max_records}; set batch_max_records")
        if max_seconds is not None and max_seconds <= 0:
            raise BatcherError(f"max_seconds: must be > 0 or None, got {max_seconds}; set batch_max_seconds")
        self.kind = kind
        self.featurizer_version = featurizer_version
        self.n_features = n_features
        self.label_names = list(label_names)
        self.max_records = max_records
        self.max_seconds = max_seconds
        self.clock = clock
        self._open: dict[tuple[str, int], PartitionBatch] = {}

    def _batch(self, topic: str, partition: int) -> PartitionBatch:
        key = (topic, partition)
        b = self._open.get(key)
        if b is None:
            b = self._open[key] = PartitionBatch(topic, partition)
        return b

    def add_row(self, row: StoredRow, schema_id: int | None, fingerprint: str | None = None,
                deferred: DeferredRow | None = None) -> None:
        """Add a row; with ``deferred`` its ``x`` is a placeholder until the batch closes."""
        b = self._batch(row.topic, row.partition)
        b._advance(row.offset, self.clock())
        b._fingerprint(row.offset, fingerprint)
        if deferred is not None:
            b.deferred.append((len(b.rows), deferred))
        b.rows.append(row)
        if schema_id is not None:
            b.schema_ids.add(int(schema_id))

    def add_rows(self, topic: str, partition: int,
                 items: list[tuple[StoredRow, int | None, str | None, DeferredRow | None]]) -> None:
        """:meth:`add_row` for consecutive rows of one partition (a poll's run between dead letters):
        the same checks and fingerprint chain, with the batch looked up and the clock read once."""
        if not items:
            return
        b = self._batch(topic, partition)
        first = items[0][0].offset
        b._advance(first, self.clock())  # refuses a first offset at or before the batch's last one
        last = first - 1
        rows, deferred, schema_ids = b.rows, b.deferred, b.schema_ids
        chain = b.chain
        for row, schema_id, fingerprint, later in items:
            offset = row.offset
            if offset <= last:
                b.last_offset = last
                b._advance(offset, 0.0)  # raises the precise BatcherError
            last = offset
            if fingerprint is not None:
                if chain is None:
                    chain = b.chain = FingerprintChain()
                chain.add(offset, fingerprint)
            if later is not None:
                deferred.append((len(rows), later))
            rows.append(row)
            if schema_id is not None:
                schema_ids.add(int(schema_id))
        b.last_offset = last

    def add_dead_letter(self, topic: str, partition: int, offset: int, fingerprint: str | None = None) -> None:
        """Record that ``offset`` went to the dead-letter topic (processed, but no row)."""
        b = self._batch(topic, partition)
        b._advance(offset, self.clock())
        b._fingerprint(offset, fingerprint)
        b.dead_letter_offsets.append(offset)

    def pending(self, topic: str, partition: int) -> int:
        b = self._open.get((topic, partition))
        return b.count if b else 0

    def due(self, now: float | None = None) -> list[tuple[str, int]]:
        """Partitions whose batch is full or whose oldest record is older than ``max_seconds``."""
        now = self.clock() if now is None else now
        out = []
        for key, b in self._open.items():
            if b.count == 0:
                continue
            if b.count >= self.max_records:
                out.append(key)
            elif (self.max_seconds is not None and b.opened_at is not None
                  and now - b.opened_at >= self.max_seconds):
                out.append(key)
        return sorted(out)

    def seconds_until_due(self, now: float | None = None) -> float | None:
        """How long until the next time-based close (None when nothing is open or no time limit)."""
        if self.max_seconds is None:
            return None
        now = self.clock() if now is None else now
        ages = [now - b.opened_at for b in self._open.values() if b.count and b.opened_at is not None]
        return max(0.0, self.max_seconds - max(ages)) if ages else None

    def close(self, topic: str, partition: int, featurizer_state: str | None) -> ClosedBatch | None:
        """Close the partition's open batch (None when empty); ``featurizer_state`` is the state
        after its last record, checkpointed in the manifest so a restart resumes windows exactly."""
        b = self._open.pop((topic, partition), None)
        if b is None or b.count == 0 or b.first_offset is None or b.last_offset is None:
            return None
        spec = BatchSpec(
            kind=self.kind, topic=topic, partition=partition, first_offset=b.first_offset,
            last_offset=b.last_offset, featurizer_version=self.featurizer_version,
            n_features=self.n_features, label_names=self.label_names, schema_ids=sorted(b.schema_ids),
            dead_letter_offsets=list(b.dead_letter_offsets), featurizer_state=featurizer_state,
            extra={} if b.chain is None else {"fingerprints": {
                "algo": FINGERPRINT_ALGO, "last": b.chain.last, "chain": b.chain.hexdigest()}},
        )
        return ClosedBatch(spec, b.rows, b.opened_at or self.clock(), self.clock(), b.deferred)

    def drop(self, topic: str, partition: int) -> tuple[int, int]:
        """Forget a partition's open batch (revoked, or about to re-read after a failure); returns the
        records (rows and dead letters) and the rows it held."""
        b = self._open.pop((topic, partition), None)
        return (b.count, len(b.rows)) if b else (0, 0)

    def open_partitions(self) -> Iterator[tuple[str, int]]:
        return iter(sorted(k for k, b in self._open.items() if b.count))


@dataclass
class WorkerStats:
    """Counters of one worker run (also exported as Prometheus metrics)."""

    records: int = 0
    rows: int = 0
    dead_letters: int = 0
    batches: int = 0
    batches_skipped: int = 0
    registry_retries: int = 0
    backpressure_events: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)


class Pipeline:
    """Decode + featurize + batch for one kind; shared by the worker and replays.

    Holds one featurizer state per partition. Rows go to :attr:`sink`, which writes batches and
    calls ``on_durable({partition: next_offset})`` after each flush made batches durable (None for
    replays, which never commit).
    """

    def __init__(self, settings: Settings, kind: str, *, namespace: str, registry: SchemaRegistry,
                 publisher: Any, max_seconds: float | None, featurizer_version: str | None = None,
                 store: FeatureStore | None = None, on_error: onerror.OnError = onerror.dead_letter,
                 on_durable: Callable[[dict[int, int]], None] | None = None) -> None:
        self.settings = settings
        self.on_error = on_error
        self.kind = kind
        self.namespace = namespace
        self.topic = raw_topic(settings, kind)
        from streaming.features import get_featurizer
        from streaming.features.image import ImageFeaturizer

        self.featurizer = get_featurizer(kind, featurizer_version)
        self.featurizer.max_future_ms = eventtime.max_future_ms(settings)  # the window every entry applies
        if settings.image_decode_threads and isinstance(self.featurizer, ImageFeaturizer):
            self.featurizer.decode_threads = settings.image_decode_threads
        self.deserializer = AvroDeserializer(registry, record_name=KINDS[kind])
        self.publisher = publisher
        self.store = store or FeatureStore(settings.feature_store,
                                           state_inline_max_bytes=settings.store_state_inline_max_bytes)
        self.batcher = MicroBatcher(kind=kind, featurizer_version=self.featurizer.version,
                                    n_features=self.featurizer.n_features,
                                    label_names=list(self.featurizer.label_names),
                                    max_records=settings.batch_max_records, max_seconds=max_seconds)
        self.states: dict[int, Any] = {}
        self.stats = WorkerStats()
        self.sink = FeatureSink(self.store, kind, namespace, self.topic, self.batcher, checkpoint=self._checkpoint,
                                stats=self.stats, before_write=lambda _closed: self.flush_dead_letters(),
                                finish=self._finish, on_durable=on_durable)
        self._featurize_hist = metrics.FEATURIZE_SECONDS.labels(kind)
        self._records_ok = metrics.RECORDS.labels(kind, "row")
        self._records_dl = metrics.RECORDS.labels(kind, "dead_letter")
        self._dl_futures: list[Any] = []
        self._unreported_rows = 0
        self.dl_index: DeadLetterIndex | None = None  # set by the live worker (streaming/deadletters.py)
        self._dl_skip: dict[int, set[int]] = {}

    # ---- state -------------------------------------------------------------------------------
    def restore(self, partition: int) -> int | None:
        """Load the partition's featurizer state from its last batch; returns the next offset to
        read according to the store (None when the store has nothing for the partition).
        Open and held batches of the partition are dropped: reading resumes at the store's end."""
        self._uncount(partition)
        last = self.store.last_batch(self.kind, self.topic, partition, self.namespace)
        state = None
        if last is not None:
            same = last.manifest.get("featurizer", {}).get("version") == self.featurizer.version
            try:  # inline in the manifest or in the batch's state file (docs/STORE.md)
                text = self.store.featurizer_state(self.kind, last.manifest, self.namespace)
            except StoreError as exc:  # a missing/corrupt state file: same policy as a bad checkpoint
                log.warning("%s[%d]: %s; starting fresh", self.topic, partition, exc)
                text = None
            if text is not None and same:
                try:
                    state = self.featurizer.state_from_json(text)
                except Exception as exc:  # a bad checkpoint must not stop the stream: start fresh
                    log.warning("%s[%d]: cannot restore featurizer state from %s (%s); starting fresh",
                                self.topic, partition, last.batch_id, exc)
            elif text is not None:
                log.warning("%s[%d]: last batch used featurizer %s, now %s; windows start fresh",
                            self.topic, partition, last.manifest.get("featurizer", {}).get("version"),
                            self.featurizer.version)
        self.states[partition] = state if state is not None else self.featurizer.new_state()
        nxt = None if last is None else int(last.manifest["ranges"][0]["last_offset"]) + 1
        self._dl_skip.pop(partition, None)
        if self.dl_index is not None:
            try:
                skip = self.dl_index.already_written(None if last is None else last.manifest.get(FLOOR_KEY),
                                                     self.topic, partition, after=nxt or 0)
            except Exception as exc:  # a duplicate dead letter is better than a stalled partition
                log.warning("%s[%d]: cannot read back earlier dead letters (%s); records dead-lettered before "
                            "a crash may be dead-lettered again", self.topic, partition, exc)
                skip = set()
            if skip:
                log.info("%s[%d]: %d offsets past the store already have their dead letter (written before a "
                         "crash); not writing them again", self.topic, partition, len(skip))
                self._dl_skip[partition] = skip
        return nxt

    def forget(self, partition: int) -> int:
        """Drop the partition's open and held batches and its state (revoked); returns the records dropped."""
        dropped = self._uncount(partition)
        self.states.pop(partition, None)
        self._dl_skip.pop(partition, None)
        return dropped

    def _uncount(self, partition: int) -> int:
        """Drop the partition's unpersisted batches and take their records and rows off :attr:`stats`: they
        are read again, and counted again then. Why: after a kill -9 and a rebalance the run's summary said
        600 records and rows for 300 written."""
        records, rows = self.sink.forget(partition)
        self.stats.records = max(0, self.stats.records - records)
        self.stats.rows = max(0, self.stats.rows - rows)
        self.stats.dead_letters = max(0, self.stats.dead_letters - (records - rows))  # re-read: counted again
        return records

    # ---- per record --------------------------------------------------------------------------
    def process(self, msg: Any) -> None:
        """One raw Kafka message (topic, partition, offset, key, value). Raises
        RegistryUnavailableError (caller seeks back to ``msg.offset`` and retries)."""
        partition, offset = msg.partition, msg.offset
        raw = msg.value if msg.value is not None else b""
        try:
            decoded = self.deserializer(msg.value)  # None: a tombstone, said as such
        except RegistryUnavailableError:
            raise  # not the record's fault: the worker retries it
        except Exception as exc:  # SchemaError, or any other decode failure (RecursionError, MemoryError...)
            self._failed(msg, raw, "decode", exc)
            return
        state = self.states.get(partition)
        if state is None:
            state = self.states[partition] = self.featurizer.new_state()
        # Featurize latency is sampled (1 record in FEATURIZE_SAMPLE, by offset): the histogram's
        # shape is the same and the hot loop skips two clock reads and a locked observe per record.
        sampled = offset % FEATURIZE_SAMPLE == 0
        t0 = time.perf_counter() if sampled else 0.0
        try:
            # A declared backfill (header sl.backfill) is featurized as its own run: no live lateness.
            # Rows may come back deferred: validated and in the state now, x computed for the whole
            # batch at close (Featurizer.finish_rows, the same bits as one at a time).
            row = self.featurizer.featurize_event_deferred(decoded.value, state,
                                                           eventtime.backfill_run(msg.headers))
        except Exception as exc:  # FeatureValidationError, or a value the featurizer did not foresee
            if not isinstance(exc, FeatureValidationError):
                log.warning("%s[%d]@%d: featurizer %s raised %s", msg.topic, partition, offset,
                            self.featurizer.version, type(exc).__name__)
            self._failed(msg, raw, "featurize", exc)
            return
        if sampled:
            self._featurize_hist.observe(time.perf_counter() - t0)
        if isinstance(row, DeferredRow):
            self.sink.add(StoredRow(_NO_X, row.labels, row.event_time_ms, row.key, msg.topic, partition, offset),
                          decoded.schema_id, record_fingerprint(msg), deferred=row)
        else:
            self.sink.add(StoredRow(row.x, row.labels, row.event_time_ms, row.key, msg.topic, partition, offset),
                          decoded.schema_id, record_fingerprint(msg))
        self.stats.records += 1
        self.stats.rows += 1
        self._unreported_rows += 1

    def process_many(self, msgs: Sequence[Any]) -> tuple[int, RegistryUnavailableError | None]:
        """:meth:`process` for each of ``msgs`` (one partition's records of a poll, in offset order),
        with the same rows, dead letters, batch contents and fingerprints, but fewer steps per record:
        the values are decoded in one :meth:`AvroDeserializer.decode_many` call, lookups are hoisted
        and rows go to the batcher per run between dead letters (:meth:`MicroBatcher.add_rows`).

        Returns ``(processed, outage)``: ``outage`` is the RegistryUnavailableError met at
        ``msgs[processed]``, which is not processed (the caller seeks back to it and retries), else
        None. Any other exception propagates as from :meth:`process` (an ``on_error`` that raises).
        """
        return process_runs(self, msgs)

    def _process_each(self, msgs: Sequence[Any]) -> tuple[int, RegistryUnavailableError | None]:
        """:meth:`process` one record at a time; stops at a registry outage (``(index, error)``)."""
        for i, msg in enumerate(msgs):
            try:
                self.process(msg)
            except RegistryUnavailableError as exc:
                return i, exc
        return len(msgs), None

    def report_metrics(self) -> None:
        """Add the rows counted since the last call to the records counter (once per poll, not per record)."""
        if self._unreported_rows:
            self._records_ok.inc(self._unreported_rows)
            self._unreported_rows = 0

    def _failed(self, msg: Any, raw: bytes, stage: str, exc: Exception) -> None:
        """A record failed at ``stage``: the error policy decides (dead letter by default, or raise)."""
        if onerror.decide(self.on_error, stage, exc, msg) == "raise":
            raise exc
        self._dead_letter(msg, raw, stage, exc)

    def _dead_letter(self, msg: Any, raw: bytes, stage: str, exc: Exception) -> None:
        if msg.offset not in self._dl_skip.get(msg.partition, ()):
            fut = self.publisher.dead_letter(
                self.kind, raw, stage=stage, error=exc,
                source={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}, key=msg.key)
            self._dl_futures.append((fut, msg, raw, stage, exc))
        self.sink.add_dead_letter(msg.partition, msg.offset, record_fingerprint(msg))
        name = type(exc).__name__
        self.stats.records += 1
        self.stats.dead_letters += 1
        self.stats.dead_letter_reasons[name] = self.stats.dead_letter_reasons.get(name, 0) + 1
        self._records_dl.inc()
        metrics.DEAD_LETTERS.labels(self.kind, metrics.reason_label(name)).inc()

    # ---- closing -----------------------------------------------------------------------------
    def _checkpoint(self, partition: int) -> tuple[str | None, dict[str, Any]]:
        """What the sink stores with the partition's batch as it closes: the featurizer state after
        its last record, and the dead-letter floor."""
        state = self.states.get(partition)
        text = self.featurizer.state_to_json(state) if state is not None else None
        extra: dict[str, Any] = {}
        if self.dl_index is not None:
            # taken before any later record is read: every later dead letter lands at or above it
            try:
                extra[FLOOR_KEY] = self.dl_index.floor()
            except Exception as exc:  # without a floor the next start reads the dead-letter topic from 0
                log.warning("dead-letter topic end offsets unavailable (%s); batch written without a floor", exc)
        return text, extra

    def _finish(self, closed: ClosedBatch) -> None:
        """Compute the deferred rows' ``x`` for the whole batch at once and put them in place.

        (The featurize histogram keeps timing the per-record part in :meth:`process`; this part
        costs a few microseconds per row and is inside the batch's persist time.)"""
        xs = self.featurizer.finish_rows([d for _, d in closed.deferred])
        rows = closed.rows
        for (i, _), x in zip(closed.deferred, xs, strict=True):
            r = rows[i]
            rows[i] = StoredRow(x, r.labels, r.event_time_ms, r.key, r.topic, r.partition, r.offset)
        closed.deferred = []

    def flush_dead_letters(self) -> None:
        """Make every dead letter sent so far durable; failed sends are re-sent once, then
        PublishError (the caller retries later and commits nothing meanwhile)."""
        if not self._dl_futures:
            return
        self.publisher.flush()
        failed = [f for f in self._dl_futures if f[0].failed()]
        for _, msg, raw, stage, exc in failed:
            self.publisher.dead_letter(self.kind, raw, stage=stage, error=exc, key=msg.key,
                                       source={"topic": msg.topic, "partition": msg.partition,
                                               "offset": msg.offset})
        if failed:
            self.publisher.flush()
            still = [f for f in failed if f[0].failed()]
            if still:
                self._dl_futures = still
                raise PublishError(f"dead-letter topic: {len(still)} dead letters not acknowledged "
                                   f"({still[0][0].exception}); check the broker; will retry")
        self._dl_futures = []
