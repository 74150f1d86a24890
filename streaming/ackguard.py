"""Acked is not kept: hold every acknowledged record until the broker has surely persisted it.

Why: the embedded broker (noida-db) persists by rewriting one JSON file about once a second; a
``kill -9`` of the broker loses the acks of the last ~1-3 s (measured: docs/RECOVERY.md, "Broker
crash") and the restarted broker then hands those offsets to *new* records. A source whose
checkpoint already moved past such an event would never send it again.

How (one place for every publisher: the tailer, image watcher, sensor CSV, generators, gateway
and the stream worker's dead letters all publish through :class:`streaming.producer.Publisher`):

* Each send returns a :class:`GuardedSend`. A send the producer fails with an error a broker
  restart causes (out-of-order sequence, unknown producer id, timeouts, lost connections) is sent
  again, a bounded number of times, before the caller ever sees a failure.
* Each acked record (topic, partition, offset, key, value, headers) enters the :class:`AckLedger`,
  tagged with the broker *epoch*: the generation of a plain TCP connection the ledger keeps open to
  every bootstrap broker. A broker process that dies closes that connection, whatever its restart
  looks like, so an epoch change is a reliable "the broker restarted" signal.
* A record acked in the current epoch is confirmed once ``window_s`` has passed (longer than the
  broker's persistence lag) with no epoch change. A record of an older epoch is *read back*: the
  ledger reads its partition from the smallest suspect offset and compares the record at each
  acked offset with what it sent (key, value and headers, byte for byte). Where it is missing or
  another record sits at that offset (offset reuse), the record is sent again, once; the resend
  is itself ledgered. Matches are confirmed.
* The ledger is bounded (``max_bytes``): a sender waits while it is full (backpressure).
* :meth:`AckLedger.settle` waits until every record is confirmed; long-running sources call it
  (through ``Publisher.settle``) before they exit, so a broker killed just after them loses nothing.
* Each acked record gets a sequence number in ack order. :meth:`AckLedger.acked_mark` and
  :meth:`AckLedger.confirmed_mark` let a source checkpoint only what is confirmed: every record acked
  before a mark was taken is confirmed once ``confirmed_mark()`` reaches it. Why: the ledger re-sends
  only while its process lives; a source that checkpointed on the ack and was killed with the broker
  would never send the lost records again (measured: 2,659 of 30,000 lines of ``publish --file``).

On Apache Kafka with replication an acked record is durable; ``broker_loss_window_s = 0`` turns
the ledger off (sends are still retried on restart errors).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kafka import errors as kerr
from kafka.future import Future

from streaming.ackreadback import ReadBack, record_digest
from streaming.cproduce import CProducer, kafka_python_error, record_metadata
from streaming.epochwatch import EpochWatch

if TYPE_CHECKING:
    from streaming.ackjournal import AckJournal

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

#: Send failures a broker restart produces; the record was not kept, so sending again is safe.
RESEND_ERRORS: tuple[type[BaseException], ...] = (
    kerr.RetriableError,  # timeouts, lost connections, not-leader, request timed out, ...
    kerr.OutOfOrderSequenceNumberError,
    kerr.UnknownProducerIdError,
    kerr.InvalidProducerEpochError,
    kerr.KafkaTimeoutError,
)
MAX_ATTEMPTS = 8
#: kafka-python's record futures register a callback and an errback under one lock (3.0.x).
_ONE_REGISTRATION = hasattr(Future, "_add_cb_eb")


#: Guards the lazy creation of a :class:`GuardedSend`'s latch against its resolution (one plain lock:
#: taken once per resolved send and once per ``get`` on an unresolved one; never held while waiting).
_LATCH_LOCK = threading.Lock()


class GuardedSend(Future):
    """A send that survives broker restarts; the same interface as kafka-python's record future
    (``get``, ``is_done``, ``failed``, ``value``, ``exception``, callbacks).

    Why slots and a lazy latch: one of these is made per published record, and a ``threading.Event``
    costs ~6 us to build (more than encoding a sensor reading), so the event is made only when a
    caller waits on a send that is not yet resolved. ``_settled`` turns true after the callbacks ran,
    as kafka-python's own record future does, so ``get`` never returns before them."""

    __slots__ = ("topic", "key", "record_value", "headers", "attempts", "last_error", "ledger", "_settled",
                 "_latch", "hold")

    def __init__(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None,
                 ledger: AckLedger | None = None) -> None:
        super().__init__()
        self.topic, self.key, self.record_value, self.headers = topic, key, value, headers
        self.attempts = 0
        self.last_error = ""
        self.ledger = ledger
        self._settled = False
        self._latch: threading.Event | None = None
        #: -1 for a first send; for a re-send of a lost record, the sequence number of its first ack
        #: (the confirmed mark stays below it until the re-send is confirmed)
        self.hold = -1

    def _on_ack(self, md: Any) -> None:  # bound-method callbacks: no functools.partial per record
        assert self.ledger is not None
        self.ledger._acked(self, md)

    def _on_error(self, exc: BaseException) -> None:
        assert self.ledger is not None
        self.ledger._failed(self, exc)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        """librdkafka's delivery report (streaming/cproduce.py), turned into kafka-python's metadata or error."""
        assert self.ledger is not None
        if err is None:
            self.ledger._acked(self, record_metadata(msg, len(self.key or b""), len(self.record_value)))
        else:
            self.ledger._failed(self, kafka_python_error(err))

    def _settle(self) -> None:
        with _LATCH_LOCK:
            self._settled = True
            latch = self._latch
        if latch is not None:
            latch.set()

    def success(self, value: Any) -> GuardedSend:
        super().success(value)
        self._settle()
        return self

    def failure(self, e: Any) -> GuardedSend:
        super().failure(e)
        self._settle()
        return self

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the ack (raises KafkaTimeoutError after ``timeout``, or the send's error)."""
        if not self._settled:
            with _LATCH_LOCK:
                if self._latch is None:
                    self._latch = threading.Event()
                    if self._settled:
                        self._latch.set()
                latch = self._latch
            if not latch.wait(timeout):
                raise kerr.KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
        if self.exception is not None:
            raise self.exception
        return self.value


@dataclass(slots=True)
class _Entry:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers | None
    acked_at: float
    epoch: int  # -1: acked while the broker's connection state was unknown (always read back)
    seq: int = 0  # ack order
    hold: int = 0  # seq of the first ack of this record (differs from seq for a re-send)
    size: int = field(default=0)

    def digest(self) -> str:
        return record_digest(self.key, self.value, self.headers)


@dataclass
class LedgerStats:
    """Counters, exported by the benchmark and the tests."""

    acked: int = 0
    confirmed: int = 0
    verified_by_read: int = 0
    resent_lost: int = 0
    resent_failed: int = 0
    epochs: int = 0
    lost_for_good: int = 0  # re-sends of lost records that failed for good (the runner stops on it)


class AckLedger:
    """The acked-but-unconfirmed records of one producer; re-sends what a broker restart lost."""

    def __init__(self, producer: Any, bootstrap: str, *, window_s: float, max_bytes: int = 64 << 20,
                 interval_s: float = 0.25, consumer_config: dict[str, Any] | None = None) -> None:
        self.producer = producer
        #: librdkafka (streaming/cproduce.py): each send hands it the GuardedSend's own delivery callback,
        #: with no future in between (~5 us a record less than going through ``send``)
        self._direct = isinstance(producer, CProducer)
        self.bootstrap = bootstrap
        self.window_s = window_s
        self.max_bytes = max_bytes
        self.interval_s = interval_s
        self.enabled = window_s > 0
        self.stats = LedgerStats()
        self._consumer_config = consumer_config or {}
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self._resend: deque[GuardedSend] = deque()
        self._unacked = 0
        self._next_seq = 0
        #: seq of the first ack of each lost record being re-sent -> how many (from the read-back that
        #: found it lost until its re-send is confirmed)
        self._holds: dict[int, int] = {}
        #: The condition's lock, taken directly on the per-record paths (send, ack): ``with self._cond``
        #: goes through Condition.__enter__, a Python-level call per record; this is the same lock.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._watch = EpochWatch(bootstrap)
        self._scan_epoch = 0  # no entry of another epoch can exist while this equals the epoch and ...
        self._scan_needed = False  # ... no suspect (-1) entry was added since the last scan
        self._reader = ReadBack(bootstrap, self._consumer_config)
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        #: Where sends are written before they go out (the gateway's, ``streaming/ackjournal.py``); None: nowhere.
        self.journal: AckJournal | None = None
        self.broker_down_since: float | None = None

    # ---- sending ---------------------------------------------------------------------------
    def send(self, topic: str, value: bytes, key: bytes | None, headers: Headers | None) -> GuardedSend:
        """Send one record through the producer; the returned future resolves with its ack."""
        if self._thread is None:
            self._start()
        if self.enabled and self._bytes >= self.max_bytes:  # unlocked peek; re-checked under the lock
            with self._cond:
                deadline = time.monotonic() + 300.0
                while self._bytes >= self.max_bytes and not self._closed.is_set():
                    if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise kerr.KafkaTimeoutError(
                            f"ack ledger full ({self._bytes} bytes unconfirmed for 300 s); is the broker up?")
        fut = GuardedSend(topic, key, value, headers, self)
        if self.journal is not None:
            self.journal.append(fut)
        with self._lock:
            self._unacked += 1
        self._attempt(fut, raise_errors=True)
        return fut

    def _attempt(self, fut: GuardedSend, raise_errors: bool = False) -> None:
        fut.attempts += 1
        try:
            if self._direct:
                self.producer.produce(fut.topic, fut.record_value, fut.key, fut.headers, fut._on_delivery)
                return
            inner = self.producer.send(fut.topic, value=fut.record_value, key=fut.key, headers=fut.headers)
        except RESEND_ERRORS as exc:
            self._failed(fut, exc)
            return
        except Exception as exc:  # refused for good (too large, closed producer): never counted as in flight
            self._given_up(fut, exc)
            if raise_errors:
                raise
            fut.failure(exc)
            return
        # One registration (one lock) instead of add_callback + add_errback: this runs per record.
        # ``_add_cb_eb`` is kafka-python's own fast path for exactly this pair (same semantics: on a
        # future that is already done it calls the one that applies at once); older versions lack it.
        if _ONE_REGISTRATION:
            inner._add_cb_eb(fut._on_ack, fut._on_error)
        else:
            inner.add_callback(fut._on_ack)
            inner.add_errback(fut._on_error)

    def _acked(self, fut: GuardedSend, md: Any) -> None:
        # Runs on the producer's I/O thread: record and resolve, never send from here.
        now = time.monotonic()
        with self._lock:  # the condition's lock (notify_all below needs it held)
            self._unacked -= 1
            if self.enabled:
                # an ack just after an epoch change may still come from the old broker process: suspect
                watch = self._watch
                epoch = watch.epoch if watch.connected and now >= watch.changed_at + 1.0 else -1
                seq = self._next_seq
                self._next_seq = seq + 1
                entry = _Entry(md.topic, md.partition, md.offset, fut.key, fut.record_value, fut.headers, now, epoch,
                               seq, seq if fut.hold < 0 else fut.hold)
                entry.size = len(fut.record_value) + len(fut.key or b"") + 64
                self._scan_needed = self._scan_needed or epoch != self._scan_epoch
                self._entries.append(entry)
                self._bytes += entry.size
                self.stats.acked += 1
            if not self._unacked:  # only wait_acked/settle wait for this (backpressure waits on _drop)
                self._cond.notify_all()
        if not fut.is_done:
            fut.success(md)

    def _failed(self, fut: GuardedSend, exc: BaseException) -> None:
        if isinstance(exc, RESEND_ERRORS) and fut.attempts < MAX_ATTEMPTS and not self._closed.is_set():
            fut.last_error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self.stats.resent_failed += 1
                self._resend.append(fut)
            return
        self._given_up(fut, exc)
        if not fut.is_done:
            fut.failure(exc)

    def _given_up(self, fut: GuardedSend, exc: BaseException) -> None:
        """A send failed for good: no longer in flight; a re-send of a lost record is counted lost (the
        sources stop on it), a first send is marked failed in the journal (recovery must not send it)."""
        with self._cond:
            self._unacked -= 1
            if fut.hold >= 0:
                self._release(fut.hold)
                self.stats.lost_for_good += 1
                log.error("a record the broker lost could not be sent again (%s: %s); a source restarted with "
                          "the same command sends it from its checkpoint", type(exc).__name__, exc)
            self._cond.notify_all()
        if self.journal is not None and fut.hold < 0:
            self.journal.failed(fut)

    # ---- what is confirmed -------------------------------------------------------------------
    def acked_mark(self) -> int:
        """A mark above every record acked so far: they are all confirmed once :meth:`confirmed_mark`
        reaches it."""
        with self._lock:
            return self._next_seq

    def confirmed_mark(self) -> int:
        """Every record acked before a mark at most this is confirmed kept (or, re-sent and lost
        again, given up: ``stats.lost_for_good``). Off (``window_s = 0``): every acked record."""
        with self._lock:
            mark = self._entries[0].seq if self._entries else self._next_seq
            return min(mark, min(self._holds)) if self._holds else mark

    def _release(self, hold: int) -> None:
        left = self._holds.get(hold, 0) - 1
        if left > 0:
            self._holds[hold] = left
        else:
            self._holds.pop(hold, None)

    # ---- the verifier thread ---------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            with self._cond:
                if self._thread is None:
                    self._watch.poll()
                    self._thread = threading.Thread(target=self._run, name="ack-ledger", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while not self._closed.wait(self.interval_s):
            try:
                self.tick()
            except Exception as exc:  # the verifier must survive anything; it retries next tick
                log.warning("ack ledger: verification failed (%s: %s); retrying", type(exc).__name__, exc)

    def tick(self) -> None:
        """One round: watch the broker, re-send failed sends, confirm or read back due records."""
        now = time.monotonic()
        if self._watch.poll():
            self.stats.epochs += 1
            log.warning("broker connection lost (epoch %d): acked records of the last %.1f s will be read back "
                        "and re-sent where the broker lost them", self._watch.epoch, self.window_s)
        self.broker_down_since = None if self._watch.connected else (self.broker_down_since or now)
        with self._cond:
            resend = list(self._resend)
            self._resend.clear()
        if resend:
            log.warning("%d sends failed (%s, ...), e.g. after a broker restart; sending them again", len(resend),
                        resend[0].last_error)
        for fut in resend:
            self._attempt(fut)
        if not self.enabled:
            return
        epoch, connected = self._watch.epoch, self._watch.connected
        with self._cond:
            confirm_before = now - self.window_s
            suspects: list[_Entry] = []
            if self._scan_needed or self._scan_epoch != epoch:  # a full scan only after a change
                suspects = [e for e in self._entries if e.epoch != epoch]
                self._scan_epoch, self._scan_needed = epoch, bool(suspects)
            while self._entries and self._entries[0].epoch == epoch and self._entries[0].acked_at <= confirm_before:
                self._drop(self._entries.popleft())
                self.stats.confirmed += 1
        if suspects and connected:
            self._read_back(suspects)
        if self.journal is not None:
            self.journal.collect(self)

    def _drop(self, entry: _Entry) -> None:
        self._bytes -= entry.size
        if entry.hold != entry.seq:
            self._release(entry.hold)
        self._cond.notify_all()

    def _read_back(self, suspects: list[_Entry]) -> None:
        """Compare each suspect with what its partition holds at its offset; re-send the lost ones."""
        wanted: dict[tuple[str, int], set[int]] = {}
        for e in suspects:
            wanted.setdefault((e.topic, e.partition), set()).add(e.offset)
        held = self._reader.held(wanted)
        lost: list[_Entry] = []
        now = time.monotonic()
        with self._cond:
            done = {id(e) for e in suspects}
            epoch = self._watch.epoch
            keep: deque[_Entry] = deque()
            for e in self._entries:
                if id(e) not in done:
                    keep.append(e)
                    continue
                if held.get((e.topic, e.partition), {}).get(e.offset) != e.digest():
                    self._bytes -= e.size
                    if e.hold == e.seq:  # a re-send lost again already holds its first ack's place
                        self._holds[e.hold] = self._holds.get(e.hold, 0) + 1
                    lost.append(e)
                elif e.acked_at <= now - self.window_s:
                    self._drop(e)
                    self.stats.verified_by_read += 1
                else:
                    # found, but young: a connection closed without a restart (idle close) or an ack
                    # of the new broker process; kept until the window has passed in this epoch
                    e.epoch = epoch
                    keep.append(e)
            self._entries = keep
            self.stats.resent_lost += len(lost)
            self._unacked += len(lost)
            self._cond.notify_all()
        if lost:
            log.warning("the broker lost %d acked records (it restarted); sending them again", len(lost))
        for e in lost:
            again = GuardedSend(e.topic, e.key, e.value, e.headers, self)
            again.hold = e.hold
            self._attempt(again)

    def broker_down_for(self) -> float:
        """Seconds the broker has been unreachable (0.0 while it is connected or before the first send)."""
        since = self.broker_down_since
        return 0.0 if since is None else time.monotonic() - since

    # ---- waiting and closing ---------------------------------------------------------------
    def pending(self) -> int:
        """Records sent or acked but not yet confirmed kept."""
        with self._cond:
            return len(self._entries) + self._unacked

    def unacked(self) -> int:
        """Sends not yet acked (re-sends included)."""
        with self._cond:
            return self._unacked

    def wait_acked(self, timeout: float | None = None) -> bool:
        """Wait until every send is acked or finally failed (re-sends included); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._unacked > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=min(0.1, left) if left is not None else 0.1)
        return True

    def settle(self, timeout: float | None = None, give_up: threading.Event | None = None) -> bool:
        """Wait until every acked record is confirmed kept; False when ``timeout`` passed first or
        ``give_up`` was set."""
        if self._thread is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._entries or self._unacked:
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or (give_up is not None and give_up.is_set()):
                    return False
                self._cond.wait(timeout=min(0.2, left) if left is not None else 0.2)
        return True

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.journal is not None:
            with self._cond:
                settled = not self._entries and not self._unacked and not self._holds
            self.journal.close(settled=settled)
        self._reader.close()
        self._watch.close()
