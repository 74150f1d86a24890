"""The image drop folder behind ``ingest images --watch`` (validation lives in ``ingest/image_check.py``).

Validation reads the container headers itself, so a hostile file is rejected before Pillow
allocates anything: magic bytes, extension vs. content (a ``.png`` holding JPEG bytes is
rejected), dimensions declared in the PNG IHDR / JPEG SOF header (each side <= 4096 and
<= 16 Mpx: decompression bombs), truncation (a PNG must end with its IEND chunk, a JPEG with
the FFD9 marker). Only then is the image decoded once by Pillow (with its pixel cap set) to
catch corrupt data in the middle.

Other formats are recognized by their magic bytes and rejected with a reason that names them
(``unsupported_format``: PDF, ISO media other than AVIF/HEIC; GIF, BMP, TIFF, WebP, ICO, netpbm, AVIF
and HEIC are converted to PNG by ``accept``); a GIF's declared logical screen
is checked first (``too_many_pixels`` for a 32767x32767 screen), animated PNGs (APNG, an
``acTL`` chunk) are ``animated``, and unknown bytes are ``bad_magic``.

The drop folder is complete (docs/EVENT_TIME.md "The image drop folder"): every regular file in
it, whatever its name, ends up published (moved to ``processed/``) or dead-lettered with a reason
(moved to ``rejected/`` beside a ``<name>.reason`` file). Exceptions, all documented: names
starting with a dot (the convention for files still being written, e.g. rsync's temporaries),
sidecar ``.label`` files (they move with their image; one whose image never arrives is rejected
as ``orphan_label`` once settled), sub-directories (``processed/``, ``rejected/``), and files not
yet settled: a file is taken only once its size and mtime stayed unchanged for ``settle_s``
(also with ``--once`` and ``--idle-exit``, which wait for them up to ``max_settle_wait_s`` more and
then log each file they leave in place).

Exactly-once watcher (see :class:`ImageWatcher`): the folder is a source of the one runner
(``ingest/runner.py``, contract in ``ingest/source.py``); an image's event id is the sha256 of its
bytes. When the runner commits a batch (every item acked), a journal (``ingest.checkpoint.HashJournal``)
records each file's sha256 with ``P`` (published) or ``R`` (rejected, dead-lettered), and only then is
the file moved to ``processed/`` or ``rejected/`` (with a ``.reason`` file). On restart a ``P``/``R``
file is only moved; a file sent but not journaled (killed between the ack and the journal) is found
on the topics by the runner's read-back from its floors (``<state>.floors.json``) and journaled with
what was found, not sent again. So kill -9 at any point gives no loss and no duplicate. The snapshot
is empty: the journal and the folder itself are the position. (Journals of earlier versions may hold
``I`` intents: such files are resolved by the same read-back.)

Names in ``processed/`` and ``rejected/`` (``ingest/image_moves.py``): a file keeps its name unless
that name, or a sidecar name it could have there (``<name>.label``, ``<name>.reason``,
``<name>.duplicate``, ``<stem>.label``), is taken; then it becomes ``<stem>.<12 hex of its sha256><ext>``
(``-2``, ``-3``... after that), and its label and note files follow the name it got, so an earlier
file's sidecars are never overwritten. Where each file went is journaled too (``<state>.names``, the
journal's format with the hex of ``[source, target, label]`` as tag), before it is moved, so a move cut
short by a kill ends under the same name.

The same bytes under another name (a re-upload, a copy) are the same event id: never sent twice. The copy
gets its own verdict all the same: valid, it goes to ``processed/`` beside ``<name>.duplicate``, which
names the file the bytes were published from and, when they differ, both labels (the copy's label is
not published: the record keeps the first one); refused, it goes to ``rejected/`` beside its ``.reason``
with the same duplicate line (it is not dead-lettered again). A copy valid where the first was refused
(its file time, say) is left for the next scan, which publishes it (a ``--once`` run makes that scan before it
ends: it is not over while a sent batch waits for its commit). Each is logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.checkpoint import HashJournal, read_json
from ingest.exceptions import ImageValidationError, SourceError
from ingest.image_check import (  # noqa: F401 (re-exported: callers import them from here)
    MAX_FILE_BYTES,
    MAX_PIXELS,
    MAX_SIDE,
    ImageInfo,
    _file_sha256,
    accept,
    image_record,
    inspect,
    label_for,
    sniff,
)
from ingest.image_moves import Plan, carry_out, label_key, names_entry, names_tag, place
from ingest.runner import SourceRunner
from ingest.source import PUBLISHED, SourceItem, SourcePartition, keyed_state, source_state_dir, text_name
from streaming.eventtime import EventTimePolicy

if TYPE_CHECKING:
    import threading

    from streaming.config import Settings
    from streaming.producer import Publisher

log = logging.getLogger(__name__)


@dataclass
class _Item:
    path: Path
    data: bytes
    digest: str
    record: dict[str, Any] | None
    error: ImageValidationError | None


class _DropFolder(SourcePartition):
    """The contract side of :class:`ImageWatcher` (kept apart so the watcher's own ``close`` closes
    its journal, while the runner's ``close`` after each run leaves it open for the next run)."""

    kind = "image"

    def __init__(self, watcher: ImageWatcher) -> None:
        self.watcher = watcher
        self.name = str(watcher.directory)

    @property
    def poll_s(self) -> float:  # type: ignore[override]
        return self.watcher.poll_s

    def next_batch(self) -> list[SourceItem]:
        return self.watcher._next_batch()

    def snapshot(self) -> dict[str, Any]:
        return {}  # the journal and the folder are the position

    def commit(self, items: list[SourceItem]) -> None:
        self.watcher._commit(items)

    def refused(self, item: SourceItem, exc: BaseException) -> None:  # over the record size limit, bad label
        it: _Item = item.ref
        it.record, it.error = None, ImageValidationError(f"cannot be published: {exc}", "unpublishable")
        item.record, item.error = None, it.error
        item.raw = it.data
        item.source = {"file": str(it.path), "reason": "unpublishable"}


class ImageWatcher:
    """Publish each new image of ``directory`` once, then move it to processed/ or rejected/."""

    #: Entries of the names journal kept (most recent first): a copy of bytes older than that is still
    #: never sent again (the hash journal says so), but its note cannot name the first file.
    NAMES_KEPT = 100_000
    TRUNCATED_GRACE_SETTLES = 10

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        directory: Path,
        *,
        state_path: Path | None = None,
        batch_size: int = 32,
        settle_s: float = 1.0,
        max_settle_wait_s: float = 60.0,
        policy: EventTimePolicy | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.directory = Path(directory).absolute()
        if not self.directory.is_dir():
            raise SourceError(f"--watch {directory}: not a directory; create it or pass an existing one")
        self.processed = self.directory / "processed"
        self.rejected = self.directory / "rejected"
        self.processed.mkdir(exist_ok=True)
        self.rejected.mkdir(exist_ok=True)
        base = state_path or self._state_base(settings)
        self.journal = HashJournal(base.with_suffix(".journal"))
        #: Where the file of each event id went (``processed/x.png``), so a copy's note can name it.
        self.names = HashJournal(base.with_suffix(".names"), max_entries=self.NAMES_KEPT)
        self.floors_path = base.with_suffix(".floors.json")
        self.batch_size = batch_size
        self.settle_s = settle_s
        self.max_settle_wait_s = max_settle_wait_s
        #: A settled file that is cut short is read again until it is this old (10 s at the default
        #: --settle of 1 s): a writer that paused longer than settle_s is likely still writing it.
        self.truncated_grace_s = self.TRUNCATED_GRACE_SETTLES * settle_s
        #: Window for the event time of a file (its mtime): the shared event-time policy.
        self.policy = policy or EventTimePolicy()
        self._headers = [*self.policy.headers()]
        self.unsettled: list[Path] = []
        self._seen: dict[Path, tuple[int, int]] = {}
        self._queue: list[Path] = []
        self._taken: set[Path] = set()  # handed to the runner, not yet moved
        self._odd: set[str] = set()  # entries that are neither regular files nor directories, logged once
        self._in_flight: set[str] = set()  # digests sent, not yet journaled
        self.follow, self.poll_s, self._started = True, 0.5, time.monotonic()
        self.idle_exit_s: float | None = None
        self._active = self._started  # when a file was last handed out (for idle_exit_s)
        self.published = 0
        self.rejected_count = 0
        self.duplicates = 0  # copies of bytes already published or rejected: moved beside a note, not sent
        if any(tag == "I" for _, tag in self.journal.items()) and read_json(self.floors_path) is None:
            raise SourceError(
                f"journal has in-flight images but {self.floors_path} is missing; "
                "delete the journal to re-publish (may duplicate)"
            )
        self.runner = SourceRunner(settings, publisher, lambda _state: _DropFolder(self), kind="image",
                                   checkpoint_path=self.floors_path)

    def _state_base(self, settings: Settings) -> Path:
        """The journal's and floors' path: a hash of the folder's real path. Another spelling of it (a
        linked directory, ``in/../in``) used to be another journal: every file published again. A state
        written before, under the path as given, is still used."""

        def at(where: Path) -> Path:
            return source_state_dir(settings, "images") / hashlib.sha1(
                str(where).encode("utf-8", "surrogateescape")).hexdigest()[:16]

        return keyed_state(self.directory, Path(os.path.realpath(self.directory)), at,
                           found=lambda base: base.with_suffix(".journal").exists())

    # -- scanning -------------------------------------------------------------------------
    def candidates(self, *, wait_settle: bool = True) -> list[Path]:
        """Files ready to take, in name order: every regular file but dot-files and ``.label``
        sidecars (an orphan sidecar is taken, to be rejected), each once it has settled: its mtime
        at least ``settle_s`` old and its size and mtime unchanged since the previous scan.

        Files not yet settled are listed in ``self.unsettled``. ``wait_settle=False`` takes every
        file at once (tests, and callers that know the writers are done).
        """
        now = time.time()
        ready: list[Path] = []
        current: dict[Path, tuple[int, int]] = {}
        self.unsettled = []
        entries = []
        inside = os.path.realpath(self.directory) + os.sep
        for e in os.scandir(self.directory):
            if e.name.startswith("."):
                continue
            if e.is_file() and not (e.is_symlink() and not os.path.realpath(e.path).startswith(inside)):
                entries.append(e)
            elif not e.is_dir() and e.path not in self._odd and len(self._odd) < 10_000:
                # Never read (a link to /dev/zero would never end), never moved; said once, not silently.
                # A link to a file outside the folder is not read either: whoever can write the folder
                # could otherwise have any file this process can read (keys, /etc/shadow as root) published,
                # or its bytes kept in a dead letter when it is not an image.
                self._odd.add(e.path)
                what = ("a link to a file outside the drop folder" if e.is_symlink() and e.is_file()
                        else "not a regular file (a device, a FIFO, a dangling link?)")
                log.warning("%s is %s; left in place, not published", e.path, what)
        entries.sort(key=lambda e: e.name)
        names = {e.name for e in entries}
        stems = {os.path.splitext(n)[0] for n in names if not n.endswith(".label")}
        for entry in entries:
            if entry.name.endswith(".label") and (entry.name[: -len(".label")] in names
                                                   or entry.name[: -len(".label")] in stems):
                continue  # a sidecar: it moves with its image
            try:
                st = entry.stat()
            except FileNotFoundError:  # gone since the listing (renamed, deleted): the next scan has its new name
                continue
            sig = (st.st_size, st.st_mtime_ns)
            path = Path(entry.path)
            current[path] = sig
            previous = self._seen.get(path)
            age = now - st.st_mtime
            # An mtime ahead of the clock cannot age: unchanged over one scan interval has to do
            # (such a file is then rejected for its event time, see _load).
            if not wait_settle or (age >= self.settle_s and previous in (None, sig)) or (age < 0 and previous == sig):
                ready.append(path)
            else:
                self.unsettled.append(path)
        self._seen = current
        return ready

    def _load(self, path: Path) -> _Item | None:
        try:
            st = path.stat()
            if st.st_size > MAX_FILE_BYTES:  # never read a huge file whole: keep its head as the dead letter
                digest = _file_sha256(path)
                with path.open("rb") as fh:
                    head = fh.read(64 * 1024)
                return _Item(path, head, digest, None, ImageValidationError(
                    f"file is {st.st_size} bytes, over the {MAX_FILE_BYTES}-byte image limit", "too_large"))
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. permissions: left in place and retried on the next scan
            log.warning("%s: cannot read (%s); leaving it in place", path, exc)
            return None
        digest = hashlib.sha256(data).hexdigest()
        if path.name.endswith(".label"):
            return _Item(path, data, digest, None, ImageValidationError(
                f"label file {path.name} has no image beside it (x.png.label or x.label labels x.png)",
                "orphan_label"))
        try:
            published, info = accept(data, path.name)  # a BMP, TIFF, GIF, WebP, ICO, netpbm, AVIF or HEIC becomes a PNG
            timestamp = int(st.st_mtime * 1000)
            problems = self.policy.problems(timestamp)
            if problems:
                raise ImageValidationError(f"file time (mtime): {problems[0]}", problems[0].reason)
            rec = image_record(published, info, label=label_for(path), source=text_name(path.name),
                               timestamp=timestamp)
            return _Item(path, data, digest, rec, None)
        except ImageValidationError as exc:
            if exc.reason == "truncated" and 0 <= time.time() - st.st_mtime < self.truncated_grace_s:
                # Settled but cut short, and written to moments ago: a writer that paused longer than
                # --settle (a slow network copy) may still be at it. It used to be rejected, and moved
                # away while still being written; it is read again at each scan until it is
                # truncated_grace_s old, then rejected. (--once and --idle-exit wait for it meanwhile.)
                log.debug("%s is truncated and %.1f s old; read again later", path, time.time() - st.st_mtime)
                return None
            return _Item(path, data, digest, None, exc)

    # -- the source side (driven by the runner) ---------------------------------------------
    def _next_batch(self) -> list[SourceItem]:
        """Up to ``batch_size`` settled files as items; [] while files settle; StopIteration when the run
        is over (:meth:`_over`)."""
        if not self._queue:
            self._queue = [p for p in self.candidates() if p not in self._taken]
            if not self._queue:
                if self._over():
                    raise StopIteration
                return []
        paths, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        items = []
        for path in paths:
            it = self._load(path)
            if it is not None:
                self._taken.add(path)
                items.append(self._item(it))
        if items:
            self._active = time.monotonic()
        return items

    def _over(self) -> bool:
        """Whether a once run (nothing left) or an idle exit (``idle_exit_s`` without a new file) ends now.

        Neither ends while a file is still being written: a once run waits ``max_settle_wait_s`` from its
        start, an idle exit ``max_settle_wait_s`` past ``idle_exit_s``; then each file left is logged.
        Why: the idle exit used to count a file still being written as idleness, so ``--idle-exit`` left
        it in place without a word, and a batch job ended with a file unpublished.
        """
        if self._taken:
            # files sent and not yet committed: their commit may leave one for the next scan (a valid copy
            # of a rejected file's bytes), which a once run must still make, not end with it in the folder
            return False
        now = time.monotonic()
        if not self.follow:
            waited, grace = now - self._started, 0.0
        elif self.idle_exit_s is not None:
            waited, grace = now - self._active, self.idle_exit_s
            if waited <= grace:
                return False
        else:
            return False
        if not self.unsettled:
            return True
        if waited - grace <= self.max_settle_wait_s:
            return False
        for path in self.unsettled:
            log.warning("%s is still being written after %.0f s; left in place for the next run",
                        path, self.max_settle_wait_s)
        return True

    def _item(self, it: _Item) -> SourceItem:
        tag = self.journal.get(it.digest)
        # Rejected by an earlier run and accepted by this one (typically an old file time, put back and
        # run with --backfill as its reason file says): published now. It used to be moved back to
        # rejected/ as 'rejected_earlier', so following the reason file's advice did nothing.
        accepted_now = tag == "R" and it.record is not None
        if (tag in ("P", "R") and not accepted_now) or it.digest in self._in_flight:
            return SourceItem(it.digest, ref=it)  # nothing to send (done, or same bytes as one in flight): moved
        self._in_flight.add(it.digest)
        if it.record is not None:
            return SourceItem(it.digest, it.data, record=it.record, key=it.record["image_id"], headers=self._headers,
                              source={"file": str(it.path)}, ref=it)
        assert it.error is not None
        return SourceItem(it.digest, it.data, error=it.error, source={"file": str(it.path), "reason": it.error.reason},
                          ref=it)

    def _commit(self, items: list[SourceItem]) -> None:
        """A batch is acked: journal each sent (or found) image, plan where every file of the batch goes
        (journaled too, so a move cut short ends under the same name), then move them."""
        done = [(item.outcome, item.event_id) for item in items if item.outcome]
        self.journal.add_many(done)
        self.published += sum(1 for i in items if i.outcome == PUBLISHED and not i.skipped)
        self.rejected_count += sum(1 for i in items if i.outcome and i.outcome != PUBLISHED and not i.skipped)
        for item in items:
            self._in_flight.discard(item.event_id)
        reserved: set[Path] = set()
        placed: dict[str, str] = {}  # digest -> names tag of a file planned in this batch
        plans = []
        for item in items:
            self._taken.discard(item.ref.path)
            plan = self._plan(item.ref, bool(item.outcome), reserved, placed)
            if plan.entry is not None:
                placed[plan.entry[1]] = plan.entry[0]
            plans.append(plan)
        self.names.add_many([plan.entry for plan in plans if plan.entry is not None])
        for plan in plans:
            self._move(plan)

    def _plan(self, it: _Item, sent: bool, reserved: set[Path], placed: dict[str, str]) -> Plan:
        """Where ``it`` goes: the directory of its journaled verdict (a copy of bytes already done: of its
        own verdict), under a name whose sidecars are all free, with its label files and note.

        ``sent``: the runner published or dead-lettered it now (or found it on the topics after a kill):
        the file of its event id. A file not sent is a copy, unless it is the one file the names journal
        placed under a name that is not there yet (a kill cut its move short, or it was put back).
        """
        tag = self.journal.get(it.digest)
        if tag not in ("P", "R"):  # cannot happen: every file of a committed batch is journaled or a copy
            log.warning("%s has no verdict in %s; left in place for the next scan", it.path, self.journal.path)
            return Plan(it.path, None)
        first = None if sent else names_entry(placed.get(it.digest) or self.names.get(it.digest))
        own = None
        if first is not None and first[0] == it.path.name and not os.path.lexists(self.directory / first[1]):
            own, first = self.directory / first[1], None
        label = it.record["label"] if it.record is not None else None
        if first is None:  # the file of this event id
            note = None
            if it.path.name.endswith(".label"):
                note = f"orphan_label: {it.error}"
            elif tag == "R":
                if it.error is None:  # recorded rejected by an older run with other limits: keep that verdict
                    it.error = ImageValidationError("rejected by an earlier run", "rejected_earlier")
                note = f"{it.error.reason}: {it.error}"
            plan = place(it.path, it.digest, self.processed if tag == "P" else self.rejected, note=note,
                         reserved=reserved, own=own)
            assert plan.target is not None
            if not sent:  # journaled by a run that stopped before moving it (or put back after its move)
                log.info("%s was %s by an earlier run; moved to %s now, not sent again", it.path,
                         "published" if tag == "P" else "rejected", plan.target)
            plan.entry = (names_tag(it.path.name, str(plan.target.relative_to(self.directory)), label), it.digest)
            return plan
        # A copy: the same bytes as a file already published or rejected (this run or an earlier one).
        there = it.digest in placed or os.path.lexists(self.directory / first[1])  # in this batch: not moved yet
        where = first[1] + ("" if there else " (no longer there)")
        if tag == "R" and it.error is None:
            log.info("%s has the bytes of %s, which was rejected, but is valid itself; left for the next scan, "
                     "which publishes it", it.path, where)
            return Plan(it.path, None)
        self.duplicates += 1
        said = "published" if tag == "P" else "dead-lettered"
        line = (f"duplicate: same bytes (event id {it.digest}) as {where}, dropped as {first[0]!r} and {said}; "
                f"not {said} again (one event per event id)")
        if it.error is None:
            if label_key(label) != first[2]:  # recorded, not dropped: the record keeps the first label
                line += (f". Its label {label_key(label)!r} differs from the published {first[2]!r}, which the "
                         "record keeps; correct the label downstream if this one is right")
            plan = place(it.path, it.digest, self.processed, note=line, ext=".duplicate", reserved=reserved)
        else:
            plan = place(it.path, it.digest, self.rejected, note=f"{it.error.reason}: {it.error}\n{line}",
                         reserved=reserved)
        log.warning("%s: %s; moved to %s beside its note", it.path, line, plan.target)
        return plan

    def _move(self, plan: Plan) -> None:
        """Carry out one file's plan (the step after the journal: a kill before it leaves the file in place,
        and the next run moves it under the name its names entry planned)."""
        carry_out(plan)

    def run(
        self, *, follow: bool = True, poll_s: float = 0.5, stop: threading.Event | None = None,
        idle_exit_s: float | None = None,
    ) -> None:
        """Scan and publish until ``stop`` (a threading.Event) is set; once when not ``follow``; with
        ``idle_exit_s``, until that long without a new file.

        Once (not ``follow``) still waits for files that are being written, up to ``max_settle_wait_s``,
        and so does an idle exit, past ``idle_exit_s``; a file that does not settle by then is logged and
        left in place. The idle exit is decided here (:meth:`_over`), not by the runner, which cannot see
        a file that is still being written.
        """
        self.follow, self.poll_s, self._started = follow, poll_s, time.monotonic()
        self.idle_exit_s, self._active = idle_exit_s, self._started
        self.runner.run(stop)

    def close(self) -> None:
        self.runner.release()
        self.journal.close()
        self.names.close()
