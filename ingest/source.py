"""The source contract: what a file, folder or generator source gives the one runner (ingest/runner.py).

Why one contract: the tailer, the image drop folder, sensor CSV and the generators used to publish,
wait for acks, checkpoint and recover each in their own way (and sensor CSV not at all). Now a source
only *reads its input*; :class:`ingest.runner.SourceRunner` owns everything after that: publish ->
ack -> checkpoint -> read-back after a kill -9 -> backpressure -> dead letters. It follows bytewax's
``StatefulSourcePartition``: ``next_batch()`` and ``snapshot()``, built from the last durable
snapshot (``resume_state``).

**The resume contract** (what a source promises, what the runner promises back):

1. ``next_batch()`` returns the next items in input order (``[]``: nothing now, ask again after
   ``poll_s``; ``StopIteration``: the input is done).
2. ``snapshot()`` is called right after each non-empty batch and returns a JSON object from which a
   source built with it as ``resume_state`` continues *after* that batch.
3. Every item has an ``event_id`` that is a function of its input position only (same file, same
   offset: same id, in every run). The runner puts it in the ``sl.event_id`` header of a published
   record and in the key of a dead letter.
4. The runner makes a snapshot durable only after every item of its batch and of all earlier
   batches is acknowledged by Kafka, and calls :meth:`SourcePartition.commit` for each batch, in order,
   before that. So a restart never skips an unacked item (no gap).
5. Items sent after the durable snapshot may have been acked before a kill -9; the runner finds their
   ids on the topics (from the *floors* it keeps beside the snapshot) and does not send them again
   (no duplicate). A source therefore re-reads from its snapshot without any bookkeeping of its own.

Example (a source of three fixed readings; the runner drives it the same way)::

    >>> def readings():
    ...     return ({"value": v} for v in (20.5, 21.0, 19.5))
    >>> src = IterSource("sensor", readings(), name="demo", batch=2)
    >>> [i.event_id for i in src.next_batch()], src.snapshot()
    (['demo:0', 'demo:1'], {'index': 2})
    >>> again = IterSource("sensor", readings(), name="demo", batch=2, resume_state={"index": 2})
    >>> [i.record for i in again.next_batch()]
    [{'value': 19.5}]
    >>> again.next_batch()
    Traceback (most recent call last):
    ...
    StopIteration
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.lines import cr_only, read_line, tail_hash

if TYPE_CHECKING:
    from streaming.config import Settings
    from streaming.eventtime import EventTimePolicy

log = logging.getLogger(__name__)

#: What the runner did with an item (``SourceItem.outcome``).
PUBLISHED, DEAD_LETTERED, NOTHING = "P", "R", ""


#: Magic bytes of compressed files (a rotated log is usually ``access.log.2.gz``).
_COMPRESSED = ((b"\x1f\x8b", "gzip", "zcat"), (b"BZh", "bzip2", "bzcat"), (b"\xfd7zXZ\x00", "xz", "xzcat"),
               (b"\x28\xb5\x2f\xfd", "zstd", "zstdcat"))


def compressed(head: bytes, path: object) -> str | None:
    """A message when ``head`` (a file's first bytes) is a compressed file, else None. Read as text, a
    gzipped log became one 'not_combined_format' dead letter per random newline and nothing else."""
    for magic, name, cat in _COMPRESSED:
        if head.startswith(magic):
            return f"{path} is {name}-compressed, not text: decompress it first ({cat} {path} > FILE) and ingest FILE"
    return None


def text_name(name: str) -> str:
    """A file name or path as record text: bytes that are not UTF-8 (a latin-1 name from an old share,
    which Python holds as lone surrogates) become ``\\xNN`` escapes, as the log parser writes them.
    Avro strings are UTF-8: put in as they were, such a name made every record of the file unpublishable
    (and, before the serializer named the field, crashed the image watcher on every start)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass
class FilePosition:
    """The snapshot of a source that reads one regular file front to back (sensor CSV, ``publish --file``).

    The file's identity (path, inode, sha1 of its first line) and the byte offset and line number after
    the last line handed out. ``generation`` goes up when the file changed while its source was down, so
    that a rewritten file's lines get new event ids instead of being taken for already-published ones.
    """

    path: str
    inode: int = 0
    fingerprint: str = ""  # sha1 of the first line (at most head_bytes of it)
    generation: int = 0
    offset: int = 0  # byte offset after the last line handed out (0: not started)
    line: int = 0  # number of the last line handed out (0: none)
    #: sha1 of the :data:`TAIL_BYTES` before ``offset`` ("" in checkpoints written before it existed). Why:
    #: a CSV's first line is its header, so a file truncated and rewritten in place under the same header,
    #: and again as long, matched inode and fingerprint and resumed mid-row of the new content.
    tail: str = ""

    @property
    def identity(self) -> str:
        return f"{self.path}#{self.inode}.{self.generation}.{self.fingerprint[:16]}"

    def snapshot(self, tail: str | None) -> dict[str, Any]:
        """The position as a JSON object with ``tail``, the :func:`tail_hash` its reader took when it read up
        to ``offset`` (before any wait: bytes hashed at snapshot time would be those of a file rewritten
        meanwhile, and the next run would take the new content for the old)."""
        self.tail = tail or ""
        return asdict(self)

    @classmethod
    def _tail_of(cls, path: Path, inode: int, offset: int) -> str | None:
        """:func:`tail_hash` of ``path`` at ``offset`` when it is still file ``inode``, else None."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        try:
            return tail_hash(fd, offset) if os.fstat(fd).st_ino == inode else None
        finally:
            os.close(fd)

    def at_end(self) -> bool:
        """True when a run already handed out the whole file (its size is at most the saved offset)."""
        try:
            return 0 < self.offset and Path(self.path).stat().st_size <= self.offset
        except OSError:
            return False

    @classmethod
    def resume(cls, path: Path, resume_state: dict[str, Any] | None, what: str, *, head_bytes: int) -> FilePosition:
        """Where a source of ``path`` (absolute) starts: the saved position when the file is the one it
        was taken of (same inode and first line, at least as long), else the start as a new generation.
        ``what`` names the input in errors (``--csv F``). Raises SourceError when the file cannot be read
        or the checkpoint belongs to another file."""
        from ingest.exceptions import SourceError

        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{what}: {not_a_file(path, 'this source', st.st_mode)}")
            inode, size = st.st_ino, st.st_size
            with path.open("rb") as fh:
                first = read_line(fh, head_bytes, skip=False)[0]
                if cr_only(first):  # the header, not the whole (growing) file read as one line
                    first = first[: first.index(b"\r") + 1]
                fingerprint = hashlib.sha1(first).hexdigest()
        except OSError as exc:
            raise SourceError(f"{what}: cannot read ({exc})") from exc
        pos = cls(str(path), inode, fingerprint)
        if resume_state is None:
            return pos
        saved = cls(**{k: v for k, v in resume_state.items() if k in cls.__dataclass_fields__})
        if saved.path != str(path) and canonical_path(saved.path, whole=True) != canonical_path(path, whole=True):
            raise SourceError(f"the checkpoint belongs to {saved.path}, not {path}; pass another --checkpoint")
        same_bytes = saved.fingerprint == fingerprint and size >= saved.offset and (
            not saved.tail or cls._tail_of(path, inode, saved.offset) == saved.tail)
        if same_bytes and saved.inode == inode:
            return saved
        if same_bytes and saved.tail:
            # Another inode with the same first line and the same bytes before the saved offset: the file was
            # saved again by writing a copy and renaming it over (exporters, rsync, Excel), not replaced by
            # other data. Read as a new generation, every row was published a second time. The position keeps
            # its identity (record ids), so what an interrupted run sent is still recognised.
            log.info("%s is another file now (a save by rename) with the same bytes up to the checkpoint; "
                     "resuming at line %d", path, saved.line + 1)
            return saved
        log.warning("%s changed since its checkpoint (other file, first line, shorter, or other bytes before the "
                    "saved offset); reading it from the start as a new generation", path)
        pos.generation = saved.generation + 1
        return pos


def not_a_file(path: Path, what: str, mode: int) -> str:
    """The error of a path that is not a regular file (``mode``: its ``st_mode``). A FIFO, pipe or device:
    a file source resumes from byte offsets and reads a file's head twice (identity, timestamp unit),
    which a pipe cannot give; read through one, the first read ate the data and the run published
    nothing, saying it was done."""
    if stat.S_ISDIR(mode):
        return f"{path} is a directory; pass a file"
    return (f"{path} is not a regular file (a FIFO, pipe or device), and {what} resumes from byte offsets, so "
            "it needs a file it can read again: write the data to a file first (or pipe JSON lines to "
            "`streamlearn publish KIND --stdin`)")


def policy_flags(policy: EventTimePolicy, timestamp_unit: str) -> dict[str, Any]:
    """The event-time flags that decide what becomes of a line: part of a file checkpoint's key."""
    flags = {"timestamp_unit": timestamp_unit, "backfill": policy.backfill,
             "max_age_ms": policy.max_age_ms, "max_future_ms": policy.max_future_ms}
    if policy.timezone:  # only when set: the keys of checkpoints written before the flag existed stay
        flags["timezone"] = policy.timezone
    return flags


#: Longest file name a state file may carry: ``.<name>.<16 hex>.json.compact`` and ``<...>.json.lock``
#: must stay within the usual 255-byte limit of a file name.
_STATE_NAME_MAX_BYTES = 224


def source_state_dir(settings: Settings, source: str) -> Path:
    """Where the checkpoints of one kind of source live: ``HOME/state/<source>``, and under it one folder per
    topic namespace (``<prefix><tenant>.``) other than the default one.

    Why: a checkpoint is keyed by the file and the flags, not by where its records go. The same CSV ingested
    for a second tenant (or with another topic prefix) found the first tenant's finished checkpoint, said
    "published to its end by an earlier run" and published nothing to the second tenant's topic. Runs
    without a namespace keep the folder they always had, so their checkpoints still resume.
    """
    folder = settings.state_dir / source
    if settings.namespace:
        digest = hashlib.sha1(settings.namespace.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        folder = folder / f"ns-{state_name(settings.namespace.rstrip('.'))[:60]}-{digest}"
    return folder


def state_name(name: str) -> str:
    """``name`` as the readable part of a state file's name: as it is when it fits, else cut to 200
    bytes (the key beside it is what tells files apart). A 240-character file name made every run of
    its input end in "File name too long"; names that fit keep the name they always had."""
    raw = os.fsencode(name)
    if len(raw) <= _STATE_NAME_MAX_BYTES:
        return name
    return os.fsdecode(raw[:200])  # a character cut in two stays its bytes (surrogate escapes)


def file_checkpoint_path(folder: Path, path: Path, flags: dict[str, Any]) -> Path:
    """Checkpoint of one file read with one set of ``flags``: ``folder/<name>.<key>.json``, the key a
    sha1 of the absolute path and the flags. The same command resumes (or, finished, publishes nothing);
    the same file with other flags (``--backfill`` after a live run refused the history) is a run of its
    own."""
    def at(where: Path) -> Path:
        key_text = f"{where}\0{json.dumps(flags, sort_keys=True)}"
        key = hashlib.sha1(key_text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        return folder / f"{state_name(where.name)}.{key}.json"

    return keyed_state(Path(path).absolute(), canonical_path(path, whole=True), at)


def keyed_state(given: Path, canonical: Path, at: Callable[[Path], Path],
                found: Callable[[Path], bool] = Path.exists) -> Path:
    """The state file ``at(canonical)``, unless only ``at(given)`` is ``found``: a state written before
    keys were canonical (under the path as the user spelled it), which that run resumes. One rule for the
    CSV and JSON-lines checkpoints, the followed log's and the drop folder's journal (``found`` tests
    the file that proves a state exists, which for the drop folder is its journal)."""
    own = at(canonical)
    if canonical != given and not found(own) and found(at(given)):
        return at(given)
    return own


def canonical_path(path: Path | str, *, whole: bool = False) -> Path:
    """``path`` with its directory resolved (``..``, ``.`` and directory links) and, with ``whole``, its own
    name too. Why: ``in/../in/x.csv``, the file through a linked directory or a link to it was another
    checkpoint, so the same file was published again. A file read once (CSV, ``publish --file``) is keyed
    ``whole``; a followed log keeps its last component as named (``current``, a link switched at
    rotation, stays the path it is, not the file it names today)."""
    p = Path(path).absolute()
    return Path(os.path.realpath(p)) if whole else Path(os.path.realpath(p.parent)) / p.name


@dataclass(eq=False)
class SourceItem:
    """One input item: an event to publish, or original bytes to dead-letter with a reason.

    ``record`` set: publish it to the source's raw topic. ``error`` set: dead-letter ``raw`` with
    it (``source`` becomes the ``dl.source_*`` headers, e.g. file, line, reason). Neither: nothing to
    send (a blank line, a file already journaled) - the item only moves the position on.
    """

    event_id: str
    raw: bytes = b""
    record: dict[str, Any] | None = None
    error: BaseException | None = None
    source: dict[str, str] = field(default_factory=dict)
    stage: str = "validate"
    key: str | bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    #: Set by the runner: PUBLISHED / DEAD_LETTERED (sent now, or found on the topic after a crash,
    #: then ``skipped`` is True) or NOTHING.
    outcome: str = NOTHING
    skipped: bool = False
    #: Source-specific payload the source wants back in :meth:`SourcePartition.commit`.
    ref: Any = None


class SourcePartition:
    """Base of every source: override ``next_batch`` and ``snapshot``; the rest is optional."""

    #: Topic kind (``weblog``, ``sensor``, ``image``): the raw and dead-letter topics it writes.
    kind: str = ""
    #: Seconds the runner waits after an empty batch before asking again.
    poll_s: float = 0.2
    #: Human name of the input (file, folder, generator) for logs and errors.
    name: str = ""

    def next_batch(self) -> list[SourceItem]:
        """The next items in input order; ``[]`` when there is nothing now; StopIteration when done."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        """JSON state that resumes after every item handed out so far (see the resume contract)."""
        raise NotImplementedError

    def commit(self, items: list[SourceItem]) -> None:
        """All ``items`` (one batch) are acked; make any source-side effect durable now (e.g. journal
        and move image files). Called in batch order, before the runner raises its read-back floors
        past them. Default: nothing."""

    def refused(self, item: SourceItem, exc: BaseException) -> None:
        """The publisher refused ``item.record`` (schema, size): turn the item into a dead letter."""
        item.record, item.error = None, exc
        item.source = {**item.source, "reason": "schema"}

    def close(self) -> None:
        """Release files and handles (called once, also after an error)."""


class PositionIds:
    """Deterministic ids of items at byte offsets of one input identity (path, inode, generation...).

    ``sha1(identity + NUL + "@<offset>")``; the sha1 state of the identity is computed once and copied
    per item, since a log source makes one id per line.
    """

    def __init__(self) -> None:
        self._identity: str | None = None
        self._base = hashlib.sha1()

    def at(self, identity: str, offset: int) -> str:
        if identity != self._identity:
            self._identity = identity
            self._base = hashlib.sha1(identity.encode("utf-8", "backslashreplace") + b"\x00")
        h = self._base.copy()
        h.update(b"@%d" % offset)
        return h.hexdigest()


class IterSource(SourcePartition):
    """A deterministic record iterator (the demo generators) as a source.

    ``check`` turns a record into the record to publish or raises an error with a ``reason`` (then
    the record's JSON is dead-lettered). ``snapshot`` is the count handed out, so a source resumed
    from it skips that many records of the same (seeded) iterator.
    """

    def __init__(self, kind: str, records: Iterable[dict[str, Any]], *, name: str,
                 check: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 errors: tuple[type[BaseException], ...] = (ValueError,),
                 headers: list[tuple[str, bytes]] | None = None,
                 key: Callable[[dict[str, Any]], str | bytes | None] | None = None,
                 batch: int = 1000, resume_state: dict[str, Any] | None = None) -> None:
        self.kind, self.name = kind, name
        self._it: Iterator[dict[str, Any]] = iter(records)
        self._check, self._errors, self._headers, self._key = check, errors, headers or [], key
        self._batch = batch
        self.index = 0
        skip = int((resume_state or {}).get("index", 0))
        for _ in range(skip):
            if next(self._it, None) is None:
                break
            self.index += 1

    def next_batch(self) -> list[SourceItem]:
        out: list[SourceItem] = []
        for record in self._it:
            self.index += 1
            out.append(self._item(record, self.index))
            if len(out) >= self._batch:
                break
        if not out:
            raise StopIteration
        return out

    def _item(self, record: dict[str, Any], n: int) -> SourceItem:
        item = SourceItem(event_id=f"{self.name}:{n - 1}", headers=self._headers,
                          source={"file": self.name, "line": str(n)})
        try:
            item.record = self._check(record) if self._check else record
            item.key = self._key(item.record) if self._key else None
        except self._errors as exc:
            reasons = getattr(exc, "reasons", None) or [getattr(exc, "reason", type(exc).__name__)]
            item.error, item.raw = exc, json.dumps(record, default=str, allow_nan=True).encode()
            item.source.update(reason=str(reasons[0]), reasons=",".join(str(r) for r in reasons))
        return item

    def refused(self, item: SourceItem, exc: BaseException) -> None:
        """The dead letter of a refused record is its JSON (bytes fields as text)."""
        item.raw = json.dumps(item.record, default=str, allow_nan=True).encode()
        super().refused(item, exc)

    def snapshot(self) -> dict[str, Any]:
        return {"index": self.index}

