"""Small synthetic feature stores for the columnar store's tests (tests/test_columnar.py, tests/test_query.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from streaming import config
from streaming.store import BatchSpec, FeatureStore, StoredRow

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z: rows cross a UTC midnight within a few hours
TOPIC = "t.sensor.raw"
N_FEATURES = 3


def local_settings(tmp_path: Path) -> config.Settings:
    return config.load({"home": tmp_path / "home"})


def row(partition: int, offset: int, t: int, key: str | None = None) -> StoredRow:
    return StoredRow(x=np.asarray([offset, partition, t % 1000], dtype=np.float32),
                     labels={"y": None if offset % 3 == 0 else float(offset), "z": float(partition)},
                     event_time_ms=t, key=key if key is not None else f"k{offset % 4}", topic=TOPIC,
                     partition=partition, offset=offset)


def write(store: FeatureStore, partition: int, first: int, n: int, *, step_ms: int = 600_000,
          t0: int = T0, namespace: str = "live", dead_letters: tuple[int, ...] = ()) -> list[StoredRow]:
    """One batch of ``partition`` covering offsets first..first+n-1 (the dead-letter offsets hold no row)."""
    rows = [row(partition, o, t0 + o * step_ms + partition * 7) for o in range(first, first + n)
            if o not in dead_letters]
    spec = BatchSpec(kind="sensor", topic=TOPIC, partition=partition, first_offset=first, last_offset=first + n - 1,
                     featurizer_version="sensor-test", n_features=N_FEATURES, label_names=["y", "z"],
                     dead_letter_offsets=list(dead_letters))
    store.write_batch(spec, rows, namespace=namespace)
    return rows


def build_store(settings: config.Settings, batches: int = 4, per_batch: int = 10) -> list[StoredRow]:
    """Two partitions with interleaved event times (so files overlap in time), ``batches`` batches each."""
    store = FeatureStore(settings.feature_store)
    rows: list[StoredRow] = []
    for b in range(batches):
        for p in (0, 1):
            rows += write(store, p, b * per_batch, per_batch)
    return rows


def ident(r: Any) -> tuple[str, int, int]:
    """(topic, partition, offset) of a StoredRow or a query row dict."""
    if isinstance(r, dict):
        return (r["topic"], int(r["partition"]), int(r["offset"]))
    return (r.topic, r.partition, r.offset)


def order_key(r: StoredRow) -> tuple[int, str, int, int]:
    return (r.event_time_ms, r.topic, r.partition, r.offset)
