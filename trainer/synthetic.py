"""Featurize generated event records straight into feature-store batches (benchmarks and tests).

The live path is Kafka -> stream worker -> store; this helper runs the same featurizer
(``get_featurizer(kind, version)``) and the same ``FeatureStore.write_batch`` without a broker, so
the learning benchmark and trainer tests exercise the real batch format, manifests and hashes.
Offsets are consecutive positions in one partition of ``topic``, as a single-partition stream
would assign them; ``created_at_ms`` increases by one per batch so the store's order is the
stream's order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from streaming.store import BatchInfo, BatchSpec, FeatureStore, StoredRow


def write_batches(store: FeatureStore, kind: str, records: Iterable[dict[str, Any]], *, batch_size: int,
                  topic: str, namespace: str = "live", version: str | None = None, partition: int = 0,
                  first_offset: int = 0, created_at_ms: int = 1_700_000_000_000,
                  max_batches: int | None = None) -> list[BatchInfo]:
    """Featurize ``records`` in order and persist them as batches of ``batch_size`` rows."""
    from streaming.features import get_featurizer

    fz = get_featurizer(kind, version)
    state = fz.new_state()
    out: list[BatchInfo] = []
    rows: list[StoredRow] = []
    offset = first_offset

    def flush() -> None:
        spec = BatchSpec(kind=kind, topic=topic, partition=partition, first_offset=rows[0].offset,
                         last_offset=rows[-1].offset, featurizer_version=fz.version, n_features=fz.n_features,
                         label_names=list(fz.label_names), schema_ids=[1],
                         featurizer_state=fz.state_to_json(state))
        info, _ = store.write_batch(spec, rows, namespace=namespace, created_at_ms=created_at_ms + len(out))
        out.append(info)
        rows.clear()

    for record in records:
        row = fz.featurize(record, state)
        rows.append(StoredRow(row.x, row.labels, row.event_time_ms, row.key, topic, partition, offset))
        offset += 1
        if len(rows) >= batch_size:
            flush()
            if max_batches is not None and len(out) >= max_batches:
                return out
    if rows:
        flush()
    return out
