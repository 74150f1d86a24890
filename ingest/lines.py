"""Reading a file's lines safely: bounded in memory, any line end, and its last line only once it is whole.

Why apart from ``ingest/source.py`` (the source contract): these are what every file source (sensor CSV,
``publish --file``, the web-log tailer) needs of a *file*, and each was learnt from a file a user
brought: a 300 MB line (:func:`read_line`), a classic-Mac CSV (:class:`UniversalLines`), a file still
being written, renamed over or rewritten in place while it was read (:func:`last_line_state`,
:func:`tail_hash`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import BinaryIO, Protocol

#: Bytes before a file position whose sha1 a checkpoint keeps (``FilePosition.tail``).
TAIL_BYTES = 512

#: Bytes of an over-long line that its dead letter keeps (the broker refuses records over ~1 MiB).
KEEP_BYTES = 64 * 1024


class LineFile(Protocol):
    """What the line readers need of a file: a binary file, or :class:`UniversalLines` over one."""

    def readline(self, limit: int = -1, /) -> bytes: ...

    def seek(self, offset: int, /) -> int: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


def read_line(fh: LineFile, max_bytes: int, *, skip: bool = True) -> tuple[bytes, int]:
    """The next physical line of ``fh`` (with its newline) and its size, never more than ``max_bytes``
    (+1) of it in memory. Over ``max_bytes``, only its head (:data:`KEEP_BYTES`) comes back and the rest
    is read past, a bounded read at a time (the size tells: ``size > len(line)``); ``skip=False`` reads
    no further (a header that long is no CSV, and ``/dev/zero`` never ends). A line read whole used to
    hold a 300 MB row in memory, decoded and copied: ~2.2 GB."""
    line = fh.readline(max_bytes + 1)
    size = len(line)
    if size <= max_bytes or line.endswith(b"\n"):
        return line, size
    if not skip:
        return line[:KEEP_BYTES], size
    rest = line
    while rest and not rest.endswith(b"\n"):
        rest = fh.readline(1 << 20)
        size += len(rest)
    return line[:KEEP_BYTES], size


#: An unterminated last line of a file read once (no ``--follow``) is taken as complete when the file has
#: not changed for ``LAST_LINE_SETTLE_S``; a file still written after ``LAST_LINE_MAX_WAIT_S`` keeps that
#: line for the next run. Why: a CSV or log copied or written while a run read it was cut mid-line: the
#: head was published as a row of its own (a value of 2 for 23.5) and the rest dead-lettered next run.
LAST_LINE_SETTLE_S = 1.0
LAST_LINE_MAX_WAIT_S = 10.0
#: What :func:`last_line_state` found.
SETTLED, GREW, BUSY = "settled", "grew", "busy"


def last_line_state(fd: int, read_to: int, partial: bytes) -> str:
    """Whether ``partial``, the unterminated line that ends at byte ``read_to`` of the open file ``fd``, is
    the file's last line.

    :data:`SETTLED`: the file is that long and unchanged for :data:`LAST_LINE_SETTLE_S` (at once when its
    mtime is already that old): publish the line. :data:`GREW`: the file is longer now and still holds
    ``partial`` where it was: read on. :data:`BUSY`: still changing after :data:`LAST_LINE_MAX_WAIT_S`, or
    shorter, or other bytes where ``partial`` was (rewritten in place): leave the line for the next run.

    The open file, not its path: an exporter that saves by renaming a new file over the old one leaves
    the path naming another, longer file, and read by path that was "grew" forever (the old file never
    did), a run spinning a core and deaf to SIGTERM."""
    deadline = time.monotonic() + LAST_LINE_MAX_WAIT_S
    seen: tuple[int, int] | None = None
    since = time.monotonic()
    while True:
        try:
            st = os.fstat(fd)
        except OSError:
            return BUSY
        if st.st_size != read_to:
            if st.st_size > read_to and os.pread(fd, len(partial), read_to - len(partial)) == partial:
                return GREW
            return BUSY
        now = (st.st_size, st.st_mtime_ns)
        if seen is None and time.time() - st.st_mtime >= LAST_LINE_SETTLE_S:
            return SETTLED
        if now != seen:  # first look, or written since: the quiet period starts again
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= LAST_LINE_SETTLE_S:
            return SETTLED
        if time.monotonic() >= deadline:
            return BUSY
        time.sleep(min(0.05, LAST_LINE_SETTLE_S / 10))


def tail_hash(fd: int, offset: int) -> str | None:
    """sha1 of the :data:`TAIL_BYTES` before ``offset`` of the open file ``fd`` (None at 0)."""
    if offset <= 0:
        return None
    start = max(0, offset - TAIL_BYTES)
    return hashlib.sha1(os.pread(fd, offset - start, start)).hexdigest()


class TailCache:
    """:func:`tail_hash` taken once per offset: the first time is when the bytes were read (or just before
    waiting on a last line), so a rewrite during that wait is never taken for them. One per file reader."""

    def __init__(self) -> None:
        self._at: tuple[int, str | None] = (-1, None)

    def at(self, fd: int, offset: int) -> str | None:
        if self._at[0] != offset:
            self._at = (offset, tail_hash(fd, offset))
        return self._at[1]


def cr_only(first: bytes) -> bool:
    """True when a file's first physical line (as :func:`read_line` gives it) shows classic-Mac line ends:
    a ``\r`` inside it that is not the ``\r`` of a ``\r\n``. Excel for Mac's "CSV (Macintosh)" and old
    loggers write them; read on ``\n``, the whole file was one line."""
    body = first[:-1] if first.endswith(b"\n") else first
    body = body[:-1] if body.endswith(b"\r") else body
    return b"\r" in body


_LINE_END = re.compile(rb"[\r\n]")


class UniversalLines:
    """A binary file read line by line where a line ends in ``\n``, ``\r\n`` or a lone ``\r`` (classic
    Mac, Excel for Mac's "CSV (Macintosh)"), all in one file if need be. :meth:`readline` returns each line
    ending in ``\n`` (a lone ``\r`` swapped for it) and exactly as long as the bytes it took, so sizes and
    offsets stay those of the file and :func:`read_line`, checkpoints and ``seek`` work unchanged.

    Why: read on ``\n`` alone, a ``\r`` file was one line (nothing published, exit 0), and rows that a
    lone ``\r`` split inside one ``\n`` line shared one offset, so one event id. Buffered: a line costs
    no system call of its own."""

    CHUNK = 1 << 16

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._buf = b""
        self._at = 0
        self._eof = False

    def readline(self, limit: int = -1, /) -> bytes:
        limit = limit if limit >= 0 else 1 << 62
        while True:
            found = _LINE_END.search(self._buf, self._at, self._at + limit)
            if found is not None:
                end = found.start()
                if self._buf[end] == 0x0A:  # "\n"
                    line, self._at = self._buf[self._at : end + 1], end + 1
                    return line
                if end + 1 < len(self._buf) or self._eof:  # "\r": the next byte tells "\r\n" from a lone "\r"
                    if self._buf[end + 1 : end + 2] == b"\n":
                        line, self._at = self._buf[self._at : end + 2], end + 2
                        return line
                    line, self._at = self._buf[self._at : end] + b"\n", end + 1
                    return line
            elif len(self._buf) - self._at >= limit:
                line = self._buf[self._at : self._at + limit]
                self._at += limit
                return line
            elif self._eof:
                line, self._buf, self._at = self._buf[self._at :], b"", 0
                return line
            more = self._fh.read(self.CHUNK)
            if not more:
                self._eof = True
                continue
            self._buf = self._buf[self._at :] + more
            self._at = 0

    def seek(self, offset: int, /) -> int:
        self._buf, self._at, self._eof = b"", 0, False
        return self._fh.seek(offset)

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        self._fh.close()
