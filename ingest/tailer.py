"""Follow a growing access log like ``tail -F`` and publish each line exactly once.

Reading: the file is read in binary, split on ``\\n``; each complete line is parsed
(:func:`ingest.weblog.parse_line`) and published to the weblog raw topic, or dead-lettered
(original bytes, ``dl.source_file`` / ``dl.source_line``) when it does not parse or fit the
schema. Ingestion never stops for a bad line. Blank lines are skipped (they are not events).
Rotation: when the path names a new inode, the old file is drained to its end (and given
``rotate_grace_s`` to stop growing), then the new file is read from 0. Truncation (copytruncate:
the file is shorter than what was read) restarts the same inode from 0 under a new
*generation*. Without ``follow`` the file is read once to its end, the last line even without
its newline.

Durability - why no gap and no duplicate after ``kill -9``:

1. **Checkpoint after ack.** The position (inode, first-line fingerprint, generation, byte
   offset, line number) is written atomically (``ingest.checkpoint.write_json``: temp + fsync
   + rename) and only up to the last line whose send future *and all earlier ones* succeeded.
   Restart resumes there, so nothing unacked is skipped (no gap).
2. **Deterministic ids.** ``event_id = sha1(file identity + byte offset)`` where the identity is
   path, inode, generation and the sha1 of the file's first line. Each raw record carries it in
   the ``sl.event_id`` header; a dead letter carries it as its key.
3. **Read back what the checkpoint does not cover.** Lines after the checkpoint may have been
   acked before the kill. The checkpoint also stores *floors*: per partition of the raw and
   dead-letter topics, an offset below which no such record can be (the end offsets taken at
   quiet moments, raised by the acked offsets of checkpointed lines - a partition keeps send
   order, so anything sent after a checkpointed line lands above it). On restart the tailer
   reads the topics from the floors to their end, collects the ids, and skips lines whose id is
   there (no duplicate). The floors of a new source are written before its first send.

Kafka transactions were the alternative; they would need the file position stored in Kafka in
the same transaction and do not cover dead letters written from the same loop, so the
read-back is the simpler design that covers both. A broker that loses acked writes (the embedded
broker on its own ``kill -9``) is covered by the Publisher's ack ledger (``streaming/ackguard.py``),
which re-sends what vanished; a tailer crash *and* a broker crash within the same few seconds can
still duplicate a line (re-sent lines may land below the floors). A file truncated and
regrown past the checkpoint with an identical first line while the tailer was down is
indistinguishable from the old file (as with ``tail -F``).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest import checkpoint as cp
from ingest.exceptions import InputRejectedError, LogParseError, SourceError
from ingest.weblog import parse_line
from schemas.exceptions import SchemaError
from streaming.eventtime import EventTimePolicy, TimestampReader
from streaming.exceptions import PublishError, RecordTooLargeError

if TYPE_CHECKING:
    import threading

    from streaming.config import Settings
    from streaming.producer import Publisher

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 256 * 1024
ACK_TIMEOUT_S = 150.0  # above the producer's delivery timeout (120 s): its own error comes first
_FP_MAX = 64 * 1024


@dataclass
class Position:
    """What the checkpoint file holds (JSON)."""

    path: str
    inode: int = 0
    fingerprint: str = ""  # sha1 of the first line (with its newline); "" until it is complete
    generation: int = 0  # truncations of this inode seen
    offset: int = 0  # every line before this byte offset is acked (or was a duplicate)
    line: int = 0  # number of lines before ``offset``
    file: str = ""  # the file actually read (differs from ``path`` while draining a rotated file)
    floors: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        return f"{self.path}#{self.inode}.{self.generation}.{self.fingerprint[:16]}"


@dataclass
class TailStats:
    lines: int = 0
    published: int = 0
    dead_lettered: int = 0
    skipped_duplicates: int = 0
    blank: int = 0
    rotations: int = 0
    truncations: int = 0


def default_checkpoint_path(settings: Settings, path: Path) -> Path:
    """Checkpoint of one followed path under ``settings.state_dir`` (stable hash of the path)."""
    key = hashlib.sha1(str(Path(path).absolute()).encode()).hexdigest()[:16]
    return settings.state_dir / "weblog" / f"{Path(path).name}.{key}.json"


def _first_line_fp(fd: int) -> str:
    """sha1 of the first line of an open file (as :meth:`FileTailer._emit` computes it)."""
    head = os.pread(fd, _FP_MAX, 0)
    nl = head.find(b"\n")
    return hashlib.sha1(head if nl < 0 else head[: nl + 1]).hexdigest()


class FileTailer:
    """Publish the lines of one log file (and its successors after rotation) exactly once."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        path: Path,
        *,
        checkpoint_path: Path | None = None,
        follow: bool = False,
        poll_s: float = 0.2,
        rotate_grace_s: float = 1.0,
        checkpoint_every_s: float = 0.5,
        max_in_flight: int = 50_000,
        policy: EventTimePolicy | None = None,
        timestamp_unit: str = "auto",
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_read = on_read  # progress hook: called with the bytes of each chunk read
        self.publisher = publisher
        self.path = Path(path).absolute()
        self.cp_path = checkpoint_path or default_checkpoint_path(settings, self.path)
        self.follow = follow
        self.poll_s = poll_s
        self.rotate_grace_s = rotate_grace_s
        self.checkpoint_every_s = checkpoint_every_s
        self.max_in_flight = max_in_flight
        self.topics = cp.source_topics(settings, "weblog")
        # One event-time window and one timestamp unit for the whole followed file (and its successors).
        self.policy = policy or EventTimePolicy()
        self._read_time = TimestampReader(timestamp_unit, source=str(self.path))
        self._headers = [*self.policy.headers()]
        self.stats = TailStats()
        self._pending: collections.deque[tuple[int, int, Any]] = collections.deque()
        self._skip: set[str] = set()
        self._fd: int | None = None
        self._read_pos = 0  # bytes of the current file consumed into lines or the buffer
        self._buf = b""
        self._buf_start = 0  # file offset of _buf[0]
        self._line_no = 0  # lines handed out so far in the current file
        self._acked_floor: dict[str, dict[str, int]] = {}
        self._last_cp = 0.0
        self._dirty = False
        self._sent_since_floor = False
        self._source = str(self.path)
        self._id_identity = ""
        self._id_base = hashlib.sha1()
        self.pos = self._start()

    # -- start-up -------------------------------------------------------------------------
    def _start(self) -> Position:
        saved = cp.read_json(self.cp_path)
        if saved is None:
            pos = Position(path=str(self.path), floors=cp.end_offsets(self.settings, self.topics))
            self._open_current(pos, offset=0, line=0)
            self._write(pos)  # floors are durable before the first send
            return pos
        pos = Position(**{k: v for k, v in saved.items() if k in Position.__dataclass_fields__})
        if pos.path != str(self.path):
            raise SourceError(
                f"checkpoint {self.cp_path} belongs to {pos.path}, not {self.path}; pass --checkpoint with another file"
            )
        self._skip = set(cp.published_ids(self.settings, self.topics, pos.floors))
        if self._skip:
            log.info("%s: %d ids published after the checkpoint will be skipped", self.path, len(self._skip))
        self._resume(pos)
        return pos

    def _resume(self, pos: Position) -> None:
        """Reopen the checkpointed file (possibly rotated away) at its offset, or what replaced it."""
        if pos.inode == 0:  # the path did not exist yet when the checkpoint was written
            self._open_current(pos, offset=0, line=0)
            self._write(pos)
            return
        candidates = [self.path] + sorted(p for p in self.path.parent.iterdir() if p != self.path)
        for cand in candidates:
            try:
                st = cand.stat()
            except OSError:
                continue
            if st.st_ino != pos.inode or not cand.is_file():
                continue
            fd = os.open(cand, os.O_RDONLY)
            fp = _first_line_fp(fd)
            if (pos.fingerprint and fp != pos.fingerprint) or st.st_size < pos.offset:
                os.close(fd)
                if cand == self.path:  # same inode, other content: truncated while we were down
                    self.stats.truncations += 1
                    pos.generation += 1
                    pos.fingerprint, pos.offset, pos.line = "", 0, 0
                    self._attach(fd=os.open(cand, os.O_RDONLY), pos=pos, file=cand)
                    self._write(pos)
                    return
                continue
            self._attach(fd=fd, pos=pos, file=cand)
            return
        log.warning(
            "%s: checkpointed inode %d is gone; lines after offset %d of it cannot be read",
            self.path,
            pos.inode,
            pos.offset,
        )
        self._open_current(pos, offset=0, line=0)
        self._write(pos)

    def _open_current(self, pos: Position, *, offset: int, line: int) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            if not self.follow:
                raise SourceError(f"{self.path}: no such file; check the path") from None
            pos.inode, pos.fingerprint, pos.generation, pos.offset, pos.line = 0, "", 0, 0, 0
            self._fd = None
            return
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot open ({exc})") from exc
        # A recycled inode must not reuse the old ids: bump the generation instead of resetting it.
        pos.generation = pos.generation + 1 if os.fstat(fd).st_ino == pos.inode else 0
        pos.inode, pos.fingerprint, pos.offset, pos.line = os.fstat(fd).st_ino, "", offset, line
        self._attach(fd=fd, pos=pos, file=self.path)

    def _attach(self, *, fd: int, pos: Position, file: Path) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        pos.file = str(file)
        pos.inode = os.fstat(fd).st_ino
        self._read_pos = self._buf_start = pos.offset
        self._line_no = pos.line
        self._buf = b""
        os.lseek(fd, pos.offset, os.SEEK_SET)

    # -- checkpointing ----------------------------------------------------------------------
    def _write(self, pos: Position) -> None:
        cp.write_json(self.cp_path, asdict(pos) | {"written_at_ms": int(time.time() * 1000)})
        self._last_cp = time.monotonic()
        self._dirty = False

    def _reap(self, block: bool = False, down_to: int = 0) -> None:
        """Advance the checkpoint over the acked prefix of the in-flight lines.

        With ``block``, wait for acks until at most ``down_to`` lines are in flight.
        """
        while self._pending:
            end, line, fut = self._pending[0]
            if fut is not None:
                if not fut.is_done:
                    if not block or len(self._pending) <= down_to:
                        break
                    fut.get(timeout=ACK_TIMEOUT_S)
                if fut.failed():
                    raise PublishError(
                        f"{self.path}: Kafka did not acknowledge line {line}: {fut.exception}; "
                        "restart to resume from the last acknowledged line"
                    )
                md = fut.value
                tp = self._acked_floor.setdefault(md.topic, {})
                tp[str(md.partition)] = max(tp.get(str(md.partition), 0), md.offset + 1)
            self._pending.popleft()
            self.pos.offset, self.pos.line = end, line
            self._dirty = True

    def _maybe_checkpoint(self, force: bool = False) -> None:
        if not self._dirty and not force:
            return
        if not force and time.monotonic() - self._last_cp < self.checkpoint_every_s:
            return
        for topic, parts in self._acked_floor.items():
            floors = self.pos.floors.setdefault(topic, {})
            for p, off in parts.items():
                floors[p] = max(floors.get(p, 0), off)
        self._acked_floor = {}
        self._write(self.pos)

    def _settle(self) -> None:
        """Wait for every in-flight line and checkpoint everything read (before switching files)."""
        self.publisher.flush()
        self._reap(block=True)
        self._maybe_checkpoint(force=True)

    def _refresh_floors(self) -> None:
        """At a quiet moment (nothing in flight) raise the floors to the topics' end offsets."""
        if self._pending:
            return
        self._maybe_checkpoint(force=True)
        self.pos.floors = cp.end_offsets(self.settings, self.topics)
        self._sent_since_floor = False
        self._skip.clear()  # every line that could be a duplicate is behind the checkpoint now
        self._write(self.pos)

    # -- lines ----------------------------------------------------------------------------
    def _emit(self, raw: bytes, start: int) -> None:
        """Publish (or dead-letter, or skip) one line that starts at byte ``start``."""
        end = start + len(raw)
        self._line_no += 1
        n = self._line_no
        if start == 0 and not self.pos.fingerprint:
            self.pos.fingerprint = hashlib.sha1(raw[:_FP_MAX]).hexdigest()
        self.stats.lines += 1
        if not raw.strip():
            self.stats.blank += 1
            self._pending.append((end, n, None))
            return
        identity = self.pos.identity
        if identity != self._id_identity:  # sha1 state of the identity, reused for every line
            self._id_identity = identity
            self._id_base = hashlib.sha1(identity.encode("utf-8", "backslashreplace") + b"\x00")
        h = self._id_base.copy()
        h.update(b"@%d" % start)
        eid = h.hexdigest()
        if eid in self._skip:
            self.stats.skipped_duplicates += 1
            self._pending.append((end, n, None))
            return
        fut: Any
        try:
            if len(raw) > MAX_LINE_BYTES:
                raise LogParseError(f"line is longer than {MAX_LINE_BYTES} bytes without a newline", "line_too_long")
            record = parse_line(raw, source=self._source, position=start, event_id=eid, read_time=self._read_time,
                                policy=self.policy)
            fut = self.publisher.publish("weblog", record,
                                         headers=[(cp.EVENT_ID_HEADER, eid.encode()), *self._headers])
            self.stats.published += 1
        except (InputRejectedError, SchemaError, RecordTooLargeError) as exc:
            stage = "parse" if isinstance(exc, InputRejectedError) else "validate"
            reason = exc.reason if isinstance(exc, InputRejectedError) else "schema"
            source = {"file": self.pos.file or str(self.path), "line": str(n), "reason": reason}
            if isinstance(exc, InputRejectedError) and len(exc.reasons) > 1:
                source["reasons"] = ",".join(exc.reasons)
            fut = self.publisher.dead_letter(
                "weblog", raw.rstrip(b"\n"), stage=stage, error=exc, source=source, key=eid
            )
            self.stats.dead_lettered += 1
        self._pending.append((end, n, fut))
        self._sent_since_floor = True
        if len(self._pending) >= self.max_in_flight:  # backpressure: wait for the oldest tenth
            self._reap(block=True, down_to=self.max_in_flight * 9 // 10)

    def _split(self, *, final: bool) -> None:
        buf, start = self._buf, self._buf_start
        i = 0
        while True:
            nl = buf.find(b"\n", i)
            if nl < 0:
                break
            self._emit(buf[i : nl + 1], start + i)
            i = nl + 1
        rest = buf[i:]
        if rest and (final or len(rest) > MAX_LINE_BYTES):
            self._emit(rest, start + i)
            i = len(buf)
            rest = b""
        self._buf, self._buf_start = rest, start + i

    def _read_chunk(self) -> bool:
        """Read and publish the next chunk of the current file; False at its end."""
        if self._fd is None:
            return False
        chunk = os.read(self._fd, 1 << 20)
        if not chunk:
            return False
        self._read_pos += len(chunk)
        if self.on_read is not None:
            self.on_read(len(chunk))
        self._buf += chunk
        self._split(final=False)
        self._reap()
        self._maybe_checkpoint()
        return True

    # -- rotation / truncation --------------------------------------------------------------
    def _check_switch(self, idle_since: float) -> bool:
        """Handle truncation or rotation at EOF; True when the tailer switched files."""
        if self._fd is None:
            if self.path.exists():
                self._open_current(self.pos, offset=0, line=0)
                self._write(self.pos)
                return True
            return False
        st = os.fstat(self._fd)
        if st.st_size < self._read_pos:  # copytruncate
            self._split(final=True)
            self._settle()
            self.stats.truncations += 1
            self.pos.generation += 1
            self.pos.fingerprint, self.pos.offset, self.pos.line = "", 0, 0
            self._attach(fd=os.dup(self._fd), pos=self.pos, file=Path(self.pos.file))
            self._write(self.pos)
            return True
        try:
            path_ino = self.path.stat().st_ino
        except FileNotFoundError:
            path_ino = None
        if path_ino is not None and path_ino != st.st_ino:
            if time.monotonic() - idle_since < self.rotate_grace_s:
                return False  # the writer may still append to the renamed file
            self._split(final=True)
            self._settle()
            self.stats.rotations += 1
            self._open_current(self.pos, offset=0, line=0)
            self._write(self.pos)
            return True
        return False

    # -- main loop ------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None) -> TailStats:
        """Tail until EOF (``follow=False``), ``stop`` is set, or ``idle_exit_s`` without new data."""
        idle_since = time.monotonic()
        last_floor = time.monotonic()
        try:
            while True:
                if stop is not None and stop.is_set():
                    break
                if self._read_chunk():
                    idle_since = time.monotonic()
                    continue
                if not self.follow:
                    self._split(final=True)
                    break
                if self._check_switch(idle_since):
                    idle_since = time.monotonic()
                    continue
                self._reap()
                self._maybe_checkpoint(force=self._dirty)
                if not self._pending and self._sent_since_floor and time.monotonic() - last_floor > 5.0:
                    self._refresh_floors()
                    last_floor = time.monotonic()
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                if stop is not None:
                    stop.wait(self.poll_s)
                else:
                    time.sleep(self.poll_s)  # poll interval of a file follower, not a test wait
            self._settle()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return self.stats
