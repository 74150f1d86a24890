"""Index of a feature-store directory: an append-only journal so listing batches stays cheap.

Why: the trainer lists the store about once a second, and parsing every manifest made that poll
grow linearly with the store (100k batches = 100k file reads a second). The index turns the poll
into one ``stat`` of the journal plus reading only the lines appended since the last poll.

Layout: ``<root>/<namespace>/<kind>/_index.json`` (like ``_replay.json``: :meth:`FeatureStore.batch_ids`
lists only ``*.avro``; it is JSON Lines despite the suffix, which keeps the directory to ``*.avro`` and
``*.json`` names). One line per event::

    {"op": "add", "id": "<batch_id>", "m": {<the manifest>}}
    {"op": "del", "id": "<batch_id>"}

The directory stays the truth ("a batch exists iff its ``.avro`` exists"); the index is a cache
that may lag, never lead, except in the one documented window of :func:`remove` below:

* a writer appends ``add`` *after* the batch's ``.avro`` is renamed into place, so an indexed
  batch always exists; a crash between the rename and the append leaves a batch the index lacks;
* a deleter appends ``del`` *before* deleting the files, so a reader is never handed a batch
  whose files are going away; a crash between leaves a batch the index hides;
* both gaps, a journal swapped by a namespace promotion (a new inode) and an append lost to a
  concurrent rebuild are closed by :meth:`IndexCache.reconcile`: a names-only ``listdir``
  compared with the cache, run whenever a journal is (re)loaded — every new reader, every restart;
* a long-running reader also scans the directory ``scan_chunk`` names per refresh (a resumable
  ``os.scandir``), so a batch the journal missed is found within one pass (``n / scan_chunk``
  polls) at a cost per poll that does not grow with the store; a writer's overlap check refreshes
  *paced* (:meth:`IndexCache.refresh`): at most one scan step per ``scan_interval_s``, so a stream
  worker writing batches back to back does not pay a directory read (~0.5 ms, a fifth of an fsynced
  write: bench_store_growth) per batch, and still completes a pass (in ``n / scan_chunk`` steps);
* an unreadable line (a torn append after a crash, a corrupted file) makes the reader rebuild
  the journal from the manifests (tmp file + fsync + rename).

Appends use ``O_APPEND`` with one ``write`` per line, so concurrent writers (one stream worker
per partition group) never interleave within a line on a local file system.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streaming.store_format import OFFSET_DIGITS, is_batch_file

INDEX_NAME = "_index.json"
#: Length of the "<first>-<last>" tail of every batch id (streaming/store_format.py: batch_id_for).
RANGE_CHARS = 2 * OFFSET_DIGITS + 1
#: Directory names a long-running reader checks per refresh (bounded work per poll).
SCAN_CHUNK = 256
#: Least time between two scan steps of a paced refresh (a writer's overlap check), seconds.
SCAN_INTERVAL_S = 0.1

SortKey = tuple[int, str]


def partition_prefix(batch_id: str) -> str:
    """``"<topic>-p<partition>-"`` of a batch id: what its partition's ids share."""
    return batch_id[:-RANGE_CHARS]


def index_path(directory: Path) -> Path:
    return directory / INDEX_NAME


def line(op: str, batch_id: str, manifest: dict[str, Any] | None = None) -> bytes:
    """One journal event as bytes, newline included (also what bench_store_growth's fixture writes)."""
    entry: dict[str, Any] = {"op": op, "id": batch_id}
    if manifest is not None:
        entry["m"] = manifest
    return (json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n").encode()


def append(directory: Path, op: str, batch_id: str, manifest: dict[str, Any] | None = None) -> None:
    """Append one event. Not fsynced: the index is a cache that :meth:`IndexCache.reconcile`
    repairs, and a kill -9 keeps page-cache writes anyway (only a power cut can lose them)."""
    fd = os.open(index_path(directory), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line(op, batch_id, manifest))
    finally:
        os.close(fd)


def sort_key(batch_id: str, manifest: dict[str, Any]) -> SortKey:
    """The store's order: manifest ``created_at_ms``, then id (as :meth:`FeatureStore.batches`)."""
    return int(manifest.get("created_at_ms", 0) or 0), batch_id


class CorruptIndexError(ValueError):
    """A journal line that is not a well-formed event (internal: triggers a rebuild)."""


class IndexCache:
    """In-memory view of one directory's index, kept current by reading only appended lines.

    ``load_manifest(batch_id)`` reads one manifest from disk (None when the batch is gone); it is
    called only for batches the journal lacks (rebuild, reconcile).
    """

    def __init__(self, directory: Path, load_manifest: Callable[[str], dict[str, Any] | None],
                 scan_chunk: int = SCAN_CHUNK, scan_interval_s: float = SCAN_INTERVAL_S) -> None:
        self.directory = directory
        self.path = index_path(directory)
        self.load_manifest = load_manifest
        self.scan_chunk = scan_chunk
        self.scan_interval_s = scan_interval_s
        self._last_scan = float("-inf")  # monotonic time of the last scan step
        self._scan: Any = None  # an open os.scandir iterator between refreshes
        self._deleted: set[str] = set()  # ids a "del" line named whose files may still be there
        self.manifests: dict[str, dict[str, Any]] = {}
        self.keys: list[SortKey] = []  # sorted; keys[i][1] is the batch id
        #: ids per partition ("<topic>-p<partition>-"), sorted = by offset: write_batch's overlap check
        self.by_partition: dict[str, list[str]] = {}
        self._ino: int | None = None
        self._offset = 0
        self._lines = 0
        self._needs_reconcile = True
        self.rebuilds = 0

    # ---- in-memory edits ---------------------------------------------------------------------
    def _put(self, batch_id: str, manifest: dict[str, Any]) -> None:
        self._drop(batch_id)
        key = sort_key(batch_id, manifest)
        self.manifests[batch_id] = manifest
        if not self.keys or key > self.keys[-1]:
            self.keys.append(key)  # the usual case: the newest batch
        else:
            bisect.insort(self.keys, key)
        ids = self.by_partition.setdefault(partition_prefix(batch_id), [])
        if not ids or batch_id > ids[-1]:
            ids.append(batch_id)  # a partition's batches are journaled in offset order
        else:
            bisect.insort(ids, batch_id)

    def _drop(self, batch_id: str) -> None:
        old = self.manifests.pop(batch_id, None)
        if old is None:
            return
        key = sort_key(batch_id, old)
        i = bisect.bisect_left(self.keys, key)
        if i < len(self.keys) and self.keys[i] == key:
            del self.keys[i]
        ids = self.by_partition.get(partition_prefix(batch_id), [])
        j = bisect.bisect_left(ids, batch_id)
        if j < len(ids) and ids[j] == batch_id:
            del ids[j]

    def _apply(self, raw: bytes) -> None:
        try:
            entry = json.loads(raw)
            op, bid = entry["op"], entry["id"]
            if op == "add" and isinstance(entry["m"], dict) and isinstance(bid, str):
                self._put(bid, entry["m"])
            elif op == "del" and isinstance(bid, str):
                self._drop(bid)
                self._deleted.add(bid)  # its files may linger a moment: the scan must not re-add it
            else:
                raise CorruptIndexError(f"unknown index event {raw[:80]!r}")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptIndexError(str(exc)) from exc
        self._lines += 1

    # ---- keeping current ---------------------------------------------------------------------
    def refresh(self, paced: bool = False) -> None:
        """Bring the cache up to date: new lines only, a reload when the journal was swapped,
        a rebuild when it is missing or corrupt, a reconcile when one is due, else one scan step
        (``paced``: only when ``scan_interval_s`` has passed since the last one)."""
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):  # no directory yet, or a file in its place
            if not self.directory.is_dir():
                self._reset()
                return
            self.rebuild()
            return
        if st.st_ino != self._ino or st.st_size < self._offset:
            self._reset()
            self._ino = st.st_ino
            self._needs_reconcile = True  # a journal we have not checked against the directory
        if st.st_size > self._offset:
            try:
                self._read_from(self._offset)
            except CorruptIndexError:
                self.rebuild()
                return
        if self._needs_reconcile:
            self.reconcile()
        elif not paced or time.monotonic() - self._last_scan >= self.scan_interval_s:
            self._scan_step()

    def _reset(self) -> None:
        self._close_scan()
        self.manifests.clear()
        self.keys.clear()
        self.by_partition.clear()
        self._ino = None
        self._offset = 0
        self._lines = 0

    def _read_from(self, offset: int) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # an unterminated tail is an append in progress: next time
        for raw in data[:end].splitlines():
            if raw.strip():
                self._apply(raw)
        self._offset = offset + end

    def _listed_ids(self) -> set[str]:
        try:
            names = os.listdir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return set()
        return {n[:-5] for n in names if is_batch_file(n)}

    def _add_missing(self, batch_id: str) -> None:
        manifest = self.load_manifest(batch_id)
        if manifest is not None:
            self._put(batch_id, manifest)
            with contextlib.suppress(OSError):
                append(self.directory, "add", batch_id, manifest)

    def _scan_step(self) -> None:
        """Check the next ``scan_chunk`` names of the directory for batches the journal lacks."""
        self._last_scan = time.monotonic()
        try:
            if self._scan is None:
                self._scan = os.scandir(self.directory)
            for _ in range(self.scan_chunk):
                entry = next(self._scan, None)
                if entry is None:
                    self._close_scan()
                    return
                name = entry.name
                if (is_batch_file(name) and name[:-5] not in self.manifests
                        and name[:-5] not in self._deleted):
                    if os.path.exists(entry.path):  # not removed since the journal line was read
                        self._add_missing(name[:-5])
        except OSError:
            self._close_scan()

    def __del__(self) -> None:  # a reader dropped mid-pass: close its directory handle quietly
        with contextlib.suppress(Exception):
            self._close_scan()

    def _close_scan(self) -> None:
        # Forget a deletion once its files are gone (a re-write then journals its own "add"); one
        # whose deleter died before the unlink stays hidden until the next reload's reconcile.
        self._deleted = {b for b in self._deleted if (self.directory / f"{b}.avro").exists()}
        if self._scan is not None:
            self._scan.close()
            self._scan = None

    def reconcile(self) -> None:
        """Compare the cached ids with the directory (names only) and journal the differences."""
        self._needs_reconcile = False
        on_disk = self._listed_ids()
        for bid in sorted(on_disk - self.manifests.keys()):
            self._add_missing(bid)
        for bid in sorted(self.manifests.keys() - on_disk):
            self._drop(bid)
            with contextlib.suppress(OSError):
                append(self.directory, "del", bid)
        if self._lines > 2 * len(self.manifests) + 1000:  # mostly deletions: compact
            self._write_fresh()

    def rebuild(self) -> None:
        """Re-read every manifest of the directory and replace the journal atomically."""
        self.rebuilds += 1
        self._reset()
        for bid in sorted(self._listed_ids()):
            manifest = self.load_manifest(bid)
            if manifest is not None:
                self._put(bid, manifest)
        self._needs_reconcile = False
        self._write_fresh()

    def _write_fresh(self) -> None:
        """Replace the journal with one ``add`` per cached batch (tmp + fsync + rename). An append
        racing with this lands in the replaced inode; the next reconcile picks its batch up."""
        tmp = self.directory / f"._index.{os.getpid()}-{time.monotonic_ns()}.tmp"
        try:
            with open(tmp, "xb") as fh:
                for _, bid in self.keys:
                    fh.write(line("add", bid, self.manifests[bid]))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            st = os.stat(self.path)
        except OSError:  # read-only store, disk full: the in-memory view is still right
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._ino = None
            self._offset = 0
            return
        self._ino, self._offset, self._lines = st.st_ino, st.st_size, len(self.manifests)

    # ---- queries -----------------------------------------------------------------------------
    def ordered(self) -> list[tuple[str, dict[str, Any]]]:
        return [(bid, self.manifests[bid]) for _, bid in self.keys]

    def partition_ids(self, prefix: str) -> list[str]:
        """The cached ids of one partition (``"<topic>-p<partition>-"``), sorted by offset. Not a copy."""
        return self.by_partition.get(prefix, [])

    def after(self, key: SortKey) -> list[tuple[str, dict[str, Any]]]:
        """Batches whose sort key is greater than ``key`` (cost: the answer, not the store)."""
        i = bisect.bisect_right(self.keys, key)
        return [(bid, self.manifests[bid]) for _, bid in self.keys[i:]]
