"""The one runner of every file and generator source: publish -> ack -> checkpoint -> read-back ->
backpressure -> dead letters (the source contract is in ingest/source.py).

Why one place: exactly-once from a file needs every one of these steps in the right order, and three
sources doing it three ways had three sets of gaps (sensor CSV had no checkpoint at all). Here:

* **Publish / dead letters.** An item with a record is published to the kind's raw topic with its
  ``sl.event_id`` header; an item with an error, or one whose record the publisher refuses (schema,
  size: :meth:`SourcePartition.refused`), goes to the dead-letter topic with its reason and the id as
  key. No single item stops the run.
* **Confirmed, then checkpoint.** A batch's snapshot becomes durable (``ingest.checkpoint.write_json``:
  temp + fsync + rename) only once its items and every earlier item are acked *and confirmed kept* by
  the Publisher's ack ledger, after the source's :meth:`~ingest.source.SourcePartition.commit` of that
  batch. Why confirmed, not acked: the embedded broker loses the acks of its last ~2.6 s on a
  ``kill -9``, and the ledger re-sends them only while this process lives; a checkpoint that followed
  the acks lost 2,659 of 30,000 lines when the source and the broker were killed together. The cost:
  on the embedded broker the checkpoint trails the acks by the ledger's window (~5 s); on Apache
  Kafka (ledger off) it does not. Checkpoints are written at most every ``checkpoint_every_s`` while
  busy, at once when idle and at the end.
* **Read-back after a crash.** Beside the snapshot the checkpoint holds *floors*: per partition of the
  raw and dead-letter topics, an offset below which no record sent after the snapshot can be (the end
  offsets at quiet moments, raised by the acked offsets of committed items - a partition keeps send
  order). The floors of a new source are written before its first send. On start the runner reads the
  topics from the floors, collects the ids (``ingest.checkpoint.published_ids``) and does not send an
  item whose id is there: acked before the kill but not checkpointed.
* **Backpressure.** At most ``max_in_flight`` items wait for acks; the runner then waits for the
  oldest tenth.
* **Broker crash.** The Publisher's ack ledger (``streaming/ackguard.py``) re-sends what a broker
  ``kill -9`` lost; :meth:`settle` waits for it before the last checkpoint. A source crash *and* a
  broker crash within the same few seconds lose nothing (the checkpoint is behind every unconfirmed
  item) but can duplicate an item whose record another producer's lost write let land below a floor.

Without a ``checkpoint_path`` (the generators) there is no resume: no floors, no read-back, no
checkpoint - the rest is the same.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest import checkpoint as cp
from ingest.source import DEAD_LETTERED, PUBLISHED, SourceItem, SourcePartition
from schemas.exceptions import SchemaError
from streaming.clock import now_ms
from streaming.exceptions import PublishError, RecordTooLargeError
from streaming.limits import InputLimitError

if TYPE_CHECKING:
    import threading

    from streaming.config import Settings
    from streaming.producer import Publisher

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 150.0  # above the producer's delivery timeout (120 s): its own error comes first
#: Keys of a checkpoint document that belong to the runner, not to the source's snapshot.
_RUNNER_KEYS = ("floors", "written_at_ms")


@dataclass
class RunStats:
    """What a run did (counters across the whole run)."""

    items: int = 0
    published: int = 0
    dead_lettered: int = 0
    skipped_duplicates: int = 0  # found on the topics after a crash: acked before, not sent again
    blank: int = 0  # items with nothing to send
    peak_in_flight: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # dead letters per reason


class _Batch:
    __slots__ = ("items", "snapshot", "left", "floors", "mark")

    def __init__(self, items: list[SourceItem], snapshot: dict[str, Any] | None) -> None:
        self.items, self.snapshot, self.left = items, snapshot, len(items)
        self.floors: dict[str, dict[str, int]] = {}
        self.mark = 0  # the ack ledger's mark when the batch was acked whole


class SourceRunner:
    """Run one source to its end (or ``stop``) exactly once; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        build: Callable[[dict[str, Any] | None], SourcePartition],
        *,
        kind: str,
        checkpoint_path: Path | None,
        max_in_flight: int = 50_000,
        checkpoint_every_s: float = 0.5,
        floor_refresh_s: float = 5.0,
    ) -> None:
        self.settings, self.publisher, self.kind = settings, publisher, kind
        self.cp_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.max_in_flight = max_in_flight
        self.checkpoint_every_s = checkpoint_every_s
        self.floor_refresh_s = floor_refresh_s
        self.topics = cp.source_topics(settings, kind)
        self.stats = RunStats()
        self._pending: collections.deque[tuple[Any, SourceItem, _Batch]] = collections.deque()
        #: Batches acked whole, waiting for the ack ledger to confirm them (in order).
        self._acked: collections.deque[_Batch] = collections.deque()
        self._ledger = publisher.ledger
        self._lost_for_good = self._ledger.stats.lost_for_good
        self._skip: dict[str, str] = {}
        self._floors: dict[str, dict[str, int]] = {}
        self._acked_floor: dict[str, dict[str, int]] = {}
        self._last_cp = 0.0
        self._dirty = False
        self._sent_since_floor = False
        #: The last durable snapshot (what a restart resumes from); None without a checkpoint.
        self.state: dict[str, Any] | None = None
        self._lock_fd = self._lock()
        try:
            resume = self._load()
            self.source = build(resume)
        except BaseException:
            self.release()
            raise
        #: Whether the source does something in commit() (the drop folder journals and moves files).
        self._commits = type(self.source).commit is not SourcePartition.commit
        if self.cp_path is not None:
            # Floors of a new source, and a source's start-up decisions (e.g. a new generation
            # after a truncation while down), are durable before the first send.
            self.state = self.source.snapshot()
            self._write()

    # -- checkpoint ---------------------------------------------------------------------------
    def _lock(self) -> int | None:
        """Hold ``<checkpoint>.lock`` (an flock, freed by the kernel when the process dies, kill -9 too) for
        this runner's life. Why: two runs of one input (the same command started twice, a cron job over a
        slow one) both resumed from one checkpoint and both published: every event twice. The second is
        refused at once instead, naming the first."""
        if self.cp_path is None:
            return None
        from ingest.exceptions import SourceError
        from streaming.members import lock_as_pid

        fd, holder = lock_as_pid(self.cp_path.with_name(self.cp_path.name + ".lock"))
        if fd is None:
            raise SourceError(f"another run ({holder}) is publishing this input now (checkpoint {self.cp_path}); "
                              "wait for it to finish or stop it, then run the same command again")
        return fd

    def release(self) -> None:
        """Let another run of this input start (run() does it when it returns; idempotent)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _load(self) -> dict[str, Any] | None:
        if self.cp_path is None:
            return None
        saved = cp.read_json(self.cp_path)
        if saved is None:
            self._floors = cp.end_offsets(self.settings, self.topics)
            return None
        self._floors = saved.get("floors") or {}
        self._skip = cp.published_ids(self.settings, self.topics, self._floors)
        if self._skip:
            log.info("%s: %d ids published after the checkpoint will not be sent again", self.cp_path,
                     len(self._skip))
        return {k: v for k, v in saved.items() if k not in _RUNNER_KEYS}

    def _write(self) -> None:
        """Write the durable snapshot and the floors (one atomic document; the snapshot's keys at
        the top level, so checkpoints of earlier versions resume as they are)."""
        assert self.cp_path is not None
        doc = {**(self.state or {}), "floors": self._floors, "written_at_ms": now_ms()}
        cp.write_json(self.cp_path, doc)
        self._last_cp = time.monotonic()
        self._dirty = False

    def _maybe_checkpoint(self, force: bool = False) -> None:
        self._confirm()
        if self.cp_path is None or not (self._dirty or force):
            return
        if not force and time.monotonic() - self._last_cp < self.checkpoint_every_s:
            return
        for topic, parts in self._acked_floor.items():
            floors = self._floors.setdefault(topic, {})
            for p, off in parts.items():
                floors[p] = max(floors.get(p, 0), off)
        self._acked_floor = {}
        self._write()

    def _confirm(self) -> None:
        """Commit the acked batches the ledger has confirmed kept, in order; the newest one's snapshot
        becomes the next checkpoint."""
        if not self._acked:
            return
        if self._ledger.stats.lost_for_good != self._lost_for_good:
            raise PublishError(
                f"{self.source.name}: the broker lost acknowledged records and sending them again failed; "
                "restart with the same command to resume from the last confirmed item")
        confirmed = self._ledger.confirmed_mark()
        acked = self._acked
        while acked and acked[0].mark <= confirmed:
            batch = acked.popleft()
            self.source.commit(batch.items)
            for topic, parts in batch.floors.items():
                floors = self._acked_floor.setdefault(topic, {})
                for p, off in parts.items():
                    floors[p] = max(floors.get(p, 0), off)
            self.state = batch.snapshot
            self._dirty = True

    def _refresh_floors(self) -> None:
        """At a quiet moment (nothing in flight) raise the floors to the topics' end offsets."""
        self._maybe_checkpoint(force=True)
        self._floors = cp.end_offsets(self.settings, self.topics)
        self._sent_since_floor = False
        self._skip.clear()  # every item that could be a duplicate is behind the checkpoint now
        self._write()

    # -- sending ------------------------------------------------------------------------------
    def _send(self, items: list[SourceItem], snapshot: dict[str, Any] | None) -> None:
        batch = _Batch(items, snapshot)
        pending, stats = self._pending, self.stats
        for item in items:
            pending.append((self._send_item(item), item, batch))
            if len(pending) >= self.max_in_flight:  # backpressure: wait for the oldest tenth
                self._reap(block=True, down_to=self.max_in_flight * 9 // 10)
            if len(pending) > stats.peak_in_flight:
                stats.peak_in_flight = len(pending)

    def _send_item(self, item: SourceItem) -> Any:
        stats = self.stats
        stats.items += 1
        if item.record is None and item.error is None:
            stats.blank += 1
            return None
        tag = self._skip.get(item.event_id) if self._skip else None
        if tag is not None:
            item.outcome, item.skipped = tag, True
            stats.skipped_duplicates += 1
            return None
        self._sent_since_floor = True
        if item.record is not None:
            try:
                fut = self.publisher.publish(self.kind, item.record, key=item.key,
                                             headers=[(cp.EVENT_ID_HEADER, item.event_id.encode()), *item.headers])
                item.outcome = PUBLISHED
                stats.published += 1
                item.record, item.raw = None, b""  # in flight: keep only what the ack needs
                return fut
            except (SchemaError, RecordTooLargeError, InputLimitError) as exc:  # InputLimitError: a key too long
                self.source.refused(item, exc)
        assert item.error is not None
        fut = self.publisher.dead_letter(self.kind, item.raw, stage=item.stage, error=item.error,
                                         source=item.source, key=item.event_id)
        item.outcome = DEAD_LETTERED
        item.raw = b""
        stats.dead_lettered += 1
        reason = item.source.get("reason", "")
        stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
        return fut

    def _reap(self, block: bool = False, down_to: int = 0) -> None:
        """Retire the acked prefix of the items in flight; a batch retired whole is committed.

        With ``block``, wait for acks until at most ``down_to`` items are in flight.
        """
        pending = self._pending
        while pending:
            fut, item, batch = pending[0]
            if fut is not None:
                if not fut.is_done:
                    if not block or len(pending) <= down_to:
                        break
                    try:
                        fut.get(timeout=ACK_TIMEOUT_S)
                    except Exception:  # its failure is reported just below, with the item's place
                        if not fut.is_done:
                            raise
                if fut.failed():
                    where = ", ".join(f"{k} {v}" for k, v in item.source.items() if k in ("file", "line"))
                    raise PublishError(
                        f"{self.source.name}: Kafka did not acknowledge {where or item.event_id}: {fut.exception}; "
                        "restart with the same command to resume from the last acknowledged item"
                    )
                md = fut.value
                parts = batch.floors.setdefault(md.topic, {})
                parts[str(md.partition)] = max(parts.get(str(md.partition), 0), md.offset + 1)
            pending.popleft()
            batch.left -= 1
            if batch.left == 0:
                self._retire(batch)

    def _retire(self, batch: _Batch) -> None:
        """A batch is acked whole: it waits for the ledger's confirmation (:meth:`_confirm`)."""
        batch.mark = self._ledger.acked_mark()
        if not self._commits:
            batch.items = []  # nothing to hand to commit(): keep the snapshot only
        self._acked.append(batch)

    def settle(self) -> None:
        """Wait for every item in flight and for the ledger's confirmation, then commit and checkpoint
        everything handed out. A broker that stays down keeps the checkpoint at the last confirmed
        item (logged by the Publisher); the same command resumes from there. When the Publisher's
        ``give_up`` is set meanwhile (a second Ctrl-C), only what is confirmed is checkpointed
        (:attr:`Publisher.abandoned` says how many records were left in flight)."""
        if not self.publisher.flush():
            self._reap()
            self._maybe_checkpoint(force=True)
            return
        self._reap(block=True)
        if self._acked:
            self.publisher.settle()
        self._maybe_checkpoint(force=True)

    # -- main loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None) -> RunStats:
        """Run until the source is done, ``stop`` is set, or ``idle_exit_s`` passed without items."""
        source = self.source
        idle_since = last_floor = time.monotonic()
        try:
            while stop is None or not stop.is_set():
                try:
                    items = source.next_batch()
                except StopIteration:
                    break
                if items:
                    self._send(items, source.snapshot() if self.cp_path is not None else None)
                    idle_since = time.monotonic()
                    self._reap()
                    self._maybe_checkpoint()
                    continue
                self._reap()
                self._maybe_checkpoint(force=self._dirty)
                now = time.monotonic()
                if (self.cp_path is not None and not self._pending and not self._acked and self._sent_since_floor
                        and now - last_floor > self.floor_refresh_s):
                    self._refresh_floors()
                    last_floor = now
                if idle_exit_s is not None and now - idle_since > idle_exit_s:
                    break
                if stop is not None:
                    stop.wait(source.poll_s)
                else:
                    time.sleep(source.poll_s)  # poll interval of a file or folder source, not a test wait
            self.settle()
        finally:
            source.close()
            self.release()
        return self.stats
