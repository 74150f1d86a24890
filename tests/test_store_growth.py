"""Store growth (issue 13, item 6): the batch index, bounded manifests and retention (`store gc`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from streaming import config
from streaming.exceptions import StoreError
from streaming.retention import collect
from streaming.store import BatchSpec, FeatureStore, StoredRow
from streaming.store_index import INDEX_NAME

TOPIC = "t.sensor.raw"
DAY_MS = 86_400_000
NOW_MS = int(time.time() * 1000)  # the CLI test ages batches against the real clock


def _rows(partition: int, first: int, n: int, shift: float = 0.0) -> list[StoredRow]:
    return [StoredRow(x=np.arange(3, dtype=np.float32) + i + shift, labels={"y": float(i)},
                      event_time_ms=1_700_000_000_000 + i, key=f"k{i}", topic=TOPIC, partition=partition,
                      offset=first + i) for i in range(n)]


def _write(store: FeatureStore, partition: int, first: int, n: int = 5, created_at_ms: int | None = None,
           state: str | None = '{"w": 1}', shift: float = 0.0, namespace: str = "live") -> str:
    spec = BatchSpec(kind="sensor", topic=TOPIC, partition=partition, first_offset=first, last_offset=first + n - 1,
                     featurizer_version="1", n_features=3, label_names=["y"], featurizer_state=state)
    info, written = store.write_batch(spec, _rows(partition, first, n, shift), namespace=namespace,
                                      created_at_ms=created_at_ms)
    assert written
    return info.batch_id


def _ids(store: FeatureStore) -> list[str]:
    return [b.batch_id for b in store.batches("sensor")]


# ---- index -------------------------------------------------------------------------------------
def test_index_sees_batches_added_removed_and_replaced(tmp_path: Path) -> None:
    reader, writer = FeatureStore(tmp_path), FeatureStore(tmp_path)  # two processes' worth of caches
    a = _write(writer, 0, 0, created_at_ms=1000)
    assert _ids(reader) == [a]
    b = _write(writer, 0, 5, created_at_ms=2000)
    c = _write(writer, 1, 0, created_at_ms=1500)  # older created_at lands in the middle
    assert _ids(reader) == [a, c, b]
    writer.remove_batch("sensor", c)
    assert _ids(reader) == [a, b]
    assert not (tmp_path / "live" / "sensor" / f"{c}.json").exists()
    old_sha = reader.batches("sensor")[0].manifest["sha256"]
    writer.remove_batch("sensor", a)  # replaced: same id, other rows and time
    _write(writer, 0, 0, created_at_ms=3000, shift=10.0)
    got = reader.batches("sensor")
    assert [x.batch_id for x in got] == [b, a]
    assert got[1].manifest["sha256"] != old_sha
    assert reader._indexes[tmp_path / "live" / "sensor"].rebuilds == 0  # followed the journal, never re-parsed


def test_batches_after_is_the_tail_after_a_batch(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    ids = [_write(store, 0, i * 5, created_at_ms=1000 + i) for i in range(6)]
    assert [b.batch_id for b in store.batches_after("sensor", ids[2])] == ids[3:]
    assert [b.batch_id for b in store.batches_after("sensor", None)] == ids
    assert store.batches_after("sensor", ids[-1]) == []
    store.remove_batch("sensor", ids[2])  # gone: falls back to the recorded created_at
    assert [b.batch_id for b in store.batches_after("sensor", ids[2], created_at_ms=1002)] == ids[3:]


def test_corrupted_index_is_rebuilt(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    ids = [_write(store, 0, i * 5, created_at_ms=1000 + i) for i in range(3)]
    assert _ids(store) == ids
    index = tmp_path / "live" / "sensor" / INDEX_NAME
    with open(index, "ab") as fh:
        fh.write(b'{"op": "add", "id": tru\n')  # a torn line
    writer = FeatureStore(tmp_path)
    extra = _write(writer, 0, 15, created_at_ms=2000)
    assert _ids(store) == [*ids, extra]
    # the writer reads the index first (write_batch's overlap check): it meets the torn line and rebuilds
    assert writer._indexes[index.parent].rebuilds + store._indexes[index.parent].rebuilds == 1
    index.write_bytes(b"\x00garbage\n")
    assert _ids(FeatureStore(tmp_path)) == [*ids, extra]
    assert json.loads(index.read_text().splitlines()[0])["op"] == "add"  # rewritten from the manifests


def test_missing_index_and_lost_appends_are_reconciled(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    a = _write(store, 0, 0, created_at_ms=1000)
    index = tmp_path / "live" / "sensor" / INDEX_NAME
    kept = index.read_bytes()
    b = _write(store, 0, 5, created_at_ms=2000)
    index.write_bytes(kept)  # as if killed between the .avro rename and the index append
    os.unlink(tmp_path / "live" / "sensor" / f"{a}.avro")  # and a batch deleted behind its back
    assert _ids(FeatureStore(tmp_path)) == [b]  # a new reader reconciles with the directory
    index.unlink()
    assert _ids(FeatureStore(tmp_path)) == [b]
    assert index.exists()


def test_index_follows_a_swapped_directory(tmp_path: Path) -> None:
    """`store promote` renames namespace directories: the reader must see the new one's batches."""
    store = FeatureStore(tmp_path)
    _write(store, 0, 0, created_at_ms=1000)
    assert len(_ids(store)) == 1
    other = FeatureStore(tmp_path)
    rebuilt = [_write(other, 2, i * 5, created_at_ms=5000 + i, namespace="rebuilt") for i in range(2)]
    os.rename(tmp_path / "live", tmp_path / "old")
    os.rename(tmp_path / "rebuilt", tmp_path / "live")
    assert _ids(store) == rebuilt


# ---- bounded manifests -------------------------------------------------------------------------
def test_large_state_goes_to_a_state_file_with_its_sha256(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, state_inline_max_bytes=64)
    small = _write(store, 0, 0, state='{"w": 1}')
    big_state = json.dumps({"windows": list(range(5000))})
    big = _write(store, 0, 5, state=big_state)
    d = tmp_path / "live" / "sensor"
    m_small, m_big = store.manifest("sensor", small), store.manifest("sensor", big)
    assert m_small["featurizer_state"] == '{"w": 1}' and "featurizer_state_file" not in m_small
    assert m_big["featurizer_state"] is None
    assert (d / f"{big}.json").stat().st_size < 2048 < len(big_state)
    assert store.featurizer_state("sensor", m_big) == big_state
    assert store.featurizer_state("sensor", m_small) == '{"w": 1}'
    state_file = d / m_big["featurizer_state_file"]["name"]
    state_file.write_text(big_state.replace("4999", "4998"))
    with pytest.raises(StoreError, match="sha256"):
        store.featurizer_state("sensor", m_big)
    store.remove_batch("sensor", big)
    assert not state_file.exists()


# ---- retention ---------------------------------------------------------------------------------
def _settings(tmp_path: Path, **kw: object) -> config.Settings:
    return config.load({"home": str(tmp_path)}, environ={}).with_(**kw)


def _version(settings: config.Settings, name: str, version: int, lineage: list[str]) -> None:
    vdir = settings.model_dir / name / str(version)
    vdir.mkdir(parents=True)
    meta = {"lineage": {"batches": [{"batch_id": b, "sha256": "x", "role": "train"} for b in lineage]}}
    (vdir / "metadata.json").write_text(json.dumps(meta))


def _aged_store(settings: config.Settings) -> tuple[FeatureStore, list[str]]:
    store = FeatureStore(settings.feature_store)
    ids = [_write(store, 0, i * 5, created_at_ms=NOW_MS - (10 - i) * DAY_MS) for i in range(10)]
    return store, ids  # ids[i] is 10 - i days old


def test_gc_by_age_keeps_lineage_and_the_newest_batch(tmp_path: Path) -> None:
    settings = _settings(tmp_path, store_retention_days=3.0)
    store, ids = _aged_store(settings)
    _version(settings, "m", 1, [ids[0], ids[4]])
    result = collect(settings, dry_run=False, now_ms=NOW_MS)
    # ids[3] too: --from-offsets replays ids[4]'s range from the featurizer state ids[3] recorded
    assert sorted(d["batch_id"] for d in result.deleted) == sorted(set(ids[:7]) - {ids[0], ids[3], ids[4]})
    assert result.kept_for_lineage == 3
    assert _ids(FeatureStore(settings.feature_store)) == [ids[0], ids[3], ids[4], *ids[7:]]
    assert set(_ids(store)) == {ids[0], ids[3], ids[4], *ids[7:]}  # a live reader's index agrees


def test_gc_by_size_and_the_newest_of_a_partition(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store, ids = _aged_store(settings)
    _version(settings, "m", 3, [ids[1]])
    one = collect(settings, dry_run=True, max_bytes=10**9, now_ms=NOW_MS)
    assert one.deleted == []
    result = collect(settings, dry_run=False, max_bytes=1, now_ms=NOW_MS)  # everything over the cap
    assert {d["reason"] for d in result.deleted} == {"size"}
    assert _ids(store) == [ids[0], ids[1], ids[9]]  # lineage, the batch before it, the partition's resume point
    assert result.kept_newest_of_partition == 1 and result.bytes_after["sensor"] > 1


def test_gc_keeps_the_batches_of_a_training_cycle_in_progress(tmp_path: Path) -> None:
    """gc run while a trainer trained deleted batches the coming version's lineage named: it was promoted
    and could not be reproduced. A live trainer's cycle marker now protects them; a dead one's does not."""
    from trainer.cycle import write_marker

    settings = _settings(tmp_path, store_retention_days=3.0)
    store, ids = _aged_store(settings)
    write_marker(settings, "m", phase="started", train_batches=[ids[1]], holdout_batches=[ids[2]],
                 reservoir_batches=[ids[0]])  # this process: alive
    dead = settings.state_dir / "trainer" / "other.json"
    dead.write_text(json.dumps({"model": "other", "pid": 2**22 + 12345, "phase": "started",
                                "train_batches": [ids[3]]}))
    result = collect(settings, dry_run=False, now_ms=NOW_MS)
    assert result.kept_for_lineage == 3
    assert _ids(store) == [ids[0], ids[1], ids[2], *ids[7:]]
    write_marker(settings, "m", phase="published", version=1, action="PROMOTED")  # the cycle is over
    assert [d["batch_id"] for d in collect(settings, dry_run=False, now_ms=NOW_MS).deleted] == ids[:3]


def test_gc_dry_run_deletes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamlearn.cli import main

    settings = _settings(tmp_path)
    store, ids = _aged_store(settings)
    before = sorted(os.listdir(store.directory("sensor")))
    assert main(["--home", str(tmp_path), "store", "gc", "--dry-run", "--retention-days", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "would delete 9 batches" in out and ids[0] in out
    assert sorted(os.listdir(store.directory("sensor"))) == before
    assert main(["--home", str(tmp_path), "store", "gc", "--retention-days", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["deleted"]) == 9 and not report["dry_run"]
    assert _ids(FeatureStore(settings.feature_store)) == [ids[9]]


def test_gc_refuses_when_a_version_lineage_is_unreadable(tmp_path: Path) -> None:
    settings = _settings(tmp_path, store_retention_days=1.0)
    store, ids = _aged_store(settings)
    (settings.model_dir / "m" / "2").mkdir(parents=True)  # no metadata.json
    with pytest.raises(StoreError, match="m/2"):
        collect(settings, dry_run=False, now_ms=NOW_MS)
    assert _ids(store) == ids


def test_retention_settings_reject_negative_values(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="STREAMLEARN_STORE_MAX_BYTES"):
        config.load({"home": str(tmp_path)}, environ={"STREAMLEARN_STORE_MAX_BYTES": "-1"})


def test_a_running_reader_finds_a_batch_the_journal_missed(tmp_path: Path) -> None:
    """A writer killed between the .avro rename and the index append: a reader that is already
    running finds the batch by its bounded per-poll directory scan, without a restart."""
    reader = FeatureStore(tmp_path)
    a = _write(reader, 0, 0, created_at_ms=1000)
    assert _ids(reader) == [a]
    index = tmp_path / "live" / "sensor" / INDEX_NAME
    kept = index.read_bytes()
    writer = FeatureStore(tmp_path)
    lost = _write(writer, 0, 5, created_at_ms=2000)
    with open(index, "r+b") as fh:  # the append never happened (same inode: no reload)
        fh.truncate(len(kept))
    newer = _write(writer, 1, 0, created_at_ms=3000)
    reader._indexes[index.parent].scan_chunk = 1
    seen: list[str] = []
    for _ in range(10):  # one name per poll: a full pass takes a handful of polls
        seen = _ids(reader)
        if lost in seen:
            break
    assert seen == [a, lost, newer]
    assert b'"id":"%s"' % lost.encode() in index.read_bytes()  # journaled for the next reader


def test_the_scan_does_not_resurrect_a_batch_being_deleted(tmp_path: Path) -> None:
    """remove_batch journals "del" before unlinking: a running reader's scan that meets the files
    in between must not add the batch back."""
    from streaming.store_index import append

    reader = FeatureStore(tmp_path)
    a = _write(reader, 0, 0, created_at_ms=1000)
    b = _write(reader, 0, 5, created_at_ms=2000)
    assert _ids(reader) == [a, b]
    append(tmp_path / "live" / "sensor", "del", a)  # remove_batch, stopped before the unlink
    assert _ids(reader) == [b]
    assert _ids(reader) == [b]  # a full scan pass (256 names) met a's files
    reader.remove_batch("sensor", a)
    assert _ids(reader) == [b] and _ids(FeatureStore(tmp_path)) == [b]


def test_copies_and_stray_files_beside_batches_are_not_batches(tmp_path: Path) -> None:
    """`cp X.avro X.bak.avro` (and its manifest) was a second batch: the same rows trained on twice, or held
    out and trained on. A stray `empty.avro` with no manifest stopped every reader."""
    settings = _settings(tmp_path)
    store = FeatureStore(settings.feature_store)
    bid = _write(store, 0, 0)
    d = store.directory("sensor")
    for stem in (f"{bid}.bak", f"{bid} (copy)"):
        (d / f"{stem}.avro").write_bytes((d / f"{bid}.avro").read_bytes())
        (d / f"{stem}.json").write_text((d / f"{bid}.json").read_text())
    (d / "empty.avro").write_bytes(b"")
    fresh = FeatureStore(settings.feature_store)
    assert fresh.batch_ids("sensor") == [bid] and _ids(fresh) == [bid]
    second = _write(store, 0, 5)
    assert _ids(store) == [bid, second]  # a running reader's index too
