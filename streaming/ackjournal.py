"""The ack ledger's records on local disk, for a publisher that answers on the ack (the HTTP gateway).

Why: the embedded broker loses the acks of its last ~2.6 s on a ``kill -9``, and the ack ledger
(``streaming/ackguard.py``) re-sends them only while its own process lives. A file source can keep
its checkpoint behind what the ledger has not confirmed (``ingest/runner.py``), but the gateway has
already told its client "accepted", and the client will not send the event again. So the gateway
writes every record it sends here first, fsyncs before it answers, and a gateway restarted with
the same command (:func:`recover`) reads the topics back and sends again what the broker lost.

Layout: ``<directory>/<n>.seg`` segment files of framed records, a new one every ``segment_s``; a
closed segment is deleted once the ledger has confirmed every record in it kept. ``<directory>/lock``
is held (``flock``) for the process's life, so two gateways never share a journal. On Apache Kafka
(``broker_loss_window_s = 0``: the ledger is off) there is no journal: an ack is durable there.

Frame: ``length u32 | crc32 u32 | payload``; payload: ``send_ms u64 | topic | key | value | headers``
(each length-prefixed; key length 0xFFFFFFFF for no key). A torn frame at a segment's end (a crash
mid-write, before any answer depended on it) ends that segment's read.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streaming.ackguard import Headers, record_digest
from streaming.exceptions import StreamingError

if TYPE_CHECKING:
    from streaming.ackguard import AckLedger, GuardedSend
    from streaming.producer import Publisher

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">II")
_NO_KEY = 0xFFFFFFFF
#: Topic of a frame that says "the send with this digest (the value) failed for good": not on the topic,
#: and the client was told to send it again; recovery must not send it a second time.
FAILED = "\x00failed"
#: The read-back starts this far before the oldest journaled send. Record times are the producer's clock
#: (CreateTime), the same clock as ``send_ms``; the margin covers a topic on LogAppendTime whose broker
#: clock is behind by less. More skew than this costs duplicates (a found record is sent again), never
#: a loss, and a longer margin costs start-up time on a busy topic.
READ_BACK_MARGIN_MS = 10_000


class JournalLockedError(StreamingError):
    """Another process holds this journal (two gateways on one port and home)."""


@dataclass
class JournalRecord:
    send_ms: int
    topic: str
    key: bytes | None
    value: bytes
    headers: Headers

    def digest(self) -> str:
        return record_digest(self.key, self.value, self.headers)


def encode(rec: JournalRecord) -> bytes:
    t = rec.topic.encode()
    parts = [struct.pack(">QH", rec.send_ms, len(t)), t]
    parts.append(struct.pack(">I", _NO_KEY if rec.key is None else len(rec.key)))
    parts.extend((rec.key or b"", struct.pack(">I", len(rec.value)), rec.value, struct.pack(">H", len(rec.headers))))
    for name, val in rec.headers:
        n = name.encode()
        parts.extend((struct.pack(">H", len(n)), n, struct.pack(">I", len(val or b"")), val or b""))
    payload = b"".join(parts)
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> JournalRecord:
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, payload, pos)
        pos += struct.calcsize(fmt)
        return int(v)

    def raw(n: int) -> bytes:
        nonlocal pos
        out = payload[pos:pos + n]
        pos += n
        return out

    send_ms = take(">Q")
    topic = raw(take(">H")).decode()
    klen = take(">I")
    key = None if klen == _NO_KEY else raw(klen)
    value = raw(take(">I"))
    headers = [(raw(take(">H")).decode(), raw(take(">I"))) for _ in range(take(">H"))]
    return JournalRecord(send_ms, topic, key, value, headers)


def read_segment(path: Path) -> Iterator[JournalRecord]:
    """The whole frames of one segment, in order (a torn or corrupt tail ends the read, logged)."""
    data = path.read_bytes()
    pos = 0
    while pos + _HEAD.size <= len(data):
        size, crc = _HEAD.unpack_from(data, pos)
        payload = data[pos + _HEAD.size:pos + _HEAD.size + size]
        if len(payload) < size or zlib.crc32(payload) != crc:
            log.warning("%s: a torn record at byte %d (a crash mid-write); the rest of the segment is skipped",
                        path, pos)
            return
        try:
            record = _decode(payload)
        except (struct.error, UnicodeDecodeError) as exc:  # a whole frame that does not parse: not ours
            log.warning("%s: an unreadable record at byte %d (%s); the rest of the segment is skipped", path, pos, exc)
            return
        yield record
        pos += _HEAD.size + size


@dataclass
class _Segment:
    path: Path
    opened: float
    sends: list[GuardedSend] = field(default_factory=list)
    mark: int | None = None  # the ledger's acked mark once every send of the segment is done


class AckJournal:
    """Append each send, fsync before an answer depends on it, drop what the ledger confirmed."""

    def __init__(self, directory: Path, *, segment_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_s = segment_s
        from streaming.members import try_lock

        lock_fd = try_lock(self.directory / "lock")
        if lock_fd is None:
            raise JournalLockedError(
                f"{self.directory} is in use by another process (is a gateway with the same port and "
                "STREAMLEARN_HOME already running?); stop it, or give this one another --port")
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()
        self._closed: list[_Segment] = []
        self._written = 0  # bytes appended, and ...
        self._synced = 0  # ... of those, made durable
        self._sync_lock = threading.Lock()
        #: Files of closed segments not yet fsynced: the next :meth:`sync` does it, outside ``_mutex``, so
        #: a rotation never makes the senders wait for a disk flush.
        self._to_sync: list[Any] = []
        numbers = [int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit()]
        #: Segments a crashed run left behind: :func:`recover` reads and then removes them.
        self.leftover = [self.directory / f"{n}.seg" for n in sorted(numbers)]
        self._next = max(numbers, default=-1) + 1
        self._open = self._new_segment()
        self._file = self._open.path.open("ab")

    def drop_leftover(self) -> None:
        """Remove the segments a crashed run left, once :func:`recover` no longer needs them."""
        for path in self.leftover:
            path.unlink(missing_ok=True)
        self.leftover = []

    def _new_segment(self) -> _Segment:
        n = self._next
        self._next += 1
        return _Segment(self.directory / f"{n}.seg", time.monotonic())

    # -- writing (the ledger's send path) ------------------------------------------------------
    def append(self, fut: GuardedSend) -> None:
        """Write one send (called by the ledger before the producer sees it)."""
        frame = encode(JournalRecord(int(time.time() * 1000), fut.topic, fut.key, fut.record_value,
                                     list(fut.headers or ())))
        with self._mutex:
            if time.monotonic() - self._open.opened > self.segment_s and self._open.sends:
                self._rotate()
            self._file.write(frame)
            self._written += len(frame)
            self._open.sends.append(fut)

    def failed(self, fut: GuardedSend) -> None:
        """A journaled send failed for good (the caller got the error): recovery must not send it."""
        digest = record_digest(fut.key, fut.record_value, fut.headers).encode()
        frame = encode(JournalRecord(int(time.time() * 1000), FAILED, None, digest, []))
        with self._mutex:
            self._file.write(frame)
            self._written += len(frame)

    def _rotate(self) -> None:
        """Close the open segment (its file waits for the next :meth:`sync`) and open the next; under
        ``_mutex``."""
        self._file.flush()
        self._to_sync.append(self._file)
        self._closed.append(self._open)
        self._open = self._new_segment()
        self._file = self._open.path.open("ab")

    def sync(self) -> None:
        """Make every record appended so far durable (one fsync serves every caller waiting on it)."""
        with self._mutex:
            target = self._written
        if self._synced >= target and not self._to_sync:
            return
        with self._sync_lock:
            if self._synced >= target and not self._to_sync:
                return
            with self._mutex:
                self._file.flush()
                fd, upto = os.dup(self._file.fileno()), self._written
                older, self._to_sync = self._to_sync, []
            try:
                for fh in older:  # in order: a closed segment holds earlier records than the open one
                    os.fsync(fh.fileno())
                    fh.close()
                os.fsync(fd)
            finally:
                os.close(fd)
            self._synced = max(self._synced, upto)

    # -- dropping what is confirmed (the ledger's verifier thread) ------------------------------
    def collect(self, ledger: AckLedger) -> None:
        """Delete the closed segments whose records the ledger confirmed kept."""
        with self._mutex:
            if self._open.sends and time.monotonic() - self._open.opened > self.segment_s:
                self._rotate()
            closed = list(self._closed)
            unsynced = bool(self._to_sync)
        if unsynced:
            self.sync()
        if not closed:
            return
        confirmed = ledger.confirmed_mark()
        # Every finished segment gets its mark now, not only the first one left: marked one at a time,
        # each waited a whole loss window after the one before it was dropped, so under steady traffic
        # at most one segment went per window and the journal (and its sends' records, in memory) grew
        # without bound. A mark taken now is above every ack of that segment's records all the same.
        for seg in closed:
            if seg.mark is None and all(f.is_done for f in seg.sends):
                seg.mark = ledger.acked_mark()
                seg.sends = []
        done: list[_Segment] = []
        for seg in closed:
            if seg.mark is None or seg.mark > confirmed:
                break  # in order: a later segment is never dropped before an earlier one
            done.append(seg)
        for seg in done:
            seg.path.unlink(missing_ok=True)
        if done:
            with self._mutex:
                del self._closed[:len(done)]

    def close(self, *, settled: bool) -> None:
        """At a clean stop: drop every segment when the ledger ``settled`` (all confirmed); else keep them
        for the next start's :func:`recover`."""
        try:
            self.sync()
        except OSError as exc:  # kept as they are: the next start reads what is readable
            log.error("journal %s: %s; its segments are kept for the next start", self.directory, exc)
            settled = False
        with self._mutex:
            self._file.close()
            segments = [*self._closed, self._open]
        if settled:
            for seg in segments:
                seg.path.unlink(missing_ok=True)
        os.close(self._lock_fd)


def recover(publisher: Publisher, journal: AckJournal, *, timeout_s: float = 300.0,
            recreate: Collection[str] = ()) -> dict[str, int]:
    """After a crash: read the topics back from just before the oldest journaled send, send again every
    journaled record the broker no longer holds (as many times as it is missing), wait until those are
    confirmed, then remove the old segments. Raises (keeping them) when Kafka cannot be read; the same
    command retries.

    A journaled topic that no longer exists is taken as deleted on purpose (a removed tenant's) and its
    records are not sent again, unless it is in ``recreate``: topics the caller owns, which the embedded
    broker killed with -9 can lose whole when they were created a moment before (a stream worker's
    dead-letter topic, seen). Those are created again as declared and get all their records back."""
    from streaming.consumer import Record, Subscriber
    from streaming.exceptions import OffsetOutOfRangeError

    frames = [r for path in journal.leftover for r in read_segment(path)]
    gave_up = Counter(r.value.decode() for r in frames if r.topic == FAILED)
    records = [r for r in frames if r.topic != FAILED]
    if not records:
        journal.drop_leftover()
        return {"journaled": 0, "resent": 0, "gone": 0}
    journaled = len(records)
    from streaming.offsets import topic_names

    existing = topic_names(publisher.settings)
    lost = sorted({r.topic for r in records if r.topic not in existing and r.topic in recreate})
    if lost:
        from streaming.topics import declared_topics, ensure_topics

        specs = {s.name: s for s in declared_topics(publisher.settings)}
        log.warning("journal %s: %s are gone (lost by a broker crash); creating them again and sending their "
                    "journaled records", journal.directory, lost)
        ensure_topics(publisher.settings, [specs[t] for t in lost if t in specs])
        existing = topic_names(publisher.settings)
    gone = Counter(r.topic for r in records if r.topic not in existing)
    if gone:  # deleted since (e.g. a removed tenant): nothing to compare with, and no one reads it any more
        log.warning("journal %s: %s no longer exist; their %d journaled records are not sent again",
                    journal.directory, sorted(gone), sum(gone.values()))
        records = [r for r in records if r.topic in existing]
    if not records:  # every journaled topic is gone: before min() below, which has nothing to take
        journal.drop_leftover()
        return {"journaled": journaled, "resent": 0, "gone": journaled}
    wanted = Counter(r.digest() for r in records) - gave_up
    topics = sorted({r.topic for r in records})
    since = min(r.send_ms for r in records) - READ_BACK_MARGIN_MS
    settings = publisher.settings
    try:
        sub = Subscriber(settings, topics, start={"timestamp": since}, until="end", decode=False)
    except OffsetOutOfRangeError:  # retention dropped part of the span: read what is left
        sub = Subscriber(settings, topics, start="beginning", until="end", decode=False)
    held: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    with sub:
        for item in sub.iterate(idle_timeout_s=30.0):
            if isinstance(item, Record):
                d = record_digest(item.key, item.raw, item.headers)
                if d in wanted:
                    held[d] += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topics} back within {timeout_s:g} s; the journal "
                                   f"{journal.directory} is kept, and the next start tries again")
    missing = wanted - held
    resent = 0
    for rec in records:  # in journal order: the order the gateway sent them
        d = rec.digest()
        if missing[d] > 0:
            missing[d] -= 1
            publisher.ledger.send(rec.topic, rec.value, rec.key, rec.headers or None)
            resent += 1
    if resent:
        if not publisher.settle(timeout=timeout_s):
            raise TimeoutError(f"the {resent} records sent again were not confirmed within {timeout_s:g} s; the "
                               f"journal {journal.directory} is kept, and the next start tries again")
        journal.sync()
    journal.drop_leftover()
    return {"journaled": journaled, "resent": resent, "gone": journaled - len(records)}


def journal_dir(state_dir: Path, port: int) -> Path:
    """The journal of the gateway on ``port`` (one per port, so each restarted gateway finds its own)."""
    return Path(state_dir) / "gateway" / f"journal-{port}"


def attach(publisher: Any, directory: Path) -> AckJournal | None:
    """Journal every send of ``publisher``; None (no journal) where its ledger is off."""
    if not publisher.ledger.enabled:
        return None
    journal = AckJournal(directory)
    publisher.ledger.journal = journal
    return journal


def attach_and_recover(publisher: Any, directory: Path, *, recreate: Collection[str] = ()) -> dict[str, int] | None:
    """:func:`attach`, after :func:`recover` of what a crashed run left in ``directory``: the recovery's
    counts (all 0 where nothing was left), None where the ledger is off (no journal). The gateway and the
    stream worker call this at start, before they answer or resume; each says what it re-sent."""
    journal = attach(publisher, directory)
    if journal is None:
        return None
    if journal.leftover:
        return recover(publisher, journal, recreate=recreate)
    return {"journaled": 0, "resent": 0, "gone": 0}
