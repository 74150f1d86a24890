"""The writer's overlap check refreshes the index *paced*: back-to-back writes do not each read a chunk
of the directory (bench_store_growth: that scan step was a fifth of an fsynced write), yet a batch the
journal missed is still found by the writer's own scan, and a reader's poll still scans every time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streaming.store import BatchOverlapError, FeatureStore
from streaming.store_index import INDEX_NAME, IndexCache
from tests.test_store_overlap_index import TOPIC, _write  # one batch of rows first..last on a partition


def _count_steps(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the directory of every scan step (a chunk of ``os.scandir`` names) any index takes."""
    steps: list[Path] = []
    real = IndexCache._scan_step

    def counting(self: IndexCache) -> None:
        steps.append(self.directory)
        real(self)

    monkeypatch.setattr(IndexCache, "_scan_step", counting)
    return steps


def test_back_to_back_writes_scan_at_most_once_per_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FeatureStore(tmp_path)
    _write(store, 0, 0, 9)
    store._indexes[store.directory("sensor")].scan_interval_s = 3600.0
    steps = _count_steps(monkeypatch)
    for i in range(1, 30):
        _write(store, 0, i * 10, i * 10 + 9)
    assert len(steps) <= 1  # the first write may take the one step the interval allows
    reader = FeatureStore(tmp_path)
    reader.batches("sensor")  # load + reconcile (a names-only listdir), no step
    before = len(steps)
    for _ in range(4):
        assert len(reader.batches("sensor")) == 30
    assert len(steps) - before == 4  # a reader's poll is never paced: one step each


def test_writes_further_apart_than_the_interval_scan_each_time(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = FeatureStore(tmp_path)
    _write(store, 0, 0, 9)
    store.batches("sensor")  # the journal the write created is loaded and reconciled: steady state
    store._indexes[store.directory("sensor")].scan_interval_s = 0.0  # every write is "later than the interval"
    steps = _count_steps(monkeypatch)
    for i in range(1, 6):
        _write(store, 0, i * 10, i * 10 + 9)
    assert len(steps) == 5


def test_a_writer_still_finds_a_batch_the_journal_missed(tmp_path: Path) -> None:
    """Another writer killed between its rename and its journal append: this writer's paced scan finds
    the batch and refuses an overlapping range (no restart, no reload)."""
    mine, other = FeatureStore(tmp_path), FeatureStore(tmp_path)
    _write(mine, 0, 0, 9)
    mine.batches("sensor")  # steady state: the journal loaded and reconciled
    d = mine.directory("sensor")
    index_file = d / INDEX_NAME
    kept = index_file.read_bytes()
    _write(other, 0, 10, 19)
    with open(index_file, "r+b") as fh:  # its append never happened (same inode: no reload)
        fh.truncate(len(kept))
    cache = mine._indexes[d]
    cache.scan_chunk, cache.scan_interval_s, cache._last_scan = 1, 3600.0, time.monotonic()
    assert mine.overlapping("sensor", TOPIC, 0, 12, 15) is None  # not in the journal, not scanned yet
    cache.scan_interval_s = 0.0  # every refresh may take a step now
    found = None
    for i in range(10):  # the directory holds 5 names: a pass of 1 name a step ends within a few writes
        _write(mine, 1, i * 10, i * 10 + 9)  # another partition: each write a paced refresh
        found = mine.overlapping("sensor", TOPIC, 0, 12, 15)
        if found is not None:
            break
    assert found == (10, 19)
    with pytest.raises(BatchOverlapError, match="10..19"):
        _write(mine, 0, 15, 25)
