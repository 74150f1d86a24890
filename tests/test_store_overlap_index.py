"""write_batch's overlap guard served from the store's index (issue 13, item 6): a write does not list
the directory, yet it still refuses a range another writer persisted, and a batch that left the
directory (quarantine, retention) never blocks the offsets it used to cover."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streaming.divergence import Divergence, quarantine
from streaming.store import BatchInfo, BatchOverlapError, BatchSpec, FeatureStore, StoredRow

TOPIC = "t.sensor.raw"


def _write(store: FeatureStore, partition: int, first: int, last: int, topic: str = TOPIC) -> BatchInfo:
    spec = BatchSpec(kind="sensor", topic=topic, partition=partition, first_offset=first, last_offset=last,
                     featurizer_version="1", n_features=2, label_names=["y"])
    rows = [StoredRow(np.array([o, 1.0], np.float32), {"y": 1.0}, 1_700_000_000_000 + o, "k", topic, partition, o)
            for o in range(first, last + 1)]
    info, written = store.write_batch(spec, rows)
    assert written
    return info


def test_overlaps_are_refused_from_the_index_including_another_writers_batches(tmp_path: Path) -> None:
    mine, other = FeatureStore(tmp_path), FeatureStore(tmp_path)  # two processes' caches
    _write(mine, 0, 0, 9)
    _write(other, 0, 10, 19)  # written after `mine` loaded its index: known only from the journal
    _write(mine, 1, 0, 99)  # other partitions and topics never collide
    _write(mine, 10, 0, 5)
    _write(mine, 0, 0, 3, topic="t.sensor.raw2")
    for first, last in ((5, 12), (15, 15), (19, 25), (0, 30), (9, 9)):
        with pytest.raises(BatchOverlapError, match="resume after offset"):
            _write(mine, 0, first, last)
    assert _write(mine, 0, 20, 29).batch_id.endswith("-00000000000000000029")
    info = _write(mine, 0, 30, 30)
    again, written = mine.write_batch(
        BatchSpec(kind="sensor", topic=TOPIC, partition=0, first_offset=30, last_offset=30, featurizer_version="1",
                  n_features=2, label_names=["y"]), [])
    assert not written and again.batch_id == info.batch_id  # the very same batch: skipped, not an overlap


def test_batches_moved_away_do_not_block_their_offsets(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    kept = _write(store, 0, 0, 9)
    bad = [_write(store, 0, 10, 19), _write(store, 0, 20, 29)]
    assert len(store.batches("sensor")) == 3  # the index is loaded before the batches move
    quarantine(store, "sensor", "live", Divergence(TOPIC, 0, 10, bad, "test"))
    assert [b.batch_id for b in store.batches("sensor")] == [kept.batch_id]  # journaled: no stale listing
    assert _write(store, 0, 10, 24).batch_id  # the store resumes at the divergence with other boundaries
    with pytest.raises(BatchOverlapError):
        _write(store, 0, 20, 29)  # the new batch 10..24 does block its own range
    store.remove_batch("sensor", kept.batch_id)
    assert _write(store, 0, 0, 9).batch_id == kept.batch_id
    gone = _write(store, 0, 40, 49)
    os.unlink(store.directory("sensor") / f"{gone.batch_id}.avro")  # deleted behind the index's back
    assert _write(store, 0, 45, 50).batch_id  # its stale index entry does not block the offsets
    with pytest.raises(BatchOverlapError, match="45..50"):
        _write(store, 0, 30, 45)  # a batch starting inside the range is found past the stale entry


def test_a_write_does_not_list_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-write cost must not grow with the store: after the index is loaded, writes neither
    ``listdir`` the kind directory nor scan more than a bounded chunk of it."""
    store = FeatureStore(tmp_path)
    for i in range(40):
        _write(store, i % 2, (i // 2) * 10, (i // 2) * 10 + 9)
    d = str(store.directory("sensor"))
    calls: list[str] = []
    real = os.listdir

    def counting(path: Any = ".") -> list[str]:
        if str(path) == d:
            calls.append("listdir")
        return real(path)

    monkeypatch.setattr(os, "listdir", counting)
    for i in range(40, 80):
        _write(store, i % 2, (i // 2) * 10, (i // 2) * 10 + 9)
    assert calls == []
