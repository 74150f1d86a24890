"""Follow a growing access log like ``tail -F`` and publish each line exactly once.

Reading: the file is read in binary, split on ``\\n``; each complete line is parsed
(:func:`ingest.weblog.parse_line`) and published to the weblog raw topic, or dead-lettered
(original bytes, ``dl.source_file`` / ``dl.source_line``) when it does not parse or fit the
schema. Ingestion never stops for a bad line. Blank lines are skipped (they are not events).
Rotation: when the path names a new inode, the old file is drained to its end (and given
``rotate_grace_s`` to stop growing), then the new file is read from 0. Truncation (copytruncate:
the file is shorter than what was read) restarts the same inode from 0 under a new
*generation*. Without ``follow`` the file is read once to its end, the last line even without
its newline once the file has not changed for a second (a line still being written waits, up to
``LAST_LINE_MAX_WAIT_S``, and is otherwise left for the next run).

Durability - why no gap and no duplicate after ``kill -9``: :class:`TailSource` is a source of the
one runner (``ingest/runner.py``, the contract in ``ingest/source.py``), which publishes, checkpoints
after the acks and reads back what a killed run sent after its checkpoint. What is specific here:

* **The snapshot** is the position (path, inode, first-line fingerprint, generation, byte offset,
  line number, the file actually read); the checkpoint file holds it at the top level, beside the
  runner's floors.
* **Deterministic ids.** ``event_id = sha1(file identity + byte offset)`` where the identity is
  path, inode, generation and the sha1 of the file's first line.

Kafka transactions were the alternative; they would need the file position stored in Kafka in
the same transaction and do not cover dead letters written from the same loop, so the
read-back is the simpler design that covers both. A file truncated and regrown past the
checkpoint with an identical first line while the tailer was down is indistinguishable from the
old file (as with ``tail -F``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.exceptions import InputRejectedError, LogParseError, SourceError
from ingest.lines import BUSY, GREW, last_line_state
from ingest.runner import SourceRunner
from ingest.source import (
    PositionIds,
    SourceItem,
    SourcePartition,
    canonical_path,
    compressed,
    keyed_state,
    not_a_file,
    source_state_dir,
    state_name,
    text_name,
)
from ingest.weblog import parse_line
from schemas.exceptions import SchemaError
from streaming.eventtime import EventTimePolicy

if TYPE_CHECKING:
    import threading

    from streaming.config import Settings
    from streaming.producer import Publisher

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 256 * 1024
_NULS = re.compile(rb"\x00+")
_FP_MAX = 64 * 1024


@dataclass
class Position:
    """The tailer's snapshot (the checkpoint's JSON, beside the runner's floors)."""

    path: str
    inode: int = 0
    fingerprint: str = ""  # sha1 of the first line (with its newline); "" until it is complete
    generation: int = 0  # truncations of this inode seen
    offset: int = 0  # every line before this byte offset is handed out (in a snapshot: acked)
    line: int = 0  # number of lines before ``offset``
    file: str = ""  # the file actually read (differs from ``path`` while draining a rotated file)
    #: ``offset`` is inside an over-long line whose head is already a dead letter: the bytes up to the
    #: next newline belong to it (skipped, not read as lines of their own).
    skipping: bool = False

    @property
    def identity(self) -> str:
        return f"{self.path}#{self.inode}.{self.generation}.{self.fingerprint[:16]}"

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Position:
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})


@dataclass
class TailStats:
    lines: int = 0
    published: int = 0
    dead_lettered: int = 0
    skipped_duplicates: int = 0
    blank: int = 0
    rotations: int = 0
    truncations: int = 0


def default_checkpoint_path(settings: Settings, path: Path, policy: EventTimePolicy | None = None) -> Path:
    """Checkpoint of one followed path under ``settings.state_dir`` (stable hash of the path).

    A ``--backfill`` run has a checkpoint of its own (its window in the hash, as the sensor CSV's): a
    live run dead-letters history as ``timestamp_too_old`` with "load history on purpose with
    --backfill", and that command then resumed at the live run's end and published nothing. Live runs
    keep the path they always had, so a restarted ``--follow`` resumes where it was.
    """
    suffix = ""
    if policy is not None and policy.backfill:
        suffix += "\0" + json.dumps({"backfill": True, "max_age_ms": policy.max_age_ms,
                                     "max_future_ms": policy.max_future_ms}, sort_keys=True)
    if policy is not None and policy.timezone:  # JSON logs' naive times: another zone, another fate
        suffix += "\0timezone=" + policy.timezone

    def at(where: Path) -> Path:
        key = hashlib.sha1((str(where) + suffix).encode("utf-8", "surrogateescape")).hexdigest()[:16]  # latin-1 too
        return source_state_dir(settings, "weblog") / f"{state_name(Path(path).name)}.{key}.json"

    # The directory resolved (another spelling of it was another checkpoint: the log published again); a
    # checkpoint written before that, under the path as given, is still resumed.
    return keyed_state(Path(path).absolute(), canonical_path(path), at)


def _first_line_fp(fd: int) -> str:
    """sha1 of the first line of an open file (as :meth:`TailSource._emit` computes it)."""
    head = os.pread(fd, _FP_MAX, 0)
    nl = head.find(b"\n")
    return hashlib.sha1(head if nl < 0 else head[: nl + 1]).hexdigest()


class TailSource(SourcePartition):
    """The lines of one log file (and its successors after rotation), as source items."""

    kind = "weblog"

    def __init__(
        self,
        path: Path,
        *,
        resume_state: dict[str, Any] | None = None,
        follow: bool = False,
        poll_s: float = 0.2,
        rotate_grace_s: float = 1.0,
        policy: EventTimePolicy | None = None,
        timestamp_unit: str = "auto",
        on_read: Callable[[int], None] | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.path = Path(path).absolute()
        self.name = str(self.path)
        self._source = text_name(self.name)  # the records' ``source`` field
        self.chunk_bytes = chunk_bytes  # bytes read per batch: a batch is the lines of one chunk
        self.follow, self.poll_s, self.rotate_grace_s = follow, poll_s, rotate_grace_s
        self.on_read = on_read  # progress hook: called with the bytes of each chunk read
        # One event-time window and one timestamp unit for the whole followed file (and its successors).
        self.policy = policy or EventTimePolicy()
        self._read_time = self.policy.reader(timestamp_unit, source=str(self.path))
        self._headers = [*self.policy.headers()]
        self.rotations = self.truncations = 0
        self._out: list[SourceItem] = []
        self._ids = PositionIds()
        self._fd: int | None = None
        self._read_pos = 0  # bytes of the current file consumed into lines or the buffer
        self._buf = b""
        self._buf_start = 0  # file offset of _buf[0]
        self._done = False
        self._idle_since = time.monotonic()
        self._warned_nuls = False
        self.pos = self._start(resume_state)

    # -- start-up -------------------------------------------------------------------------
    def _start(self, saved: dict[str, Any] | None) -> Position:
        if saved is None:
            pos = Position(path=str(self.path))
            self._open_current(pos)
            return pos
        pos = Position.from_state(saved)
        if pos.path != str(self.path) and canonical_path(pos.path) != canonical_path(self.path):
            raise SourceError(
                f"the checkpoint belongs to {pos.path}, not {self.path}; pass --checkpoint with another file"
            )
        self._resume(pos)
        return pos

    def _resume(self, pos: Position) -> None:
        """Reopen the checkpointed file (possibly rotated away) at its offset, or what replaced it."""
        if pos.inode == 0:  # the path did not exist yet when the checkpoint was written
            self._open_current(pos)
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
                    self.truncations += 1
                    pos.generation += 1
                    pos.fingerprint, pos.offset, pos.line, pos.skipping = "", 0, 0, False
                    self._attach(fd=os.open(cand, os.O_RDONLY), pos=pos, file=cand)
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
        self._open_current(pos)

    def _open_current(self, pos: Position) -> None:
        try:
            mode = os.stat(self.path).st_mode
            if not stat.S_ISREG(mode):  # before open: opening a FIFO waits for a writer
                raise SourceError(not_a_file(self.path, "the log tailer", mode))
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            if not self.follow:
                raise SourceError(f"{self.path}: no such file; check the path") from None
            pos.inode, pos.fingerprint, pos.generation, pos.offset, pos.line = 0, "", 0, 0, 0
            self._fd = None
            return
        except OSError as exc:
            raise SourceError(f"{self.path}: cannot open ({exc})") from exc
        packed = compressed(os.pread(fd, 8, 0), self.path)
        if packed is not None:
            os.close(fd)
            raise SourceError(packed)
        # A recycled inode must not reuse the old ids: bump the generation instead of resetting it.
        pos.generation = pos.generation + 1 if os.fstat(fd).st_ino == pos.inode else 0
        pos.inode, pos.fingerprint, pos.offset, pos.line = os.fstat(fd).st_ino, "", 0, 0
        pos.skipping = False
        self._attach(fd=fd, pos=pos, file=self.path)

    def _attach(self, *, fd: int, pos: Position, file: Path) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        pos.file = str(file)
        pos.inode = os.fstat(fd).st_ino
        self._read_pos = self._buf_start = pos.offset
        self._buf = b""
        os.lseek(fd, pos.offset, os.SEEK_SET)

    # -- the contract -----------------------------------------------------------------------
    def next_batch(self) -> list[SourceItem]:
        """The lines of the next chunk read; at the end of the file, rotation or truncation."""
        if self._done:
            raise StopIteration
        while self._read_chunk():
            if self._out or not self.pos.skipping:  # skipping a long line's rest hands out nothing: read on
                return self._take()
        if not self.follow:
            if self._buf and not self.pos.skipping and b"\n" not in self._buf:
                state = last_line_state(self._fd, self._read_pos, self._buf) if self._fd is not None else BUSY
                if state == GREW:
                    return []  # asked again after poll_s: the next chunk carries the rest of the line
                if state == BUSY:
                    log.warning("%s: its last line (line %d) is still being written; it is left for the next run",
                                self.pos.file or self.path, self.pos.line + 1)
                    self._buf = b""
            self._split(final=True)
            self._done = True
            if not self._out:
                raise StopIteration
            return self._take()
        if self._check_switch():
            self._read_chunk()
        return self._take()

    def snapshot(self) -> dict[str, Any]:
        return asdict(self.pos)

    def refused(self, item: SourceItem, exc: BaseException) -> None:
        item.raw = item.raw.rstrip(b"\n")
        super().refused(item, exc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _take(self) -> list[SourceItem]:
        out, self._out = self._out, []
        return out

    # -- lines ----------------------------------------------------------------------------
    def _emit(self, raw: bytes, start: int) -> None:
        """One line that starts at byte ``start``: a record, a dead letter or a blank."""
        pos = self.pos
        if start == 0 and not pos.fingerprint:
            pos.fingerprint = hashlib.sha1(raw[:_FP_MAX]).hexdigest()
        pos.offset, pos.line = start + len(raw), pos.line + 1
        if not raw.strip():
            self._out.append(SourceItem(""))
            return
        eid = self._ids.at(pos.identity, start)
        item = SourceItem(eid, raw, source={"file": pos.file or str(self.path), "line": str(pos.line)})
        try:
            if len(raw) > MAX_LINE_BYTES:
                raise LogParseError(f"line is longer than {MAX_LINE_BYTES} bytes; its head is kept here, the rest "
                                    "of it up to the next newline is skipped", "line_too_long")
            item.record = parse_line(raw, source=self._source, position=start, event_id=eid, read_time=self._read_time,
                                     policy=self.policy)
            item.headers = self._headers
        except (InputRejectedError, SchemaError) as exc:
            item.raw, item.error = raw.rstrip(b"\n"), exc
            rejected = isinstance(exc, InputRejectedError)
            item.stage = "parse" if rejected else "validate"
            item.source["reason"] = exc.reason if isinstance(exc, InputRejectedError) else "schema"
            if isinstance(exc, InputRejectedError) and len(exc.reasons) > 1:
                item.source["reasons"] = ",".join(exc.reasons)
        self._out.append(item)

    def _split(self, *, final: bool) -> None:
        buf, start = self._buf, self._buf_start
        i = 0
        if self.pos.skipping:  # the rest of an over-long line: one line, one dead letter (its head)
            nl = buf.find(b"\n")
            i = len(buf) if nl < 0 else nl + 1
            self.pos.offset, self.pos.skipping = start + i, nl < 0 and not final
        while True:
            if i < len(buf) and buf[i] == 0:
                i = self._skip_nuls(buf, i, start)
            nl = buf.find(b"\n", i)
            if nl < 0:
                break
            self._emit(buf[i : nl + 1], start + i)
            i = nl + 1
        rest = buf[i:]
        if rest and (final or len(rest) > MAX_LINE_BYTES):
            self._emit(rest, start + i)
            # Not yet at its newline: the bytes still to come are this line's, not lines of their own
            # (they used to become more dead letters, 'not_combined_format', each shifting the line count).
            self.pos.skipping = not final
            i = len(buf)
            rest = b""
        self._buf, self._buf_start = rest, start + i

    def _skip_nuls(self, buf: bytes, i: int, start: int) -> int:
        """Past a run of NUL bytes before a line: the hole a copytruncate rotation leaves when the
        writer does not append (it goes on writing at its old offset; the file reads as zeros up to
        there). Not a line: it made the next real line a dead letter (or, over 256 KiB, lost it
        inside one). Lines start at their first other byte, whatever the chunking, so ids stay stable."""
        m = _NULS.match(buf, i)
        assert m is not None
        if not self._warned_nuls:
            self._warned_nuls = True
            log.warning("%s: skipping NUL bytes from offset %d (a copytruncate hole?); logged once",
                        self.pos.file or self.path, start + i)
        return m.end()

    def _read_chunk(self) -> bool:
        """Read the next chunk of the current file into lines; False at its end."""
        if self._fd is None:
            return False
        chunk = os.read(self._fd, self.chunk_bytes)
        if not chunk:
            return False
        self._idle_since = time.monotonic()
        self._read_pos += len(chunk)
        if self.on_read is not None:
            self.on_read(len(chunk))
        self._buf += chunk
        self._split(final=False)
        return True

    # -- rotation / truncation --------------------------------------------------------------
    def _check_switch(self) -> bool:
        """Handle truncation or rotation at EOF; True when the tailer switched files.

        The last lines of the old file are handed out before the switch; the runner commits the
        new file's position only after they are acked (snapshots become durable in order).
        """
        if self._fd is None:
            if self.path.exists():
                self._open_current(self.pos)
                self._idle_since = time.monotonic()
                return True
            return False
        st = os.fstat(self._fd)
        if st.st_size < self._read_pos:  # copytruncate
            self._split(final=True)
            self.truncations += 1
            self.pos.generation += 1
            self.pos.fingerprint, self.pos.offset, self.pos.line = "", 0, 0
            self._attach(fd=os.dup(self._fd), pos=self.pos, file=Path(self.pos.file))
            self._idle_since = time.monotonic()
            return True
        try:
            path_ino = self.path.stat().st_ino
        except FileNotFoundError:
            path_ino = None
        if path_ino is not None and path_ino != st.st_ino:
            if time.monotonic() - self._idle_since < self.rotate_grace_s:
                return False  # the writer may still append to the renamed file
            self._split(final=True)
            self.rotations += 1
            self._open_current(self.pos)
            self._idle_since = time.monotonic()
            return True
        return False


class FileTailer:
    """Publish the lines of one log file (and its successors after rotation) exactly once:
    a :class:`TailSource` run by :class:`ingest.runner.SourceRunner`."""

    def __init__(self, settings: Settings, publisher: Publisher, path: Path, *, checkpoint_path: Path | None = None,
                 checkpoint_every_s: float = 0.5, max_in_flight: int = 50_000, **source_options: Any) -> None:
        """``source_options`` are :class:`TailSource`'s (follow, poll_s, rotate_grace_s, policy,
        timestamp_unit, on_read, chunk_bytes); the rest is the runner's."""
        self.path = Path(path).absolute()
        self.cp_path = checkpoint_path or default_checkpoint_path(settings, self.path, source_options.get("policy"))

        def build(state: dict[str, Any] | None) -> TailSource:
            return TailSource(self.path, resume_state=state, **source_options)

        self.runner = SourceRunner(settings, publisher, build, kind="weblog", checkpoint_path=self.cp_path,
                                   max_in_flight=max_in_flight, checkpoint_every_s=checkpoint_every_s)
        assert isinstance(self.runner.source, TailSource)
        self.source: TailSource = self.runner.source

    @property
    def on_read(self) -> Callable[[int], None] | None:
        return self.source.on_read

    @on_read.setter
    def on_read(self, hook: Callable[[int], None] | None) -> None:
        self.source.on_read = hook

    @property
    def pos(self) -> Position:
        """The durable position: every line before it is acked (and checkpointed)."""
        return Position.from_state(self.runner.state or {"path": str(self.path)})

    @property
    def stats(self) -> TailStats:
        s = self.runner.stats
        return TailStats(lines=s.items, published=s.published, dead_lettered=s.dead_lettered,
                         skipped_duplicates=s.skipped_duplicates, blank=s.blank,
                         rotations=self.source.rotations, truncations=self.source.truncations)

    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None) -> TailStats:
        """Tail until EOF (``follow=False``), ``stop`` is set, or ``idle_exit_s`` without new data."""
        self.runner.run(stop, idle_exit_s=idle_exit_s)
        return self.stats
