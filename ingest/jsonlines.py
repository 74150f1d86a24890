"""JSON-lines events (``streamlearn publish KIND --file F`` / ``--stdin``) as a source of the one runner.

Why a source: ``publish --file`` used to be a one-shot loop with no checkpoint, so the same command run
again after a crash published every line again (20,000 lines killed after 4 s and re-run: 12,437
duplicates), and it kept a future per line until the end (memory grew with the file). As a source of
:class:`ingest.runner.SourceRunner` it gets what every file source has: at most ``max_in_flight`` lines
waiting for acks, a checkpoint written only after the lines before it are acked, and on restart a
read-back of what was acked after the checkpoint, so a re-run resumes after the last acknowledged line
with nothing lost or doubled.

Resume is the sensor CSV's (:class:`ingest.source.FilePosition`): the file's identity (path, inode,
sha1 of its first line) and the offset after the last line handed out; a file changed while the source
was down is read from its start as a new generation. A run that finished leaves its checkpoint at the
end: the same command again publishes nothing (delete the checkpoint, printed, to publish it again).
The key is the file *and* the flags that decide a line's fate, so ``--backfill`` after a live run is a
run of its own. Standard input cannot be read again: it has no checkpoint, and a re-run sends anew.

Lines are read as bytes, at most :data:`~streaming.limits.MAX_JSON_BYTES` of one in memory: a line that
is not UTF-8, over the limit, not JSON, or not a valid event is dead-lettered with its reason and the
run goes on. A UTF-8 byte-order mark before the first line is skipped.
"""

from __future__ import annotations

import codecs
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ingest.exceptions import InputRejectedError, SourceError
from ingest.lines import BUSY, SETTLED, TailCache, last_line_state, read_line
from ingest.source import (
    FilePosition,
    PositionIds,
    SourceItem,
    SourcePartition,
    compressed,
    file_checkpoint_path,
    policy_flags,
    source_state_dir,
)
from schemas.exceptions import RecordValidationError
from streaming.eventtime import EventTimePolicy, TimestampReader
from streaming.exceptions import EventTimeError
from streaming.jsoncodec import from_json
from streaming.limits import MAX_JSON_BYTES, InputLimitError, bounded_json
from streaming.topics import KINDS

if TYPE_CHECKING:
    from streaming.config import Settings

log = logging.getLogger(__name__)

#: Lines ``--timestamp-unit auto`` reads ahead in a file to decide the unit.
LOOKAHEAD = 100

#: One input line: its number, its bytes, and its text or why it has none.
Line = tuple[int, bytes, str | InputRejectedError]


class LineReader:
    """The physical lines of a binary stream from a byte offset, each at most ``MAX_JSON_BYTES`` in
    memory; ``offset`` and ``line`` follow the last line read (blank lines included)."""

    def __init__(self, fh: BinaryIO, name: str, *, offset: int = 0, line: int = 0, path: Path | None = None) -> None:
        self.fh, self.name = fh, name
        self.offset, self.line = offset, line
        self.eof = False
        #: The file (None for a stream): an unterminated last line waits for it to settle (``last_line_state``).
        self.path = path
        self._tail = TailCache()

    def tail_at(self, offset: int) -> str | None:
        """The hash of the bytes before ``offset`` as they were read (:class:`~ingest.lines.TailCache`)."""
        return self._tail.at(self.fh.fileno(), offset)

    def next(self) -> tuple[int, int, bytes, str | InputRejectedError | None]:
        """(number, start offset, bytes, text | its error | None for a blank line); ``eof`` set at the end."""
        start = self.offset
        while True:
            raw, size = read_line(self.fh, MAX_JSON_BYTES)
            if self.path is None or not raw or raw.endswith(b"\n") or size > len(raw):
                break
            self.tail_at(start)  # before the wait: the bytes as they were read
            state = last_line_state(self.fh.fileno(), start + size, raw)
            if state == SETTLED:
                break
            self.fh.seek(start)  # read it again, longer, or leave it for the next run
            if state == BUSY:
                log.warning("--file %s: its last line (line %d) is still being written; it is left for the next run",
                            self.name, self.line + 1)
                raw = b""
                break
        if not raw:
            self.eof = True
            return self.line, start, b"", None
        self.offset += size
        self.line += 1
        over = size > len(raw)  # only its head came back (before the BOM is taken off)
        if start == 0 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if start == 0 and (packed := compressed(raw[:8], self.name)) is not None:
            raise SourceError(packed)  # not one bad_encoding dead letter per random newline
        if over:
            return self.line, start, raw, InputRejectedError(
                f"line is {size} bytes, over the {MAX_JSON_BYTES}-byte limit of one JSON event; "
                "send a smaller event", "line_too_long")
        if not raw.strip():
            return self.line, start, raw, None
        try:
            return self.line, start, raw, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self.line, start, raw, InputRejectedError(
                f"line is not UTF-8 ({exc}); convert the file to UTF-8", "bad_encoding")


def decide_unit(reader: TimestampReader, lines: Iterable[Line]) -> None:
    """``auto``: decide the timestamp unit once from the first lines' ``timestamp`` values (a file is
    read ahead; standard input decides at its first number instead)."""
    if reader.decided is not None:
        return
    stamps = []
    for _, _, line in lines:
        if not isinstance(line, str):
            continue
        try:
            obj = bounded_json(line, "line")
        except ValueError:
            continue
        if isinstance(obj, dict) and "timestamp" in obj:
            stamps.append(obj["timestamp"])
    reader.decide(stamps)


def event_from_line(kind: str, line: str, reader: TimestampReader, policy: EventTimePolicy) -> dict[str, Any]:
    """One JSON line -> a record of ``kind`` with its timestamp read and checked (raises on any problem)."""
    record = from_json(KINDS[kind], bounded_json(line, "line"))
    if kind == "sensor":
        from ingest.exceptions import SensorValidationError
        from ingest.sensors import validate

        found: list[SensorValidationError] = []
        if "timestamp" in record:
            try:
                record["timestamp"] = reader(record["timestamp"])
            except EventTimeError as exc:
                found.append(SensorValidationError(str(exc), exc.reason))
                del record["timestamp"]
        record.setdefault("values", {})
        return validate(record, policy=policy, problems=found)
    if "timestamp" not in record:
        raise EventTimeError(f"{KINDS[kind]} needs a timestamp (epoch number or ISO 8601 text)", "bad_timestamp")
    record["timestamp"] = policy.check(reader(record["timestamp"]))
    if kind == "weblog":  # as `ingest weblog` refuses it: a field the features cannot use
        from ingest.weblog import usable

        return usable(record)
    return record


def reasons_of(exc: BaseException) -> str:
    """Short reason codes (``dl.source_reason(s)``), as the ingest sources write them: a record that breaks
    its schema is ``schema`` (its ``reason`` is the sentence already in the message), not the sentence."""
    if isinstance(exc, RecordValidationError):
        return "schema"
    if isinstance(exc, InputLimitError):  # bounded_json's refusals: as the log tailer names them
        return "bad_json"
    reasons = getattr(exc, "reasons", None) or [getattr(exc, "reason", None) or type(exc).__name__]
    return ",".join(str(r) for r in reasons)


def default_checkpoint_path(settings: Settings, kind: str, path: Path, *, policy: EventTimePolicy,
                            timestamp_unit: str) -> Path:
    """Checkpoint of ``publish KIND --file PATH`` with one set of flags, under ``state_dir/publish/KIND``."""
    return file_checkpoint_path(source_state_dir(settings, "publish") / kind, path,
                                policy_flags(policy, timestamp_unit))


class JsonLinesSource(SourcePartition):
    """The lines of a JSON-lines file (``path``) or of a stream (``stream``, called ``name``: standard input,
    a FIFO) as items.

    Each line is an event of ``kind`` (see :func:`event_from_line`); a line that is not becomes a dead
    letter of stage ``publish`` with its reasons, and ``on_reject(line number, reasons, error)`` is
    called so the command can say so. See the module docstring for resume.
    """

    def __init__(self, kind: str, *, path: Path | None = None, stream: BinaryIO | None = None,
                 name: str = "stdin", resume_state: dict[str, Any] | None = None, policy: EventTimePolicy,
                 timestamp_unit: str = "auto", batch: int = 1000, on_reject: Any = None) -> None:
        if (path is None) == (stream is None):
            raise ValueError("JsonLinesSource needs exactly one of path= and stream=")
        self.kind, self.policy, self.on_reject = kind, policy, on_reject
        self._headers = policy.headers()
        self._ids = PositionIds()
        if path is not None:
            self.given = str(path)  # the file as the user named it: dl.source_file
            absolute = Path(path).absolute()
            self.name = str(absolute)
            self.pos: FilePosition | None = FilePosition.resume(absolute, resume_state, f"--file {path}",
                                                                head_bytes=MAX_JSON_BYTES)
            try:
                fh: BinaryIO = absolute.open("rb")
            except OSError as exc:
                raise SourceError(f"--file {path}: cannot read ({exc})") from exc
            self.lines = LineReader(fh, self.given, offset=self.pos.offset, line=self.pos.line, path=absolute)
            self.lines.fh.seek(self.pos.offset)
            self.batch = batch
        else:
            assert stream is not None
            self.given = self.name = name
            self.pos = None
            self.lines = LineReader(stream, name)
            # Standard input is often a pipe fed as events happen: hand each line on as it comes, rather
            # than wait for a batch to fill (no snapshot is kept for it, so a batch buys nothing).
            self.batch = 1
        self.reader = self.policy.reader(timestamp_unit, source=self.given)
        if path is not None and self.reader.decided is None:
            decide_unit(self.reader, self._head(Path(path).absolute()))

    def _head(self, path: Path) -> Iterator[Line]:
        """The first :data:`LOOKAHEAD` non-blank lines of the file, from its start (also when resuming
        mid-file, so a resumed run decides ``auto`` as the first run did)."""
        with path.open("rb") as fh:
            head = LineReader(fh, self.given)
            seen = 0
            while seen < LOOKAHEAD:
                lineno, _, raw, text = head.next()
                if head.eof:
                    return
                if text is not None:
                    seen += 1
                    yield lineno, raw, text

    def next_batch(self) -> list[SourceItem]:
        out: list[SourceItem] = []
        lines = self.lines
        while len(out) < self.batch:
            lineno, start, raw, text = lines.next()
            if lines.eof:
                break
            if text is None:
                continue
            out.append(self._item(lineno, start, raw, text))
        if self.pos is not None:
            self.pos.offset, self.pos.line = lines.offset, lines.line
        if not out and lines.eof:
            raise StopIteration
        return out

    def _item(self, lineno: int, start: int, raw: bytes, text: str | InputRejectedError) -> SourceItem:
        event_id = self._ids.at(self.pos.identity, start) if self.pos is not None else f"{self.name}:{lineno}"
        item = SourceItem(event_id, raw.rstrip(b"\r\n"), source={"file": self.given, "line": str(lineno)},
                          stage="publish", headers=self._headers)
        try:
            if not isinstance(text, str):
                raise text
            item.record = event_from_line(self.kind, text, self.reader, self.policy)
        except (ValueError, RecordValidationError) as exc:
            # ValueError: EventTimeError, InputRejectedError and bounded_json's refusals. RecordValidationError:
            # valid JSON that is no event ([1, 2], null, a string; data that is not base64). Uncaught, one
            # such line ended the run with nothing dead-lettered, and every re-run ended there again.
            self._reject(item, exc)
        return item

    def _reject(self, item: SourceItem, exc: BaseException) -> None:
        reasons = reasons_of(exc)
        item.record, item.error = None, exc
        item.source = {**item.source, "reason": reasons.split(",")[0], "reasons": reasons}
        if self.on_reject is not None:
            self.on_reject(item.source["line"], reasons, exc)

    def refused(self, item: SourceItem, exc: BaseException) -> None:
        """The publisher refused the record (schema, size, key): the line's own bytes are dead-lettered."""
        self._reject(item, exc)

    def snapshot(self) -> dict[str, Any]:
        assert self.pos is not None, "standard input has no snapshot"
        return self.pos.snapshot(self.lines.tail_at(self.pos.offset))

    def close(self) -> None:
        if self.lines.fh is not sys.stdin.buffer:
            self.lines.fh.close()
