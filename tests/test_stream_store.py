"""Feature store: atomic, deterministic, idempotent batch files and the trainer's reader API."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from streaming.exceptions import BackpressureError
from streaming.store import (
    BatchOverlapError,
    BatchSpec,
    FeatureStore,
    StoredRow,
    batch_id_for,
    parse_batch_id,
    read_batch,
)


def _rows(topic: str, partition: int, first: int, n: int, n_features: int = 3) -> list[StoredRow]:
    return [
        StoredRow(x=np.arange(n_features, dtype=np.float32) + i, labels={"y": None if i % 2 else float(i)},
                  event_time_ms=1_700_000_000_000 + i, key=f"k{i % 4}", topic=topic, partition=partition,
                  offset=first + i)
        for i in range(n)
    ]


def _spec(first: int, last: int, **kw: object) -> BatchSpec:
    base: dict[str, object] = dict(kind="sensor", topic="t.sensor.raw", partition=1, first_offset=first,
                                   last_offset=last, featurizer_version="1", n_features=3, label_names=["y"],
                                   schema_ids=[7], featurizer_state='{"w": 1}')
    base.update(kw)
    return BatchSpec(**base)  # type: ignore[arg-type]


def test_batch_id_roundtrip_and_sorts_by_offset() -> None:
    a = batch_id_for("p_x.sensor.raw", 2, 9, 99)
    b = batch_id_for("p_x.sensor.raw", 2, 100, 1000)
    assert parse_batch_id(a) == ("p_x.sensor.raw", 2, 9, 99)
    assert sorted([b, a]) == [a, b]


def test_write_read_roundtrip_and_manifest(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    rows = _rows("t.sensor.raw", 1, 10, 5)
    info, written = store.write_batch(_spec(10, 15, dead_letter_offsets=[15]), rows)
    assert written
    arrays = read_batch(info.path)
    assert arrays["x"].shape == (5, 3) and arrays["x"].dtype == np.float32
    np.testing.assert_array_equal(arrays["x"][2], [2, 3, 4])
    assert np.isnan(arrays["y"][1]) and arrays["y"][2] == 2.0
    assert arrays["offset"].tolist() == [10, 11, 12, 13, 14]
    assert arrays["partition"].tolist() == [1] * 5
    assert arrays["event_time_ms"][0] == 1_700_000_000_000
    [listed] = store.batches("sensor")
    assert listed.batch_id == info.batch_id and listed.path == info.path
    m = listed.manifest
    assert m["ranges"] == [{"topic": "t.sensor.raw", "partition": 1, "first_offset": 10, "last_offset": 15,
                            "dead_letter_offsets": [15]}]
    assert m["record_count"] == 5 and m["schema_ids"] == [7] and m["featurizer"]["version"] == "1"
    assert m["featurizer_state"] == '{"w": 1}'
    store.verify(listed)
    assert not [n for n in os.listdir(info.path.parent) if n.startswith(".")]


def test_same_range_is_never_written_twice_and_bytes_are_deterministic(tmp_path: Path) -> None:
    a, b = FeatureStore(tmp_path / "a"), FeatureStore(tmp_path / "b")
    rows = _rows("t.sensor.raw", 1, 0, 20)
    ia, _ = a.write_batch(_spec(0, 19), rows, created_at_ms=1)
    ib, _ = b.write_batch(_spec(0, 19), rows, created_at_ms=2)
    assert ia.path.read_bytes() == ib.path.read_bytes()
    before = ia.path.stat().st_mtime_ns
    again, written = a.write_batch(_spec(0, 19), rows)
    assert not written and again.path.stat().st_mtime_ns == before
    with pytest.raises(BatchOverlapError, match="resume after offset 19"):
        a.write_batch(_spec(15, 30), _rows("t.sensor.raw", 1, 15, 16))
    a.write_batch(_spec(20, 21), _rows("t.sensor.raw", 1, 20, 2))
    last = a.last_batch("sensor", "t.sensor.raw", 1)
    assert last is not None and last.manifest["ranges"][0]["last_offset"] == 21
    assert a.last_batch("sensor", "t.sensor.raw", 0) is None


def test_batches_oldest_first_and_orphans_ignored(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    store.write_batch(_spec(50, 59, partition=0), _rows("t.sensor.raw", 0, 50, 10), created_at_ms=200)
    store.write_batch(_spec(0, 9), _rows("t.sensor.raw", 1, 0, 10), created_at_ms=100)
    d = store.directory("sensor")
    (d / f"{batch_id_for('t.sensor.raw', 2, 0, 9)}.json").write_text("{}")  # .avro never landed
    (d / ".half.avro.999999-1.tmp").write_bytes(b"partial")
    ids = [b.batch_id for b in store.batches("sensor")]
    assert ids == [batch_id_for("t.sensor.raw", 1, 0, 9), batch_id_for("t.sensor.raw", 0, 50, 59)]
    assert store.remove_stale_temp_files("sensor") == 1
    assert store.batches("sensor", namespace="replay1") == []


def test_unwritable_store_is_backpressure_and_leaves_nothing(tmp_path: Path) -> None:
    # Root ignores chmod, so make the kind directory a regular file: mkdir/open really fail.
    store = FeatureStore(tmp_path)
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "sensor").write_text("not a directory")
    with pytest.raises(BackpressureError, match="free disk space or fix permissions"):
        store.write_batch(_spec(0, 4), _rows("t.sensor.raw", 1, 0, 5))
    (tmp_path / "live" / "sensor").unlink()
    info, written = store.write_batch(_spec(0, 4), _rows("t.sensor.raw", 1, 0, 5))
    assert written and len(read_batch(info.path)["offset"]) == 5


def test_a_store_path_too_long_for_its_files_is_one_clear_error(tmp_path: Path) -> None:
    """A 4,000-character store path: the worker consumed, then died on a raw ENAMETOOLONG traceback."""
    from streaming.exceptions import StoreError

    deep = tmp_path
    while len(str(deep)) < 4040:  # the directory fits PATH_MAX (4096); a batch file under it does not
        deep = deep / ("d" * min(200, 4040 - len(str(deep))))
    deep.mkdir(parents=True)
    with pytest.raises(StoreError, match="too long a path for this system .*STREAMLEARN_FEATURE_STORE"):
        FeatureStore(deep).write_batch(_spec(0, 4), _rows("t.sensor.raw", 1, 0, 5))


def test_wrong_feature_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="features"):
        FeatureStore(tmp_path).write_batch(_spec(0, 0, n_features=4), _rows("t.sensor.raw", 1, 0, 1))
