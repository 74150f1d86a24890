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
a pure function of the rows: the sync marker is derived from the batch id and no wall-clock time is
written into it (``created_at`` lives only in the manifest), so a replay of the same range produces
byte-identical files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import fastavro
import numpy as np

from streaming.clock import now_ms
from streaming.exceptions import BackpressureError, BatchOverlapError, StoreError, StreamingError  # noqa: F401 (re-exported)
from streaming.fsutil import fsync_dir, pid_alive, write_synced
from streaming.rowcodec import encode_container
from streaming.store_index import IndexCache
from streaming.store_index import append as index_append

MANIFEST_FORMAT = 1
_OFFSET_DIGITS = 20
_BATCH_RE = re.compile(r"^(?P<topic>.+)-p(?P<partition>\d+)-(?P<first>\d{20})-(?P<last>\d{20})$")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TMP_SUFFIX = ".tmp"
#: Featurizer state longer than this (UTF-8 bytes) goes to ``<batch_id>.state.json`` next to the
#: batch instead of into its manifest, so a manifest stays small whatever the featurizer keeps.
STATE_INLINE_MAX_BYTES = 4096
STATE_SUFFIX = ".state.json"
#: errno values meaning "the store cannot take data right now" (backpressure, not a bug).
BACKPRESSURE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG,
                                 errno.EROFS, errno.ENOTDIR, errno.EEXIST})

ROW_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "FeatureRow",
    "namespace": "io.streamlearn.features",
    "doc": "One featurized event; x has the featurizer's n_features floats.",
    "fields": [
        {"name": "x", "type": {"type": "array", "items": "float"}},
        {"name": "labels", "type": {"type": "map", "values": ["null", "double"]}},
        {"name": "event_time_ms", "type": "long"},
        {"name": "key", "type": "string"},
        {"name": "topic", "type": "string"},
        {"name": "partition", "type": "int"},
        {"name": "offset", "type": "long"},
    ],
}
_PARSED_ROW_SCHEMA = fastavro.parse_schema(ROW_SCHEMA)
#: Uncompressed bytes per Avro block of a batch file (part of the bytes, hence of every batch's sha256).
SYNC_INTERVAL = 1 << 20


@dataclass(frozen=True)
class StoredRow:
    """One row to persist: features plus where the event came from."""

    x: np.ndarray
    labels: dict[str, float | None]
    event_time_ms: int
    key: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class BatchInfo:
    """A persisted batch: its id, the path of its ``.avro`` and its parsed manifest."""

    batch_id: str
    path: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class BatchSpec:
    """Everything that describes a batch apart from its rows (becomes the manifest)."""

    kind: str
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    featurizer_version: str
    n_features: int
    label_names: Sequence[str]
    schema_ids: Sequence[int] = ()
    dead_letter_offsets: Sequence[int] = ()
    featurizer_state: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def batch_id_for(topic: str, partition: int, first_offset: int, last_offset: int) -> str:
    """Deterministic id of the batch holding ``[first_offset, last_offset]`` of one partition."""
    if first_offset < 0 or last_offset < first_offset:
        raise StoreError(
            f"first_offset/last_offset: need 0 <= first <= last, got {first_offset}..{last_offset}"
        )
    return (f"{topic}-p{partition}-{first_offset:0{_OFFSET_DIGITS}d}-{last_offset:0{_OFFSET_DIGITS}d}")


def parse_batch_id(batch_id: str) -> tuple[str, int, int, int]:
    """``(topic, partition, first_offset, last_offset)`` of a batch id made by :func:`batch_id_for`."""
    m = _BATCH_RE.match(batch_id)
    if not m:
        raise StoreError(f"batch_id: {batch_id!r} is not <topic>-p<partition>-<first>-<last>")
    return m["topic"], int(m["partition"]), int(m["first"]), int(m["last"])


def _sync_marker(batch_id: str) -> bytes:
    """16 bytes derived from the id: fastavro's default marker is random, which breaks byte identity."""
    return hashlib.sha256(("streamlearn-sync:" + batch_id).encode()).digest()[:16]


def _as_backpressure(exc: OSError, what: str) -> BackpressureError:
    err = BackpressureError(
        f"feature store: cannot write {what}: {exc.strerror or exc} (errno {exc.errno}); "
        "free disk space or fix permissions; the worker pauses and retries"
    )
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


def encode_rows(batch_id: str, rows: Iterable[StoredRow], n_features: int,
                label_names: Sequence[str]) -> bytes:
    """The exact bytes of a batch's ``.avro`` file (pure function of its arguments); encoded
    column-wise by :mod:`streaming.rowcodec`, byte-identical to ``fastavro.writer`` of the rows."""
    metadata = {
        "streamlearn.batch_id": batch_id,
        "streamlearn.n_features": str(n_features),
        "streamlearn.label_names": json.dumps(list(label_names)),
    }
    return encode_container(list(rows), n_features, label_names, schema=_PARSED_ROW_SCHEMA, codec="snappy",
                            sync_marker=_sync_marker(batch_id), metadata=metadata, sync_interval=SYNC_INTERVAL)


def read_batch(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of one batch: ``x`` (N, n_features) float32, one float64 array per label name (NaN
    where the label is None), ``event_time_ms`` int64, ``partition`` int32, ``offset`` int64.

    Needs only the ``.avro`` (n_features and label names are in its header metadata), so a batch
    copied elsewhere stays readable.
    """
    with open(path, "rb") as fh:
        reader = fastavro.reader(fh)
        meta = reader.metadata
        n_features = int(meta["streamlearn.n_features"])
        label_names: list[str] = json.loads(meta["streamlearn.label_names"])
        xs: list[list[float]] = []
        labels: dict[str, list[float]] = {name: [] for name in label_names}
        times: list[int] = []
        parts: list[int] = []
        offs: list[int] = []
        for item in reader:
            rec = cast(dict[str, Any], item)
            xs.append(rec["x"])
            lab = rec["labels"]
            for name in label_names:
                v = lab.get(name)
                labels[name].append(np.nan if v is None else v)
            times.append(rec["event_time_ms"])
            parts.append(rec["partition"])
            offs.append(rec["offset"])
    out: dict[str, np.ndarray] = {
        "x": np.asarray(xs, dtype=np.float32).reshape(len(xs), n_features),
        "event_time_ms": np.asarray(times, dtype=np.int64),
        "partition": np.asarray(parts, dtype=np.int32),
        "offset": np.asarray(offs, dtype=np.int64),
    }
    for name in label_names:
        if name in out:
            raise StoreError(f"label_names: label {name!r} clashes with a built-in column; rename it")
        out[name] = np.asarray(labels[name], dtype=np.float64)
    return out


class FeatureStore:
    """A directory of feature batches. Readers: :meth:`batches`, :func:`read_batch`."""

    def __init__(self, root: str | os.PathLike[str], state_inline_max_bytes: int = STATE_INLINE_MAX_BYTES) -> None:
        self.root = Path(root)
        if state_inline_max_bytes < 0:
            raise StoreError(f"state_inline_max_bytes: must be >= 0, got {state_inline_max_bytes}")
        self.state_inline_max_bytes = state_inline_max_bytes
        self._indexes: dict[Path, IndexCache] = {}

    # ---- paths -------------------------------------------------------------------------------
    def directory(self, kind: str, namespace: str = "live") -> Path:
        if not _NAMESPACE_RE.match(namespace):
            raise StoreError(f"namespace: {namespace!r} must be letters, digits, '.', '_' or '-' (max 100)")
        if not _NAMESPACE_RE.match(kind):
            raise StoreError(f"kind: {kind!r} must be letters, digits, '.', '_' or '-'")
        return self.root / namespace / kind

    # ---- reading -----------------------------------------------------------------------------
    def batch_ids(self, kind: str, namespace: str = "live") -> list[str]:
        """Ids of the persisted batches (those whose ``.avro`` exists), by name."""
        d = self.directory(kind, namespace)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".avro") and not n.startswith("."))

    def batches(self, kind: str, namespace: str = "live") -> list[BatchInfo]:
        """Every persisted batch of ``kind``, oldest first (manifest ``created_at_ms``, then id).

        Served from the directory's index (``streaming/store_index.py``): only manifests written
        since the last call are read, so a poll does not grow with the store.
        """
        d = self.directory(kind, namespace)
        return [BatchInfo(bid, d / f"{bid}.avro", m) for bid, m in self._index(d).ordered()]

    def batches_after(self, kind: str, batch_id: str | None, created_at_ms: int = 0,
                      namespace: str = "live") -> list[BatchInfo]:
        """The batches after ``batch_id`` in :meth:`batches` order (all when None); when that batch
        is gone, those after ``(created_at_ms, batch_id)``. Costs the answer, not the store: the
        trainer's once-a-second poll."""
        d = self.directory(kind, namespace)
        index = self._index(d)
        if batch_id is None:
            pairs = index.ordered()
        else:
            known = index.manifests.get(batch_id)
            mark = (int(known.get("created_at_ms", 0) or 0) if known is not None else int(created_at_ms), batch_id)
            pairs = index.after(mark)
        return [BatchInfo(bid, d / f"{bid}.avro", m) for bid, m in pairs]

    def _index(self, d: Path) -> IndexCache:
        index = self._indexes.get(d)
        if index is None:
            index = self._indexes[d] = IndexCache(d, lambda bid: self._read_manifest(d, bid))
        index.refresh()
        return index

    @staticmethod
    def _read_manifest(d: Path, batch_id: str) -> dict[str, Any] | None:
        """A manifest for the index, None when its batch is gone or it was never written."""
        if not (d / f"{batch_id}.avro").exists():
            return None
        try:
            result: dict[str, Any] = json.loads((d / f"{batch_id}.json").read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise StoreError(f"feature store: batch {batch_id} in {d} has no manifest; "
                             "it was not written by FeatureStore.write_batch; remove it") from exc
        return result

    def featurizer_state(self, kind: str, manifest: dict[str, Any], namespace: str = "live") -> str | None:
        """The featurizer state checkpointed with a batch: inline in its manifest, or in the
        ``<batch_id>.state.json`` file the manifest names (checked against its sha256)."""
        ref = manifest.get("featurizer_state_file")
        if not ref:
            text: str | None = manifest.get("featurizer_state")
            return text
        path = self.directory(kind, namespace) / str(ref["name"])
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"batch {manifest.get('batch_id')}: its state file {path} is gone; "
                             "replay the partition to rebuild it") from exc
        if hashlib.sha256(data).hexdigest() != ref.get("sha256"):
            raise StoreError(f"batch {manifest.get('batch_id')}: state file {path} does not match the sha256 "
                             "of its manifest; it was modified or corrupted; replay the partition")
        return data.decode("utf-8")

    def manifest(self, kind: str, batch_id: str, namespace: str = "live") -> dict[str, Any]:
        result: dict[str, Any] = json.loads(
            (self.directory(kind, namespace) / f"{batch_id}.json").read_text(encoding="utf-8"))
        return result

    def ranges(self, kind: str, topic: str, partition: int, namespace: str = "live") -> list[tuple[int, int]]:
        """Persisted ``(first, last)`` offset ranges of one partition, ascending (from file names)."""
        # Filter by name prefix before parsing: write_batch calls this per batch, and a regex per
        # file made that 1 s a write at 100k batches (bench_store_growth); still one listdir.
        prefix = f"{topic}-p{partition}-"
        try:
            names = os.listdir(self.directory(kind, namespace))
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
        d = self.directory(kind, namespace)
        return BatchInfo(bid, d / f"{bid}.avro", self.manifest(kind, bid, namespace))

    # ---- writing -----------------------------------------------------------------------------
    def write_batch(self, spec: BatchSpec, rows: Sequence[StoredRow], namespace: str = "live",
                    created_at_ms: int | None = None) -> tuple[BatchInfo, bool]:
        """Persist one batch durably; returns ``(info, written)``, ``written`` False when the very
        same batch already existed (a replay or a restart after a crash before the commit).

        Raises :class:`BatchOverlapError` when another batch of the partition overlaps the range,
        and :class:`BackpressureError` when the disk is full or not writable (nothing visible is
        left behind; retry later).
        """
        bid = batch_id_for(spec.topic, spec.partition, spec.first_offset, spec.last_offset)
        d = self.directory(spec.kind, namespace)
        final = d / f"{bid}.avro"
        if final.exists():
            return BatchInfo(bid, final, self.manifest(spec.kind, bid, namespace)), False
        for first, last in self.ranges(spec.kind, spec.topic, spec.partition, namespace):
            if first <= spec.last_offset and spec.first_offset <= last:
                raise BatchOverlapError(
                    f"batch {bid}: offsets {spec.first_offset}..{spec.last_offset} overlap the persisted "
                    f"batch {first}..{last} of {spec.topic}[{spec.partition}]; resume after offset {last}"
                )
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
            write_synced(tmp_json, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
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

    def remove_batch(self, kind: str, batch_id: str, namespace: str = "live") -> int:
        """Delete one batch (``.avro`` first: it stops existing at once, then its manifest and
        state file); returns the bytes freed. Only retention (``streaming/retention.py``) and
        tests call this: deleting a batch a model's lineage names breaks its reproduction."""
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
        manifest = self._manifest(bid, spec, rows, data, namespace, created_at_ms)
        state_bytes = None if spec.featurizer_state is None else spec.featurizer_state.encode("utf-8")
        if state_bytes is None or len(state_bytes) <= self.state_inline_max_bytes:
            return manifest, None
        manifest["featurizer_state"] = None
        manifest["featurizer_state_file"] = {"name": f"{bid}{STATE_SUFFIX}", "size_bytes": len(state_bytes),
                                             "sha256": hashlib.sha256(state_bytes).hexdigest()}
        return manifest, state_bytes

    @staticmethod
    def _manifest(bid: str, spec: BatchSpec, rows: Sequence[StoredRow], data: bytes, namespace: str,
                  created_at_ms: int | None) -> dict[str, Any]:
        times = [int(r.event_time_ms) for r in rows]
        created = now_ms() if created_at_ms is None else created_at_ms
        return {
            "format": MANIFEST_FORMAT,
            "batch_id": bid,
            "namespace": namespace,
            "kind": spec.kind,
            "ranges": [{
                "topic": spec.topic,
                "partition": spec.partition,
                "first_offset": spec.first_offset,
                "last_offset": spec.last_offset,
                "dead_letter_offsets": sorted(int(o) for o in spec.dead_letter_offsets),
            }],
            "featurizer": {"kind": spec.kind, "version": spec.featurizer_version,
                           "n_features": spec.n_features, "label_names": list(spec.label_names)},
            "schema_ids": sorted({int(s) for s in spec.schema_ids}),
            "record_count": len(rows),
            "event_time_min_ms": min(times) if times else None,
            "event_time_max_ms": max(times) if times else None,
            "created_at_ms": created,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
            "featurizer_state": spec.featurizer_state,
            **spec.extra,
        }

    def remove_stale_temp_files(self, kind: str, namespace: str = "live", older_than_s: float = 0.0) -> int:
        """Delete temp files left by crashed writers (pid no longer alive on this host, or older
        than ``older_than_s`` when that is > 0). Returns how many were removed."""
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
        digest = hashlib.sha256(info.path.read_bytes()).hexdigest()
        if digest != info.manifest.get("sha256"):
            raise StoreError(f"batch {info.batch_id}: sha256 {digest} does not match its manifest; "
                             "the file was modified or corrupted; delete it and replay the range")
