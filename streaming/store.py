"""Feature store: featurized micro-batches as Avro container files plus a JSON manifest each.

Layout: ``<root>/<namespace>/<kind>/<batch_id>.avro`` and ``<batch_id>.json``.

Why Avro containers (snappy codec, fastavro) rather than TFRecord: the file carries its own
schema, it is written and read by the same library as the wire format, it can be read without
TensorFlow (the trainer, tests and a shell user all can), and snappy is already a dependency.

Durability protocol of :meth:`FeatureStore.write_batch` (a batch exists iff its ``.avro`` exists):

1. the rows go to a hidden temp file in the same directory, which is fsynced;
2. the manifest goes through its own temp file + fsync + rename (so a reader never sees half a
   manifest; a manifest without its ``.avro`` is an orphan from a crash and is ignored/overwritten);
3. the temp ``.avro`` is renamed into place and the directory fsynced.

``batch_id`` is derived from the topic/partition/offset range (``<topic>-p<partition>-<first>-<last>``,
offsets zero-padded so names sort by offset), so writing the same range twice is detected and
skipped, and an overlapping range is refused (:class:`BatchOverlapError`). The ``.avro`` bytes are
a pure function of the rows, so a replay of the same range produces byte-identical files. Those
pure parts (ids, row schema, encoding, manifest fields) live in :mod:`streaming.store_format` and
are re-exported here; this module is the directory, the durability protocol and the index.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streaming.exceptions import BackpressureError, BatchOverlapError, StoreError, StreamingError  # noqa: F401 (re-exported)
from streaming.fsutil import fsync_dir, pid_alive, write_synced
from streaming.objstore import Location, is_remote, local_path, open_store, open_url
from streaming.store_format import (  # noqa: F401 (re-exported: the store's public names stay here)
    MANIFEST_FORMAT,
    OFFSET_DIGITS,
    ROW_SCHEMA,
    BatchInfo,
    BatchSpec,
    StoredRow,
    batch_id_for,
    build_manifest,
    decode_batch,
    encode_rows,
    is_batch_file,
    manifest_bytes,
    parse_batch_id,
)
from streaming.store_index import IndexCache
from streaming.store_index import append as index_append
from streaming.store_remote import RemoteBatches

_RANGE_RE = re.compile(rf"\d{{{OFFSET_DIGITS}}}-\d{{{OFFSET_DIGITS}}}")
#: A namespace (and kind) name: one directory name, never ``.``/``..``. The control API validates
#: against this same pattern, so a namespace the command line made can be queried over HTTP.
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)
_TMP_SUFFIX = ".tmp"
#: Featurizer state longer than this (UTF-8 bytes) goes to ``<batch_id>.state.json`` next to the
#: batch instead of into its manifest, so a manifest stays small whatever the featurizer keeps.
STATE_INLINE_MAX_BYTES = 4096
STATE_SUFFIX = ".state.json"
try:
    _PATH_MAX = int(os.pathconf("/", "PC_PATH_MAX"))
except (OSError, ValueError):  # pragma: no cover - every POSIX system answers
    _PATH_MAX = 4096
#: errno values meaning "the store cannot take data right now" (backpressure, not a bug).
BACKPRESSURE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG,
                                 errno.EROFS, errno.ENOTDIR, errno.EEXIST})


def _load_manifest(d: Path, batch_id: str) -> dict[str, Any]:
    """One batch's manifest; a file that is not a JSON object (truncated or overwritten by a disk
    fault or by hand: ``write_batch`` itself only ever renames complete ones into place) is a
    :class:`StoreError` naming it and the way out, never a bare ``JSONDecodeError`` traceback."""
    path = d / f"{batch_id}.json"
    return parse_manifest(path.read_text(encoding="utf-8", errors="replace"), path, f"Move {batch_id}.* out of {d}")


def parse_manifest(data: str | bytes, where: object, way_out: str) -> dict[str, Any]:
    """A manifest's JSON object (local store and object storage alike); anything else is a StoreError
    naming ``where`` and ``way_out`` (what to do with the batch's files) before the replay that rebuilds it."""
    try:
        result = json.loads(data)
    except ValueError as exc:
        result, why = None, f"{exc}"
    else:
        why = f"a JSON {type(result).__name__}, not an object"
    if not isinstance(result, dict):
        raise StoreError(
            f"feature store: manifest {where} is unreadable ({why}); the disk or a hand edit damaged it. "
            f"{way_out}, then rebuild that range with `streamlearn replay` (docs/RECOVERY.md, 'Replay and rebuild')")
    return result


def _as_backpressure(exc: OSError, what: str) -> BackpressureError:
    err = BackpressureError(
        f"feature store: cannot write {what}: {exc.strerror or exc} (errno {exc.errno}); "
        "free disk space or fix permissions; the worker pauses and retries"
    )
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


def read_batch(path: Location) -> dict[str, np.ndarray]:
    """Arrays of one batch: ``x`` (N, n_features) float32, one float64 array per label name (NaN
    where the label is None), ``event_time_ms`` int64, ``partition`` int32, ``offset`` int64.

    Needs only the ``.avro`` (n_features and label names are in its header metadata), so a batch
    copied elsewhere stays readable. ``path`` may be an object-storage URL (``BatchInfo.path``).
    """
    with open_url(path) as fh:
        return decode_batch(fh)


class FeatureStore:
    """A directory (or an object-storage URL) of feature batches. Readers: :meth:`batches`,
    :func:`read_batch`.

    A root that is an ``s3://`` (or other fsspec) URL delegates batch I/O to
    :class:`streaming.store_remote.RemoteBatches` (manifest published last, docs/STORE.md);
    a path or ``file://`` URL keeps the local protocol below.
    """

    def __init__(self, root: Location, state_inline_max_bytes: int = STATE_INLINE_MAX_BYTES,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(root)
        self.root = Path(self.url) if is_remote(root) else local_path(root)
        if state_inline_max_bytes < 0:
            raise StoreError(f"state_inline_max_bytes: must be >= 0, got {state_inline_max_bytes}")
        self.state_inline_max_bytes = state_inline_max_bytes
        self._indexes: dict[Path, IndexCache] = {}
        self.remote = RemoteBatches(self, open_store(root, storage_options)) if is_remote(root) else None

    # ---- paths -------------------------------------------------------------------------------
    @staticmethod
    def check_names(kind: str, namespace: str) -> None:
        if not _NAMESPACE_RE.match(namespace):
            raise StoreError(f"namespace: {namespace!r} must be letters, digits, '.', '_' or '-' (max 100)")
        if not _NAMESPACE_RE.match(kind):
            raise StoreError(f"kind: {kind!r} must be letters, digits, '.', '_' or '-'")

    def directory(self, kind: str, namespace: str = "live") -> Path:
        self.check_names(kind, namespace)
        if self.remote is not None:
            raise StoreError(f"feature_store: {self.url} is object storage; this operation (namespace promote, "
                             "replay --into, quarantine) needs a local or shared directory store")
        return self.root / namespace / kind

    def batch_path(self, kind: str, batch_id: str, namespace: str = "live") -> Location:
        """Where a batch's rows live: a Path locally, a URL on object storage."""
        if self.remote is not None:
            return self.remote.batch_path(kind, batch_id, namespace)
        return self.directory(kind, namespace) / f"{batch_id}.avro"

    # ---- reading -----------------------------------------------------------------------------
    def batch_ids(self, kind: str, namespace: str = "live") -> list[str]:
        """Ids of the persisted batches (those whose ``.avro`` exists), by name."""
        if self.remote is not None:
            return self.remote.batch_ids(kind, namespace)
        d = self.directory(kind, namespace)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return []
        return sorted(n[:-5] for n in names if is_batch_file(n))

    def batches(self, kind: str, namespace: str = "live") -> list[BatchInfo]:
        """Every persisted batch of ``kind``, oldest first (manifest ``created_at_ms``, then id).

        Served from the directory's index (``streaming/store_index.py``): only manifests written
        since the last call are read, so a poll does not grow with the store.
        """
        if self.remote is not None:
            return self.remote.batches(kind, namespace)
        d = self.directory(kind, namespace)
        return [BatchInfo(bid, d / f"{bid}.avro", m) for bid, m in self._index(d).ordered()]

    def batches_after(self, kind: str, batch_id: str | None, created_at_ms: int = 0,
                      namespace: str = "live") -> list[BatchInfo]:
        """The batches after ``batch_id`` in :meth:`batches` order (all when None); when that batch
        is gone, those after ``(created_at_ms, batch_id)``. Costs the answer, not the store: the
        trainer's once-a-second poll."""
        if self.remote is not None:
            return self.remote.batches_after(kind, batch_id, created_at_ms, namespace)
        d = self.directory(kind, namespace)
        index = self._index(d)
        if batch_id is None:
            pairs = index.ordered()
        else:
            known = index.manifests.get(batch_id)
            mark = (int(known.get("created_at_ms", 0) or 0) if known is not None else int(created_at_ms), batch_id)
            pairs = index.after(mark)
        return [BatchInfo(bid, d / f"{bid}.avro", m) for bid, m in pairs]

    def _index(self, d: Path, paced: bool = False) -> IndexCache:
        """The directory's index, brought up to date (``paced``: the writer's check, see ``IndexCache.refresh``)."""
        index = self._indexes.get(d)
        if index is None:
            index = self._indexes[d] = IndexCache(d, lambda bid: self._read_manifest(d, bid))
        index.refresh(paced)
        return index

    @staticmethod
    def _read_manifest(d: Path, batch_id: str) -> dict[str, Any] | None:
        """A manifest for the index, None when its batch is gone or it was never written."""
        if not (d / f"{batch_id}.avro").exists():
            return None
        try:
            return _load_manifest(d, batch_id)
        except FileNotFoundError as exc:
            raise StoreError(f"feature store: batch {batch_id} in {d} has no manifest; "
                             "it was not written by FeatureStore.write_batch; remove it") from exc

    def featurizer_state(self, kind: str, manifest: dict[str, Any], namespace: str = "live") -> str | None:
        """The featurizer state checkpointed with a batch: inline in its manifest, or in the
        ``<batch_id>.state.json`` file (an object on object storage) the manifest names, checked
        against its sha256."""
        ref = manifest.get("featurizer_state_file")
        if not ref:
            text: str | None = manifest.get("featurizer_state")
            return text
        name = str(ref["name"])
        if self.remote is not None:
            what, where = "state object", self.remote.key(kind, namespace, name)
        else:
            what, where = "state file", str(self.directory(kind, namespace) / name)
        try:
            data = self.remote.objects.get(where) if self.remote is not None else Path(where).read_bytes()
        except FileNotFoundError as exc:  # ObjectNotFoundError is one too
            raise StoreError(f"batch {manifest.get('batch_id')}: its {what} {where} is gone; "
                             "replay the partition to rebuild it") from exc
        if hashlib.sha256(data).hexdigest() != ref.get("sha256"):
            raise StoreError(f"batch {manifest.get('batch_id')}: {what} {where} does not match the sha256 "
                             "of its manifest; it was modified or corrupted; replay the partition")
        return data.decode("utf-8")

    def manifest(self, kind: str, batch_id: str, namespace: str = "live") -> dict[str, Any]:
        if self.remote is not None:
            return self.remote.manifest(kind, batch_id, namespace)
        return _load_manifest(self.directory(kind, namespace), batch_id)

    def ranges(self, kind: str, topic: str, partition: int, namespace: str = "live") -> list[tuple[int, int]]:
        """Persisted ``(first, last)`` offset ranges of one partition, ascending (from file names)."""
        # Filter by name prefix before parsing: write_batch calls this per batch, and a regex per
        # file made that 1 s a write at 100k batches (bench_store_growth); still one listdir.
        prefix = f"{topic}-p{partition}-"
        try:
            names = ([f"{b}.avro" for b in self.remote.batch_ids(kind, namespace)] if self.remote is not None
                     else os.listdir(self.directory(kind, namespace)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".avro")):
                continue
            try:
                t, p, first, last = parse_batch_id(name[:-5])
            except StoreError:
                continue
            if t == topic and p == partition:
                out.append((first, last))
        return sorted(out)

    def last_batch(self, kind: str, topic: str, partition: int, namespace: str = "live") -> BatchInfo | None:
        """The batch with the highest offsets of one partition, or None when there is none yet.

        Why: on (re)assignment the worker resumes after this batch and restores the featurizer
        state checkpointed in its manifest — the store, not the Kafka commit, is the truth.
        """
        rs = self.ranges(kind, topic, partition, namespace)
        if not rs:
            return None
        first, last = rs[-1]
        bid = batch_id_for(topic, partition, first, last)
        return BatchInfo(bid, self.batch_path(kind, bid, namespace), self.manifest(kind, bid, namespace))

    def overlapping(self, kind: str, topic: str, partition: int, first_offset: int, last_offset: int,
                    namespace: str = "live") -> tuple[int, int] | None:
        """A persisted ``(first, last)`` range of the partition overlapping ``first_offset..last_offset``,
        or None: :meth:`write_batch`'s guard.

        Served from the index (each partition's ids, sorted by offset), so a write costs
        the same at 1k and 100k batches (it used to list the directory: bench_store_growth). Index
        entries are candidates confirmed on disk (one ``stat`` each): a batch moved away behind the
        index's back never blocks its offsets. A batch another writer renamed into place is seen once
        its writer appended its journal line (right after the rename): the same check-then-write race
        the directory listing had; a writer killed between its rename and its append is found by this
        process's next index reload or scan, and by every process started after it. The scan is paced
        here (one step per ``store_index.SCAN_INTERVAL_S`` at most): back-to-back writes skip it.
        """
        d = self.directory(kind, namespace)
        prefix = f"{topic}-p{partition}-"
        ids = self._index(d, paced=True).partition_ids(prefix)
        at = bisect.bisect_left(ids, f"{prefix}{first_offset:0{OFFSET_DIGITS}d}")

        def span(bid: str) -> tuple[int, int] | None:  # (first, last) named by a batch id
            rest = bid[len(prefix):]
            return (int(rest[:OFFSET_DIGITS]), int(rest[-OFFSET_DIGITS:])) if _RANGE_RE.fullmatch(rest) else None

        # Existing batches of a partition never overlap each other, so only the nearest existing one
        # starting before first_offset can reach into the range; any starting inside it overlaps.
        for j in range(at - 1, -1, -1):
            before = span(ids[j])
            if before is not None and (d / f"{ids[j]}.avro").exists():
                if before[1] >= first_offset:
                    return before
                break
        for j in range(at, len(ids)):
            inside = span(ids[j])
            if inside is None:
                continue
            if inside[0] > last_offset:
                break
            if (d / f"{ids[j]}.avro").exists():
                return inside
        return None

    # ---- writing -----------------------------------------------------------------------------
    def write_batch(self, spec: BatchSpec, rows: Sequence[StoredRow], namespace: str = "live",
                    created_at_ms: int | None = None) -> tuple[BatchInfo, bool]:
        """Persist one batch durably; returns ``(info, written)``, ``written`` False when the very
        same batch already existed (a replay or a restart after a crash before the commit).

        Raises :class:`BatchOverlapError` when another batch of the partition overlaps the range,
        and :class:`BackpressureError` when the disk is full or not writable (nothing visible is
        left behind; retry later).
        """
        if self.remote is not None:
            return self.remote.write_batch(spec, rows, namespace, created_at_ms)
        bid = batch_id_for(spec.topic, spec.partition, spec.first_offset, spec.last_offset)
        d = self.directory(spec.kind, namespace)
        final = d / f"{bid}.avro"
        # the longest name written here is a temp file's: a path past PATH_MAX was a raw ENAMETOOLONG
        # traceback after the records were consumed (a configuration error: say which setting)
        if len(os.fsencode(str(d))) + len(bid) + 60 >= _PATH_MAX:
            raise StoreError(f"feature store: the files of batch {bid} under {d} would be too long a path for "
                             f"this system ({len(str(d))} characters before the file name, limit {_PATH_MAX}); "
                             "set STREAMLEARN_FEATURE_STORE to a shorter path. Nothing was committed")
        if final.exists():
            return BatchInfo(bid, final, self.manifest(spec.kind, bid, namespace)), False
        self.check_overlap(spec, bid, namespace)
        data = encode_rows(bid, rows, spec.n_features, spec.label_names)
        manifest, state_bytes = self.prepare_manifest(bid, spec, rows, data, namespace, created_at_ms)
        tag = f"{os.getpid()}-{time.monotonic_ns()}{_TMP_SUFFIX}"
        tmp_avro = d / f".{bid}.avro.{tag}"
        tmp_json = d / f".{bid}.json.{tag}"
        tmp_state = d / f".{bid}.state.{tag}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            write_synced(tmp_avro, data)
            if state_bytes is not None:  # before the manifest naming it: a visible state file is complete
                write_synced(tmp_state, state_bytes)
                os.replace(tmp_state, d / f"{bid}{STATE_SUFFIX}")
            write_synced(tmp_json, manifest_bytes(manifest))
            os.replace(tmp_json, d / f"{bid}.json")
            os.replace(tmp_avro, final)
            fsync_dir(d)
        except OSError as exc:
            for tmp in (tmp_avro, tmp_json, tmp_state):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            if exc.errno in BACKPRESSURE_ERRNOS:
                raise _as_backpressure(exc, f"batch {bid} in {d}") from exc
            raise
        with contextlib.suppress(OSError):  # the batch is durable; a reconcile indexes it later
            index_append(d, "add", bid, manifest)
        return BatchInfo(bid, final, manifest), True

    def check_overlap(self, spec: BatchSpec, bid: str, namespace: str) -> None:
        """Refuse a range that overlaps a persisted batch of the same partition (locally from the index,
        :meth:`overlapping`; on object storage from the listed ranges)."""
        if self.remote is None:
            overlap = self.overlapping(spec.kind, spec.topic, spec.partition, spec.first_offset,
                                       spec.last_offset, namespace)
        else:
            overlap = next(((first, last) for first, last in self.ranges(spec.kind, spec.topic, spec.partition,
                                                                         namespace)
                            if first <= spec.last_offset and spec.first_offset <= last), None)
        if overlap is not None:
            first, last = overlap
            raise BatchOverlapError(
                f"batch {bid}: offsets {spec.first_offset}..{spec.last_offset} overlap the persisted "
                f"batch {first}..{last} of {spec.topic}[{spec.partition}]; resume after offset {last}"
            )

    def remove_batch(self, kind: str, batch_id: str, namespace: str = "live") -> int:
        """Delete one batch (``.avro`` first: it stops existing at once, then its manifest and
        state file); returns the bytes freed. Only retention (``streaming/retention.py``) and
        tests call this: deleting a batch a model's lineage names breaks its reproduction."""
        if self.remote is not None:
            return self.remote.remove_batch(kind, batch_id, namespace)
        d = self.directory(kind, namespace)
        index_append(d, "del", batch_id)  # before the files go: no reader is handed a vanishing batch
        freed = 0
        for name in (f"{batch_id}.avro", f"{batch_id}.json", f"{batch_id}{STATE_SUFFIX}"):
            path = d / name
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                continue
        fsync_dir(d)
        return freed

    def prepare_manifest(self, bid: str, spec: BatchSpec, rows: Sequence[StoredRow], data: bytes, namespace: str,
                         created_at_ms: int | None) -> tuple[dict[str, Any], bytes | None]:
        """The manifest of a batch and, when its featurizer state is over ``state_inline_max_bytes``,
        the bytes of its ``<batch_id>.state.json`` (then the manifest names it with its sha256).

        Why a state file per batch rather than a checkpoint every N batches: the worker restores
        from the partition's newest batch and replay from the one before a range, so each batch
        keeps exactly the state it had; the manifest stays bounded and the crash rules unchanged.
        """
        manifest = build_manifest(bid, spec, rows, data, namespace, created_at_ms)
        state_bytes = None if spec.featurizer_state is None else spec.featurizer_state.encode("utf-8")
        if state_bytes is None or len(state_bytes) <= self.state_inline_max_bytes:
            return manifest, None
        manifest["featurizer_state"] = None
        manifest["featurizer_state_file"] = {"name": f"{bid}{STATE_SUFFIX}", "size_bytes": len(state_bytes),
                                             "sha256": hashlib.sha256(state_bytes).hexdigest()}
        return manifest, state_bytes

    def remove_stale_temp_files(self, kind: str, namespace: str = "live", older_than_s: float = 0.0) -> int:
        """Delete temp files left by crashed writers (pid no longer alive on this host, or older
        than ``older_than_s`` when that is > 0). Returns how many were removed. On object storage:
        data objects whose manifest never appeared, older than ``ORPHAN_GRACE_S``."""
        if self.remote is not None:
            from streaming.store_remote import ORPHAN_GRACE_S
            return self.remote.collect_orphans(kind, namespace, max(older_than_s, ORPHAN_GRACE_S))
        d = self.directory(kind, namespace)
        removed = 0
        try:
            names = os.listdir(d)
        except OSError:
            return 0
        now = time.time()
        for name in names:
            if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
                continue
            path = d / name
            m = re.search(r"\.(\d+)-\d+\.tmp$", name)
            writer_alive = m is not None and pid_alive(int(m.group(1)))
            try:
                old = older_than_s > 0 and now - path.stat().st_mtime > older_than_s
                if not writer_alive or old:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    def verify(self, info: BatchInfo) -> None:
        """Check a batch's bytes against the sha256 of its manifest (raises :class:`StoreError`)."""
        if self.remote is not None:
            return self.remote.verify(info)
        digest = hashlib.sha256(Path(info.path).read_bytes()).hexdigest()
        if digest != info.manifest.get("sha256"):
            raise StoreError(f"batch {info.batch_id}: sha256 {digest} does not match its manifest; "
                             "the file was modified or corrupted; delete it and replay the range")
