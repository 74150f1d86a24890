"""Stream workers: raw topic -> decode -> featurize -> micro-batches in the feature store.

Run ``streamlearn stream <kind>`` (its command line lives in ``streamlearn/commands/stream.py``) in
as many processes as the raw topic has partitions; they share the partitions through a consumer group.

Exactly-once into the store, without Kafka transactions:

* a batch is one partition's offset range; it is written atomically (see :mod:`streaming.store`)
  and only then are the offsets committed, so a crash never commits unpersisted data. That rule
  lives in one place, the feature sink (:mod:`streaming.sink`), which reports what is durable to
  this worker's :class:`~streaming.sink.OffsetCommitter`;
* on (re)assignment the worker resumes after the highest offset the *store* holds for the
  partition (the store is the source of truth; the Kafka commit is an optimization), so a crash
  between the rename and the commit never produces an overlapping batch;
* the featurizer state (sliding windows) after a batch's last record is checkpointed in that
  batch's manifest and restored with it, so windows continue exactly across restarts.

Undecodable records and records failing feature validation go to the kind's dead-letter topic
(original bytes, reason headers) and their offsets are listed in the batch manifest; the
dead-letter producer is flushed before the batch is written. A registry outage is retried with
backoff and never dead-lettered. When the store cannot be written (disk full, permissions) the
sink raises SinkBackpressureError: the worker pauses its partitions, lets the sink retry its held
batches with backoff and resumes by itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from kafka import TopicPartition
from kafka.errors import FencedInstanceIdError, KafkaTimeoutError

from schemas.registry import SchemaRegistry, open_registry
from streaming import members, metrics, tenancy
from streaming.batcher import Pipeline, WorkerStats
from streaming.config import Settings
from streaming.deadletters import DeadLetterIndex
from streaming.exceptions import GroupStuckError, SinkBackpressureError
from streaming.kafka_security import kafka_security
from streaming.onerror import OnError
from streaming.onerror import dead_letter as onerror_dead_letter
from streaming.rejoin import Rejoiner, held
from streaming.sink import OffsetCommitter
from streaming.topics import dead_letter_topic, raw_topic
from streaming.watchdog import Watchdog, from_settings, untimed
from streaming.worker_positions import PartitionPositions

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
#: Bounds of an offset commit: in the loop, and in the drain of a stop. Why: kafka-python's own bound is
#: 30 s when the broker is away, so a SIGTERM with the broker down took 63 s (the loop's commit, then the
#: drain's), past the 20 s ``streamlearn up`` allows. The store is the truth either way: a commit that does
#: not make it is made by the next run, which resumes after the store's last batch.
COMMIT_TIMEOUT_MS = 10_000
STOP_COMMIT_TIMEOUT_MS = 3_000
#: Bound of the committed-offset check behind a refused ``--idle-exit``: a group stuck in a rebalance (the
#: case it reports) left the coordinator's answer for kafka-python's 30 s request timeout.
IDLE_EXIT_COMMITTED_TIMEOUT_MS = 3_000
# Idle back-off cap of this worker's polls. A record's effect here is a batch, written at the earliest
# batch_max_seconds (5 s by default) after its first record, so 0.25 s more after an idle spell is not
# visible, and it quarters the idle polls (docs/IDLE.md). Records reset the back-off to 1 ms.
STREAM_IDLE_MAX_S = 0.25


def default_group(settings: Settings, kind: str) -> str:
    """The consumer group of the live stream workers of ``kind``."""
    return settings.group(f"stream.{kind}")


class StreamWorker(PartitionPositions):
    """A live stream worker of one kind in a consumer group. :meth:`run` until ``stop`` is set.

    Where each partition resumes (rebalances, the store's end, broker restarts) is
    :class:`~streaming.worker_positions.PartitionPositions`; the loop, flushes and backpressure are here.
    """

    def __init__(self, settings: Settings, kind: str, *, group: str | None = None, namespace: str = "live",
                 registry: SchemaRegistry | None = None, publisher: Any = None,
                 instance_id: str | None = None, on_error: OnError = onerror_dead_letter,
                 **consumer_overrides: Any) -> None:
        from streaming.consumer import Subscriber
        from streaming.producer import Publisher

        self.settings = settings
        self.kind = kind
        self.group = group or default_group(settings, kind)
        tenancy.check_group(settings, self.group)  # --group is a full name: refused before any network call
        registry = registry or open_registry(settings.registry_url, settings.registry_dir)
        self._own_publisher = publisher is None
        self.publisher = publisher or Publisher(settings, registry)
        # commit-after-flush: the sink tells the committer what is durable, nothing else commits a batch.
        # Queued (``later``) and committed once per loop, after the poll's records (``committer.retry``):
        # one synchronous commit round trip per poll instead of one per batch (a 2,000-record poll closes
        # up to four per partition); still only offsets whose batch is durable, before the next poll.
        self._commit_timeout_ms = COMMIT_TIMEOUT_MS
        self.committer = OffsetCommitter(raw_topic(settings, kind),
                                         lambda offsets: self.sub.commit(offsets, timeout_ms=self._commit_timeout_ms))
        self.pipeline = Pipeline(settings, kind, namespace=namespace, registry=registry,
                                 publisher=self.publisher, max_seconds=settings.batch_max_seconds,
                                 on_error=on_error, on_durable=self.committer.later)
        self.topic = self.pipeline.topic
        self.sink = self.pipeline.sink
        self.pipeline.dl_index = DeadLetterIndex(settings.bootstrap, dead_letter_topic(settings, kind),
                                                 security=kafka_security(settings))
        removed = self.pipeline.store.remove_stale_temp_files(kind, namespace)
        if removed:
            log.info("removed %d temp files of crashed writers", removed)
        # Static membership by default (see streaming.members): a restart with the same command takes the
        # same slot, hence the same group.instance.id, and gets its partitions back at once.
        self.lease = members.claim(settings, self.group, f"stream-{kind}", instance=instance_id)
        log.info("joining group %s as static member %s", self.group, self.lease.instance_id)
        if self._own_publisher:
            self._journal_dead_letters()
        consumer_overrides.setdefault("group_instance_id", self.lease.instance_id)
        consumer_overrides.setdefault("client_id", members.client_id(f"stream-{kind}"))
        try:  # members of this host whose process is gone would hold their partitions forever
            members.remove_dead_local(settings, self.group, quick=True)
        except Exception as exc:
            log.info("could not check group %s for dead members: %s", self.group, exc)
        self.stuck = members.StuckWatch(settings, self.group, self.topic, self.lease, f"stream worker {kind} "
                                        f"({self.lease.instance_id})",
                                        consumer_overrides.get("session_timeout_ms", 10_000) / 1000)
        # A JoinGroup the coordinator never answers (noida-db drops some): leave and re-join, bounded.
        self.rejoin = Rejoiner(settings, self.group, self.lease, self.stuck.what, self.stuck.timeout_s)
        # Idle back-off (docs/IDLE.md): sleeps between empty polls, never pauses, and group joins that
        # finish between two polls are kept (streaming.kafka_compat), so rebalances complete.
        self.sub = Subscriber(settings, self.topic, group=self.group, start="committed", decode=False,
                              registry=registry, idle_backoff=True, idle_max_s=STREAM_IDLE_MAX_S,
                              **consumer_overrides)
        self._init_positions()  # re-subscribes with a listener: every (re)assignment resumes from the store
        self.paused_for_backpressure = False
        self.registry_backoff: dict[TopicPartition, float] = {}  # tp -> resume at (monotonic)
        self._retry_at = 0.0
        self._lag_at = 0.0
        self._registry_streak = 0
        self.max_records = settings.batch_max_records
        self.stats = self.pipeline.stats
        self._bp_gauge = metrics.BACKPRESSURE.labels(kind)

    # ---- main loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None,
            watchdog: Watchdog | None = None) -> WorkerStats:
        """Consume until ``stop`` is set (or nothing arrived for ``idle_exit_s``); then persist the
        open batches and commit, so a clean stop loses no work. ``watchdog`` is told each time the
        loop comes round (streaming/watchdog.py: a loop stalled past its limit ends the process)."""
        stop = stop or threading.Event()
        if self.sub.poller is not None:
            self.sub.poller.wake = stop  # a stop (SIGTERM) ends an idle back-off at once
        last_data = time.monotonic()
        if watchdog is not None:
            watchdog.start()
        try:
            while not stop.is_set():
                if watchdog is not None:
                    watchdog.beat()
                if self.paused_for_backpressure and time.monotonic() >= self._retry_at:
                    self._flush()  # the sink retries its held batches, oldest first
                self._resume_registry_waits()
                wait = self.pipeline.batcher.seconds_until_due()
                timeout_ms = int(min(200.0, (wait if wait is not None else 1.0) * 1000)) if not self.held else 100
                # IdlePoller sleeps between empty polls (no fetch spin on the embedded broker) and never
                # pauses partitions, so this worker's own pauses and rebalance repositioning stay its own.
                try:
                    polled = self.sub.poll_raw(timeout_ms=max(timeout_ms, 1), max_records=2000)
                except FencedInstanceIdError as exc:
                    if not self.rejoin.fenced(exc):  # our own self-removal answered the wedged join
                        raise
                    polled = {}
                if polled:
                    last_data = time.monotonic()
                # Repositioning after a (re)assignment or a broker restart asks the broker (end offsets,
                # the dead-letter topic) and waits while it is away: the watchdog does not time that.
                with untimed(watchdog, "the broker (repositioning)"):
                    repositioned = self._apply_rebalance_events()
                    repositioned |= self._watch_broker()
                owned = self.sub.consumer.assignment()
                holding = held(self.sub.consumer)  # nothing while a join is under way (streaming/rejoin.py)
                self.stuck.observe(holding)
                self.rejoin.check(self.sub.consumer, holding)
                for tp, msgs in polled.items():
                    if tp in owned and tp not in repositioned and tp not in self._reverify:
                        self._process_partition(tp, msgs)
                self.pipeline.report_metrics()
                if not self.held:
                    due = [p for _topic, p in self.pipeline.batcher.due()
                           if TopicPartition(self.topic, p) not in self._reverify]
                    if due:
                        self._flush(due)
                with untimed(watchdog, "the broker (offset commit)"):
                    self.committer.retry()
                self._update_lag()
                if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s \
                        and not self.held and not list(self.pipeline.batcher.open_partitions()):
                    if not owned:
                        self._refuse_idle_exit(idle_exit_s)
                    break
            self._drain()
        finally:
            if watchdog is not None:
                watchdog.stop()
            self.close()
        return self.stats

    def _refuse_idle_exit(self, idle_exit_s: float) -> None:
        """--idle-exit must not report success for a worker that was idle only because it got nothing."""
        from streaming.offsets import partitions_of

        consumer = self.sub.consumer
        tps = partitions_of(consumer, self.topic)
        ends = consumer.end_offsets(tps)
        lag, unconfirmed = 0, 0
        for tp in tps:
            if ends[tp] <= 0:
                continue
            if unconfirmed:  # the coordinator did not answer: the other partitions' commits cannot be read either
                unconfirmed += ends[tp]
                continue
            try:  # bounded: a coordinator in a stuck rebalance answered after 30 s (kafka-python's request timeout)
                lag += max(0, ends[tp] - (consumer.committed(tp, timeout_ms=IDLE_EXIT_COMMITTED_TIMEOUT_MS) or 0))
            except KafkaTimeoutError:
                unconfirmed += ends[tp]
        if lag > 0 or unconfirmed:
            why = self.stuck.warning or self.stuck.diagnose(idle_exit_s)
            what = f"{lag} unprocessed record(s)" if not unconfirmed else (
                f"{lag + unconfirmed} record(s) not known to be processed (the group coordinator did not answer "
                f"an offset fetch within {IDLE_EXIT_COMMITTED_TIMEOUT_MS / 1000:g} s: a rebalance is under way)")
            raise GroupStuckError(f"idle_exit: exiting after {idle_exit_s:g} s without records, but this worker "
                                  f"owned no partition while {self.topic} has {what}: {why}")

    def _process_partition(self, tp: TopicPartition, msgs: list[Any]) -> None:
        # Records below the floor were already handled: fetched before a seek to the store's end,
        # or re-fetched after a seek. Skipping them keeps every offset in exactly one batch.
        floor = self.floor.get(tp)
        if floor is not None and msgs and msgs[0].offset < floor:
            msgs = [m for m in msgs if m.offset >= floor]
        # One Pipeline.process_many call per run of records up to the next count boundary, so batches
        # close at exactly max_records, as one record at a time did (the floor moves with each run).
        i, n = 0, len(msgs)
        while i < n:
            if self.sink.pending(tp.partition) >= self.max_records and not self.held:
                self._flush([tp.partition])
            if self.held and self.sink.pending(tp.partition) >= self.max_records:
                # The store refuses batches (backpressure; the partitions are paused): leave the rest of
                # this poll to be fetched again once it takes them. Batching on took it all into one
                # open batch, far past batch_max_records (a whole 2,000-record poll of images).
                self.sub.consumer.seek(tp, msgs[i].offset)
                return
            room = max(1, self.max_records - self.sink.pending(tp.partition))
            run = msgs[i:i + room]
            done, outage = self.pipeline.process_many(run)
            if done:
                self.floor[tp] = run[done - 1].offset + 1
                i += done
            if outage is not None:
                msg = run[done]
                self.stats.registry_retries += 1
                self._registry_streak += 1
                delay = min(MAX_BACKOFF_S, 0.25 * 2 ** min(self._registry_streak, 7))
                log.warning("%s[%d]@%d: schema registry unavailable (%s); retrying in %.1f s",
                            tp.topic, tp.partition, msg.offset, outage, delay)
                self.sub.consumer.seek(tp, msg.offset)  # never advance past this record
                self.sub.consumer.pause(tp)
                self.registry_backoff[tp] = time.monotonic() + delay
                return
            if not self.held and self.sink.pending(tp.partition) >= self.max_records:
                self._flush([tp.partition])  # exact count boundaries
        self._registry_streak = 0

    def _resume_registry_waits(self) -> None:
        now = time.monotonic()
        for tp, at in list(self.registry_backoff.items()):
            if now >= at:
                del self.registry_backoff[tp]
                if not self.paused_for_backpressure:
                    self.sub.consumer.resume(tp)

    @property
    def held(self) -> list[Any]:
        """Closed batches the store refused so far (backpressure), oldest first; the sink keeps them."""
        return self.sink.held

    def _flush(self, partitions: list[int] | None = None) -> None:
        """Close ``partitions``' open batches and let the sink write every closed batch; the sink
        hands what became durable to the committer. A refusal pauses, an overlap resynchronises."""
        try:
            flushed = self.sink.flush(partitions or ())
        except SinkBackpressureError as exc:
            self._backpressure(exc)
            return
        for partition, overlap in flushed.overlaps.items():  # someone else persisted it (zombie owner)
            tp = TopicPartition(self.topic, partition)
            log.warning("%s; resynchronising %s[%d] from the store", overlap, tp.topic, tp.partition)
            nxt = self.pipeline.restore(partition)
            if nxt is not None:
                self.floor[tp] = nxt
                self.sub.consumer.seek(tp, nxt)
        if self.paused_for_backpressure and not self.held:
            log.info("backpressure over: store writable again; resuming partitions")
            self.paused_for_backpressure = False
            self._bp_gauge.set(0)
            resumable = [tp for tp in self.sub.consumer.assignment() if tp not in self.registry_backoff]
            if resumable:
                self.sub.consumer.resume(*resumable)

    def _backpressure(self, exc: SinkBackpressureError) -> None:
        """The store refused a batch: pause every partition until the sink's retry is due."""
        self._retry_at = time.monotonic() + exc.retry_after
        if self.paused_for_backpressure:
            log.warning("backpressure persists: %s; retrying in %.1f s", exc, exc.retry_after)
            return
        self.paused_for_backpressure = True
        self.stats.backpressure_events += 1
        self._bp_gauge.set(1)
        self.sub.consumer.pause(*self.sub.consumer.assignment())
        log.warning("backpressure: %s; partitions paused, retrying in %.1f s", exc, exc.retry_after)

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
            self._flush()
        if self.held:
            return
        self._flush([p for _, p in self.pipeline.batcher.open_partitions()])
        self._commit_timeout_ms = STOP_COMMIT_TIMEOUT_MS  # a stop with the broker away must not wait 30 s here
        self.committer.commit()
        self._update_lag(force=True)

    def _journal_dead_letters(self) -> None:
        """Journal this member's dead letters, and first re-send what a broker crash lost of the last
        run's (streaming/ackjournal.py). Why: a dead letter's record is "handled" once its batch is in
        the store, so a worker killed together with a broker that lost the dead letter would never
        write it again. One journal per member slot: the same command restarted takes the same slot."""
        from streaming.ackjournal import attach_and_recover

        name = hashlib.sha256(f"{self.group}/{self.lease.instance_id}".encode()).hexdigest()[:16]
        done = attach_and_recover(self.publisher, self.settings.state_dir / "stream" / "journal" / name,
                                  recreate={dead_letter_topic(self.settings, self.kind)})
        if done and done["resent"]:
            log.warning("%d dead letters of the last run were lost by the broker; sent them again", done["resent"])

    def close(self) -> None:
        if self._own_publisher:  # dead letters just sent: confirmed before exit (the journal covers a crash)
            self.publisher.settle(timeout=10.0)
        self._watch.close()
        if self.pipeline.dl_index is not None:
            self.pipeline.dl_index.close()
        if self._check_consumer is not None:
            self._check_consumer.close()
        try:
            self.sub.close()
        finally:
            self.lease.release()  # a clean stop leaves the group: no member of a gone process stays behind
            if self._own_publisher:
                self.publisher.close()


def run_worker(settings: Settings, kind: str, *, group: str | None = None, namespace: str = "live",
               instance_id: str | None = None, idle_exit_s: float | None = None,
               on_start: Callable[[StreamWorker], None] | None = None) -> WorkerStats:
    """Run one worker in this process until SIGTERM/SIGINT; serves /metrics per settings."""
    port = metrics.start_metrics_server(settings.metrics_port, settings.metrics_host)
    if port > 0:
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    from streaming.promote import hold_live

    # Live: finish a promotion a crash left half-done before joining, and keep new ones out while running.
    with hold_live(settings, kind) if namespace == "live" else contextlib.nullcontext():
        worker = StreamWorker(settings, kind, group=group, namespace=namespace, instance_id=instance_id)
        if on_start:
            on_start(worker)
        stats = worker.run(stop, idle_exit_s=idle_exit_s, watchdog=from_settings(settings.watchdog_s, f"stream {kind}"))
    log.info("stream worker %s stopped: %s", kind, stats)
    return stats
