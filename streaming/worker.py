"""Stream workers: raw topic -> decode -> featurize -> micro-batches in the feature store.

Run ``streamlearn stream <kind>`` (or ``python -m streaming.worker <kind>``) in as many
processes as the raw topic has partitions; they share the partitions through a consumer group.

Exactly-once into the store, without Kafka transactions:

* a batch is one partition's offset range; it is written atomically (see :mod:`streaming.store`)
  and only then are the offsets committed, so a crash never commits unpersisted data;
* on (re)assignment the worker resumes after the highest offset the *store* holds for the
  partition (the store is the source of truth; the Kafka commit is an optimization), so a crash
  between the rename and the commit never produces an overlapping batch;
* the featurizer state (sliding windows) after a batch's last record is checkpointed in that
  batch's manifest and restored with it, so windows continue exactly across restarts.

Undecodable records and records failing feature validation go to the kind's dead-letter topic
(original bytes, reason headers) and their offsets are listed in the batch manifest; the
dead-letter producer is flushed before the batch is written. A registry outage is retried with
backoff and never dead-lettered. When the store cannot be written (disk full, permissions) the
worker pauses its partitions, retries with backoff and resumes by itself (backpressure).
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition

from schemas.exceptions import RegistryUnavailableError, SchemaError
from schemas.registry import SchemaRegistry, open_registry
from schemas.serde import AvroDeserializer
from streaming import metrics
from streaming.batcher import ClosedBatch, MicroBatcher
from streaming.config import Settings
from streaming.exceptions import BackpressureError, FeatureValidationError, PublishError
from streaming.features import get_featurizer
from streaming.store import BatchOverlapError, FeatureStore, StoredRow
from streaming.topics import raw_topic

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
FEATURIZE_SAMPLE = 8


def default_group(settings: Settings, kind: str) -> str:
    """The consumer group of the live stream workers of ``kind``."""
    return settings.group(f"stream.{kind}")


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
    """Decode + featurize + batch + persist for one kind; shared by the worker and replays.

    Holds one featurizer state per partition. ``commit`` is called with ``{tp: next_offset}``
    after a batch is durable (None for replays, which never commit).
    """

    def __init__(self, settings: Settings, kind: str, *, namespace: str, registry: SchemaRegistry,
                 publisher: Any, max_seconds: float | None, featurizer_version: str | None = None,
                 store: FeatureStore | None = None) -> None:
        self.settings = settings
        self.kind = kind
        self.namespace = namespace
        self.topic = raw_topic(settings, kind)
        self.featurizer = get_featurizer(kind, featurizer_version)
        self.deserializer = AvroDeserializer(registry)
        self.publisher = publisher
        self.store = store or FeatureStore(settings.feature_store)
        self.batcher = MicroBatcher(kind=kind, featurizer_version=self.featurizer.version,
                                    n_features=self.featurizer.n_features,
                                    label_names=list(self.featurizer.label_names),
                                    max_records=settings.batch_max_records, max_seconds=max_seconds)
        self.states: dict[int, Any] = {}
        self.stats = WorkerStats()
        self._featurize_hist = metrics.FEATURIZE_SECONDS.labels(kind)
        self._records_ok = metrics.RECORDS.labels(kind, "row")
        self._records_dl = metrics.RECORDS.labels(kind, "dead_letter")
        self._dl_futures: list[Any] = []
        self._unreported_rows = 0

    # ---- state -------------------------------------------------------------------------------
    def restore(self, partition: int) -> int | None:
        """Load the partition's featurizer state from its last batch; returns the next offset to
        read according to the store (None when the store has nothing for the partition)."""
        self.batcher.drop(self.topic, partition)
        last = self.store.last_batch(self.kind, self.topic, partition, self.namespace)
        state = None
        if last is not None:
            text = last.manifest.get("featurizer_state")
            same = last.manifest.get("featurizer", {}).get("version") == self.featurizer.version
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
        return None if last is None else int(last.manifest["ranges"][0]["last_offset"]) + 1

    def forget(self, partition: int) -> None:
        self.batcher.drop(self.topic, partition)
        self.states.pop(partition, None)

    # ---- per record --------------------------------------------------------------------------
    def process(self, msg: Any) -> None:
        """One raw Kafka message (topic, partition, offset, key, value). Raises
        RegistryUnavailableError (caller seeks back to ``msg.offset`` and retries)."""
        partition, offset = msg.partition, msg.offset
        raw = msg.value if msg.value is not None else b""
        try:
            decoded = self.deserializer(raw)
        except SchemaError as exc:
            self._dead_letter(msg, raw, "decode", exc)
            return
        state = self.states.get(partition)
        if state is None:
            state = self.states[partition] = self.featurizer.new_state()
        # Featurize latency is sampled (1 record in FEATURIZE_SAMPLE, by offset): the histogram's
        # shape is the same and the hot loop skips two clock reads and a locked observe per record.
        sampled = offset % FEATURIZE_SAMPLE == 0
        t0 = time.perf_counter() if sampled else 0.0
        try:
            row = self.featurizer.featurize(decoded.value, state)
        except FeatureValidationError as exc:
            self._dead_letter(msg, raw, "featurize", exc)
            return
        if sampled:
            self._featurize_hist.observe(time.perf_counter() - t0)
        self.batcher.add_row(StoredRow(row.x, row.labels, row.event_time_ms, row.key, msg.topic, partition,
                                       offset), decoded.schema_id)
        self.stats.records += 1
        self.stats.rows += 1
        self._unreported_rows += 1

    def report_metrics(self) -> None:
        """Add the rows counted since the last call to the records counter (once per poll, not per record)."""
        if self._unreported_rows:
            self._records_ok.inc(self._unreported_rows)
            self._unreported_rows = 0

    def _dead_letter(self, msg: Any, raw: bytes, stage: str, exc: Exception) -> None:
        fut = self.publisher.dead_letter(
            self.kind, raw, stage=stage, error=exc,
            source={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}, key=msg.key)
        self._dl_futures.append((fut, msg, raw, stage, exc))
        self.batcher.add_dead_letter(msg.topic, msg.partition, msg.offset)
        name = type(exc).__name__
        self.stats.records += 1
        self.stats.dead_letters += 1
        self.stats.dead_letter_reasons[name] = self.stats.dead_letter_reasons.get(name, 0) + 1
        self._records_dl.inc()
        metrics.DEAD_LETTERS.labels(self.kind, metrics.reason_label(name)).inc()

    # ---- closing -----------------------------------------------------------------------------
    def close(self, partition: int) -> ClosedBatch | None:
        state = self.states.get(partition)
        text = self.featurizer.state_to_json(state) if state is not None else None
        return self.batcher.close(self.topic, partition, text)

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

    def persist(self, closed: ClosedBatch) -> bool:
        """Write one closed batch (dead letters first); True when written, False when it existed."""
        if closed.spec.dead_letter_offsets:
            try:
                self.flush_dead_letters()
            except PublishError as exc:
                raise BackpressureError(str(exc)) from exc
        _, written = self.store.write_batch(closed.spec, closed.rows, namespace=self.namespace)
        if written:
            self.stats.batches += 1
            metrics.BATCHES.labels(self.kind).inc()
            metrics.BATCH_SIZE.labels(self.kind).observe(closed.spec.last_offset - closed.spec.first_offset + 1)
            metrics.BATCH_AGE.labels(self.kind).observe(max(0.0, time.monotonic() - closed.opened_at))
        else:
            self.stats.batches_skipped += 1
        return written


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


class StreamWorker:
    """A live stream worker of one kind in a consumer group. :meth:`run` until ``stop`` is set."""

    def __init__(self, settings: Settings, kind: str, *, group: str | None = None, namespace: str = "live",
                 registry: SchemaRegistry | None = None, publisher: Any = None,
                 instance_id: str | None = None, **consumer_overrides: Any) -> None:
        from streaming.consumer import Subscriber
        from streaming.producer import Publisher

        self.settings = settings
        self.kind = kind
        self.group = group or default_group(settings, kind)
        registry = registry or open_registry(settings.registry_url, settings.registry_dir)
        self._own_publisher = publisher is None
        self.publisher = publisher or Publisher(settings, registry)
        self.pipeline = Pipeline(settings, kind, namespace=namespace, registry=registry,
                                 publisher=self.publisher, max_seconds=settings.batch_max_seconds)
        self.topic = self.pipeline.topic
        removed = self.pipeline.store.remove_stale_temp_files(kind, namespace)
        if removed:
            log.info("removed %d temp files of crashed writers", removed)
        if instance_id:
            consumer_overrides["group_instance_id"] = instance_id
        self.sub = Subscriber(settings, self.topic, group=self.group, start="committed", decode=False,
                              registry=registry, **consumer_overrides)
        # Re-subscribe with our listener so every (re)assignment resumes from the store.
        self._events: queue.SimpleQueue[tuple[str, list[TopicPartition]]] = queue.SimpleQueue()
        self.sub.consumer.subscribe([self.topic], listener=_Rebalance(self._events))
        self.floor: dict[TopicPartition, int] = {}  # next offset to process, per partition
        self.held: list[ClosedBatch] = []  # closed but not yet durable (backpressure)
        self.paused_for_backpressure = False
        self.registry_backoff: dict[TopicPartition, float] = {}  # tp -> resume at (monotonic)
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self._lag_at = 0.0
        self._registry_streak = 0
        self._pending_commits: dict[TopicPartition, int] = {}
        self.max_records = settings.batch_max_records
        self._commit_retry_at = 0.0
        self.stats = self.pipeline.stats
        self._bp_gauge = metrics.BACKPRESSURE.labels(kind)

    # ---- rebalance ---------------------------------------------------------------------------
    def _apply_rebalance_events(self) -> None:
        while True:
            try:
                what, tps = self._events.get_nowait()
            except queue.Empty:
                return
            if what == "revoked":
                self._on_revoked(tps)
            else:
                self._on_assigned(tps)

    def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Forget revoked partitions' open and held batches: the partition may already belong to
        another worker, which resumes from the store; persisting late could overlap its batches."""
        for tp in revoked:
            dropped = self.pipeline.batcher.pending(tp.topic, tp.partition)
            if dropped:
                log.info("%s[%d] revoked: %d unpersisted records will be re-read by the next owner",
                         tp.topic, tp.partition, dropped)
            self.held = [c for c in self.held if c.spec.partition != tp.partition]
            self.pipeline.forget(tp.partition)
            self.registry_backoff.pop(tp, None)
            self.floor.pop(tp, None)
            self._pending_commits.pop(tp, None)

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        """Resume each partition after the highest offset its store batches hold (the store is the
        truth; a commit lost in a crash after the rename must not produce an overlapping batch) and
        restore the featurizer state checkpointed with that batch."""
        consumer = self.sub.consumer
        for tp in assigned:
            from_store = self.pipeline.restore(tp.partition)
            if from_store is None:
                continue
            self.floor[tp] = from_store
            committed = consumer.committed(tp)
            if committed is None or from_store > committed:
                log.info("%s[%d]: store holds up to offset %d (committed %s); resuming there",
                         tp.topic, tp.partition, from_store - 1, committed)
                consumer.seek(tp, from_store)
        if self.paused_for_backpressure and assigned:
            consumer.pause(*assigned)

    # ---- main loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until ``stop`` is set (or nothing arrived for ``idle_exit_s``); then persist the
        open batches and commit, so a clean stop loses no work."""
        stop = stop or threading.Event()
        last_data = time.monotonic()
        try:
            while not stop.is_set():
                if self.paused_for_backpressure and time.monotonic() >= self._retry_at:
                    self._retry_held()
                self._resume_registry_waits()
                wait = self.pipeline.batcher.seconds_until_due()
                timeout_ms = int(min(200.0, (wait if wait is not None else 1.0) * 1000)) if not self.held else 100
                polled = self.sub.consumer.poll(timeout_ms=max(timeout_ms, 1), max_records=2000)
                if polled:
                    last_data = time.monotonic()
                self._apply_rebalance_events()
                owned = self.sub.consumer.assignment()
                for tp, msgs in polled.items():
                    if tp in owned:
                        self._process_partition(tp, msgs)
                self.pipeline.report_metrics()
                if not self.held:
                    for _topic, partition in self.pipeline.batcher.due():
                        closed = self.pipeline.close(partition)
                        if closed is not None:
                            self._persist_and_commit(closed)
                if self._pending_commits and time.monotonic() >= self._commit_retry_at:
                    self._commit()
                self._update_lag()
                if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s \
                        and not self.held and not list(self.pipeline.batcher.open_partitions()):
                    break
            self._drain()
        finally:
            self.close()
        return self.stats

    def _process_partition(self, tp: TopicPartition, msgs: list[Any]) -> None:
        # Records below the floor were already handled: fetched before a seek to the store's end,
        # or re-fetched after a seek. Skipping them keeps every offset in exactly one batch.
        floor = self.floor.get(tp)
        if floor is not None and msgs and msgs[0].offset < floor:
            msgs = [m for m in msgs if m.offset >= floor]
        for msg in msgs:
            try:
                self.pipeline.process(msg)
                self.floor[tp] = msg.offset + 1
                if not self.held and self.pipeline.batcher.pending(tp.topic, tp.partition) >= self.max_records:
                    closed = self.pipeline.close(tp.partition)  # exact count boundaries
                    if closed is not None:
                        self._persist_and_commit(closed)
            except RegistryUnavailableError as exc:
                self.stats.registry_retries += 1
                self._registry_streak += 1
                delay = min(MAX_BACKOFF_S, 0.25 * 2 ** min(self._registry_streak, 7))
                log.warning("%s[%d]@%d: schema registry unavailable (%s); retrying in %.1f s",
                            tp.topic, tp.partition, msg.offset, exc, delay)
                self.sub.consumer.seek(tp, msg.offset)  # never advance past this record
                self.sub.consumer.pause(tp)
                self.registry_backoff[tp] = time.monotonic() + delay
                return
        self._registry_streak = 0

    def _resume_registry_waits(self) -> None:
        now = time.monotonic()
        for tp, at in list(self.registry_backoff.items()):
            if now >= at:
                del self.registry_backoff[tp]
                if not self.paused_for_backpressure:
                    self.sub.consumer.resume(tp)

    def _persist_and_commit(self, closed: ClosedBatch, commit: bool = True) -> None:
        tp = TopicPartition(closed.spec.topic, closed.spec.partition)
        try:
            self.pipeline.persist(closed)
        except BackpressureError as exc:
            self._enter_backpressure(closed, exc)
            return
        except BatchOverlapError as exc:  # someone else persisted it (zombie owner): resync
            log.warning("%s; resynchronising %s[%d] from the store", exc, tp.topic, tp.partition)
            nxt = self.pipeline.restore(tp.partition)
            if nxt is not None:
                self.floor[tp] = nxt
                self.sub.consumer.seek(tp, nxt)
            return
        if commit:
            self._commit({tp: closed.next_offset})

    def _commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Commit (with earlier failed commits); a failure is retried on a later loop, so the group's
        offsets catch up with the store even when no further batch comes."""
        self._pending_commits.update(offsets or {})
        if not self._pending_commits:
            return
        pending = dict(self._pending_commits)
        try:
            self.sub.commit(pending)
        except Exception as exc:  # rebalancing: the store is the truth, the next owner seeks past it
            self._commit_retry_at = time.monotonic() + 1.0
            log.warning("commit of %s failed (%s); the store still records the progress; will retry",
                        pending, exc)
            return
        for tp, off in pending.items():
            if self._pending_commits.get(tp) == off:
                del self._pending_commits[tp]

    def _enter_backpressure(self, closed: ClosedBatch, exc: Exception) -> None:
        self.held.append(closed)
        if not self.paused_for_backpressure:
            self.paused_for_backpressure = True
            self.stats.backpressure_events += 1
            self._bp_gauge.set(1)
            self.sub.consumer.pause(*self.sub.consumer.assignment())
        self._backoff_s = min(MAX_BACKOFF_S, max(0.2, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s
        log.warning("backpressure: %s; partitions paused, retrying in %.1f s", exc, self._backoff_s)

    def _retry_held(self) -> None:
        held, self.held = self.held, []
        done: dict[TopicPartition, int] = {}
        for i, closed in enumerate(held):
            try:
                self.pipeline.persist(closed)
            except BackpressureError as exc:
                self.held = held[i:]
                self._backoff_s = min(MAX_BACKOFF_S, max(0.2, self._backoff_s * 2))
                self._retry_at = time.monotonic() + self._backoff_s
                log.warning("backpressure persists: %s; retrying in %.1f s", exc, self._backoff_s)
                break
            done[TopicPartition(closed.spec.topic, closed.spec.partition)] = closed.next_offset
        if done:
            self._commit(done)
        if not self.held:
            log.info("backpressure over: store writable again; resuming partitions")
            self.paused_for_backpressure = False
            self._backoff_s = 0.0
            self._bp_gauge.set(0)
            resumable = [tp for tp in self.sub.consumer.assignment() if tp not in self.registry_backoff]
            if resumable:
                self.sub.consumer.resume(*resumable)

    def _update_lag(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._lag_at and not force:
            return
        self._lag_at = now + 1.0
        consumer = self.sub.consumer
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                metrics.LAG.labels(self.kind, metrics.partition_label(tp.partition)).set(
                    max(0, high - consumer.position(tp)))

    def _drain(self) -> None:
        """On a clean stop: close every open batch and persist + commit what the store takes."""
        if self.held:
            self._retry_held()
        if self.held:
            return
        for _, partition in list(self.pipeline.batcher.open_partitions()):
            closed = self.pipeline.close(partition)
            if closed is not None:
                self._persist_and_commit(closed)
        if self._pending_commits:
            self._commit()
        self._update_lag(force=True)

    def close(self) -> None:
        try:
            self.sub.close()
        finally:
            if self._own_publisher:
                self.publisher.close()


def run_worker(settings: Settings, kind: str, *, group: str | None = None, namespace: str = "live",
               instance_id: str | None = None, idle_exit_s: float | None = None,
               on_start: Callable[[StreamWorker], None] | None = None) -> WorkerStats:
    """Run one worker in this process until SIGTERM/SIGINT; serves /metrics per settings."""
    port = metrics.start_metrics_server(settings.metrics_port)
    if port > 0:
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    worker = StreamWorker(settings, kind, group=group, namespace=namespace, instance_id=instance_id)
    if on_start:
        on_start(worker)
    stats = worker.run(stop, idle_exit_s=idle_exit_s)
    log.info("stream worker %s stopped: %s", kind, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    """``python -m streaming.worker <kind>``: the same as ``streamlearn stream <kind>``."""
    from streaming import config

    parser = argparse.ArgumentParser(prog="python -m streaming.worker")
    parser.add_argument("kind")
    parser.add_argument("--group", help="full consumer group name (default <prefix>stream.<kind>)")
    parser.add_argument("--instance-id")
    parser.add_argument("--idle-exit", type=float)
    args = parser.parse_args(argv)
    settings = config.load()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    run_worker(settings, args.kind, group=args.group, instance_id=args.instance_id, idle_exit_s=args.idle_exit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
