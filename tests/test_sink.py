"""The feature sink (add / flush / write): offsets are handed on only after their batch is durable,
a refused batch is held in order and retried with a growing backoff, an overlap is reported per
partition, and the committer never loses an offset to a failed commit.

No broker is needed: the sink's contract is between the store on disk and a commit callback (the
live worker wires it to the consumer group; tests/test_stream_worker.py and test_stream_faults.py
cover that path on the real broker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import TopicPartition

from streaming.batcher import MicroBatcher, WorkerStats
from streaming.exceptions import BackpressureError, PublishError, SinkBackpressureError
from streaming.sink import FeatureSink, OffsetCommitter
from streaming.store import BatchSpec, FeatureStore, StoredRow, batch_id_for

TOPIC = "t.sensor.raw"


def _row(partition: int, offset: int) -> StoredRow:
    return StoredRow(np.array([offset, 1.0], np.float32), {"y": 1.0}, 1_700_000_000_000 + offset, "k", TOPIC,
                     partition, offset)


class Recorder:
    """on_durable: records each call and checks that every batch it covers is already on disk."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.calls: list[dict[int, int]] = []

    def __call__(self, offsets: dict[int, int]) -> None:
        ends = {p: max((last for _f, last in self.store.ranges("sensor", TOPIC, p)), default=-1) + 1
                for p in offsets}
        assert ends == offsets, f"offsets {offsets} handed on before the store held them (store ends {ends})"
        self.calls.append(dict(offsets))


def _sink(store: FeatureStore, **kw: Any) -> FeatureSink:
    batcher = MicroBatcher(kind="sensor", featurizer_version="sensor-v1", n_features=2, label_names=["y"],
                           max_records=100, max_seconds=None)
    return FeatureSink(store, "sensor", "live", TOPIC, batcher, stats=WorkerStats(),
                       checkpoint=lambda p: (f'{{"p": {p}}}', {"extra_mark": p}), **kw)


def test_flush_writes_then_hands_on_offsets_with_the_checkpoint(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    durable = Recorder(store)
    sink = _sink(store, on_durable=durable)
    for off in range(5):
        sink.add(_row(0, off), schema_id=3)
    sink.add_dead_letter(0, 5)
    sink.add(_row(1, 10), schema_id=3)
    assert sink.pending(0) == 6 and durable.calls == []
    flushed = sink.flush([0, 1, 2])  # partition 2 has nothing open: no batch, no offset
    assert flushed.written == [batch_id_for(TOPIC, 0, 0, 5), batch_id_for(TOPIC, 1, 10, 10)]
    assert flushed.offsets == {0: 6, 1: 11} and durable.calls == [{0: 6, 1: 11}]
    manifest = store.manifest("sensor", batch_id_for(TOPIC, 0, 0, 5))
    assert manifest["featurizer_state"] == '{"p": 0}' and manifest["extra_mark"] == 0
    assert manifest["ranges"][0]["dead_letter_offsets"] == [5]
    assert sink.flush().offsets == {} and durable.calls == [{0: 6, 1: 11}]  # nothing new: nothing handed on


def test_refused_batches_are_held_in_order_and_retried_with_backoff(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    kind_dir = store.directory("sensor")
    kind_dir.parent.mkdir(parents=True)
    kind_dir.write_text("in the way")  # every write below it fails (root included): ENOTDIR/EEXIST
    durable = Recorder(store)
    sink = _sink(store, on_durable=durable)
    sink.add(_row(0, 0), 3)
    with pytest.raises(SinkBackpressureError, match="free disk space") as first:
        sink.flush([0])
    sink.add(_row(0, 1), 3)
    sink.add(_row(1, 7), 3)
    with pytest.raises(SinkBackpressureError) as second:
        sink.flush([0, 1])
    assert isinstance(second.value, BackpressureError)  # callers that know only the base class still pause
    assert second.value.retry_after == 2 * first.value.retry_after > 0
    assert [(c.spec.partition, c.spec.first_offset) for c in sink.held] == [(0, 0), (0, 1), (1, 7)]
    assert durable.calls == [] and store.batch_ids("sensor") == []
    kind_dir.unlink()
    flushed = sink.flush()
    assert flushed.written == [batch_id_for(TOPIC, 0, 0, 0), batch_id_for(TOPIC, 0, 1, 1),
                               batch_id_for(TOPIC, 1, 7, 7)]
    assert sink.held == [] and durable.calls == [{0: 2, 1: 8}]


def test_unacked_dead_letters_hold_their_batch_but_not_the_batches_before(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    durable = Recorder(store)
    acked = {"ok": False}

    def dead_letters_durable(_closed: Any) -> None:
        if not acked["ok"]:
            raise PublishError("dead-letter topic: 1 dead letters not acknowledged")

    sink = _sink(store, on_durable=durable, before_write=dead_letters_durable)
    sink.add(_row(0, 0), 3)  # no dead letter: does not wait for the dead-letter topic
    sink.add_dead_letter(1, 4)
    with pytest.raises(SinkBackpressureError, match="not acknowledged") as first:
        sink.flush([0, 1])
    assert durable.calls == [{0: 1}] and [c.spec.partition for c in sink.held] == [1]
    acked["ok"] = True
    assert sink.flush().written == [batch_id_for(TOPIC, 1, 4, 4)] and durable.calls[-1] == {1: 5}
    acked["ok"] = False
    sink.add_dead_letter(1, 5)
    with pytest.raises(SinkBackpressureError) as again:
        sink.flush([1])
    assert again.value.retry_after == first.value.retry_after  # the success in between reset the backoff


def test_overlap_drops_the_partitions_queue_and_reports_it(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    zombie = BatchSpec(kind="sensor", topic=TOPIC, partition=0, first_offset=0, last_offset=3,
                       featurizer_version="sensor-v1", n_features=2, label_names=["y"])
    store.write_batch(zombie, [_row(0, o) for o in range(4)])
    durable = Recorder(store)
    sink = _sink(store, on_durable=durable)
    for off in (2, 3, 4):
        sink.add(_row(0, off), 3)
    sink.add(_row(1, 0), 3)
    flushed = sink.flush([0, 1])
    assert set(flushed.overlaps) == {0} and "resume after offset 3" in str(flushed.overlaps[0])
    assert flushed.offsets == {1: 1} and durable.calls == [{1: 1}]  # nothing of partition 0 handed on
    assert sink.held == [] and sink.pending(0) == 0


def test_a_replay_sink_without_on_durable_commits_nothing_and_rewrites_nothing(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    for attempt in range(2):
        sink = _sink(store)
        sink.add(_row(0, 0), 3)
        flushed = sink.flush([0])
        assert (flushed.written, flushed.existing) == (([batch_id_for(TOPIC, 0, 0, 0)], []) if attempt == 0
                                                       else ([], [batch_id_for(TOPIC, 0, 0, 0)]))
        assert flushed.offsets == {0: 1}
        assert sink.stats.batches + sink.stats.batches_skipped == 1


def test_committer_keeps_failed_commits_and_forgets_revoked_partitions() -> None:
    commits: list[dict[TopicPartition, int]] = []
    failing = {"on": True}

    def commit(offsets: dict[TopicPartition, int]) -> None:
        if failing["on"]:
            raise RuntimeError("rebalance in progress")
        commits.append(offsets)

    c = OffsetCommitter(TOPIC, commit, retry_s=0.0)
    c.durable({0: 5, 1: 9})
    assert commits == [] and c.pending == {TopicPartition(TOPIC, 0): 5, TopicPartition(TOPIC, 1): 9}
    c.forget(1)
    c.later({0: 7})  # a newer durable offset replaces the pending one
    failing["on"] = False
    c.retry()
    assert commits == [{TopicPartition(TOPIC, 0): 7}] and c.pending == {}
