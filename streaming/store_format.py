"""The feature store's formats: batch ids, the row schema, the ``.avro`` bytes and the manifest.

Split from :mod:`streaming.store` by responsibility: everything here is a pure function of its
arguments (no file system), which is what makes a replay byte-identical and a lineage batch
re-creatable from Kafka (``trainer/replay.py``); :mod:`streaming.store` keeps the directory, the
durability protocol and the index. Every name here is re-exported by :mod:`streaming.store`.

``batch_id`` is derived from the topic/partition/offset range (``<topic>-p<partition>-<first>-<last>``,
offsets zero-padded so names sort by offset). The ``.avro`` bytes are a pure function of the rows:
the sync marker is derived from the batch id and no wall-clock time is written into it
(``created_at`` lives only in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

import fastavro
import numpy as np

from streaming.clock import now_ms
from streaming.exceptions import StoreError

MANIFEST_FORMAT = 1
OFFSET_DIGITS = 20
_BATCH_RE = re.compile(r"^(?P<topic>.+)-p(?P<partition>\d+)-(?P<first>\d{20})-(?P<last>\d{20})$")

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


class StoredRow(NamedTuple):
    """One row to persist: features plus where the event came from.

    A NamedTuple (it was a frozen dataclass): the stream worker builds one per record, and a frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost about 3x as much; the fields,
    keyword construction and immutability are the same."""

    x: np.ndarray
    labels: dict[str, float | None]
    event_time_ms: int
    key: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class BatchInfo:
    """A persisted batch: its id, the path of its ``.avro`` (a URL on object storage) and its parsed manifest."""

    batch_id: str
    path: Path | str
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
    return (f"{topic}-p{partition}-{first_offset:0{OFFSET_DIGITS}d}-{last_offset:0{OFFSET_DIGITS}d}")


def is_batch_file(name: str) -> bool:
    """``name`` is a batch's ``.avro`` (``<batch id>.avro``, not hidden). A copy a user left beside one
    (``X.bak.avro``, ``X (copy).avro``) or a stray ``empty.avro`` is not: a copy was trained on twice
    (held out and trained on: leakage), and a stray file with no manifest stopped every reader."""
    return name.endswith(".avro") and not name.startswith(".") and _BATCH_RE.match(name[:-5]) is not None


def parse_batch_id(batch_id: str) -> tuple[str, int, int, int]:
    """``(topic, partition, first_offset, last_offset)`` of a batch id made by :func:`batch_id_for`."""
    m = _BATCH_RE.match(batch_id)
    if not m:
        raise StoreError(f"batch_id: {batch_id!r} is not <topic>-p<partition>-<first>-<last>")
    return m["topic"], int(m["partition"]), int(m["first"]), int(m["last"])


def _sync_marker(batch_id: str) -> bytes:
    """16 bytes derived from the id: fastavro's default marker is random, which breaks byte identity."""
    return hashlib.sha256(("streamlearn-sync:" + batch_id).encode()).digest()[:16]


def encode_rows(batch_id: str, rows: Iterable[StoredRow], n_features: int,
                label_names: Sequence[str]) -> bytes:
    """The exact bytes of a batch's ``.avro`` file (pure function of its arguments); encoded
    column-wise by :mod:`streaming.rowcodec`, byte-identical to ``fastavro.writer`` of the rows."""
    from streaming.rowcodec import encode_container

    metadata = {
        "streamlearn.batch_id": batch_id,
        "streamlearn.n_features": str(n_features),
        "streamlearn.label_names": json.dumps(list(label_names)),
    }
    return encode_container(list(rows), n_features, label_names, schema=_PARSED_ROW_SCHEMA, codec="snappy",
                            sync_marker=_sync_marker(batch_id), metadata=metadata, sync_interval=SYNC_INTERVAL)


def decode_batch(fh: BinaryIO) -> dict[str, np.ndarray]:
    """The arrays of :func:`streaming.store.read_batch` from an open ``.avro`` file (any binary stream)."""
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


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest file's bytes: compact, sorted JSON, one line.

    Why compact: ``json.dumps(indent=...)`` runs the pure-Python encoder (the C one serves only
    ``indent=None``); a compact manifest is written several times faster and is ~20 % smaller.
    Readers only ``json.loads`` it; ``jq .`` pretty-prints one for a person.
    """
    return (json.dumps(manifest, sort_keys=True, separators=(",", ":")) + "\n").encode()


def build_manifest(bid: str, spec: BatchSpec, rows: Sequence[StoredRow], data: bytes, namespace: str,
                   created_at_ms: int | None) -> dict[str, Any]:
    """A batch's manifest (featurizer state inline; :meth:`FeatureStore.prepare_manifest` may move it out)."""
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
