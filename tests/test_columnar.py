"""The columnar (Parquet) copy of the feature store and of the prediction topics (issue 17, item 5).

Small stores (tens of rows): lineage in the manifest, idempotent and incremental re-runs, a step that
dies before its manifest, a swapped namespace, refused names, DuckDB (and pandas when installed)
reading the layout, and a prediction topic on the session broker compacted from the manifest's offsets.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import streaming.columnar as columnar
from streaming.columnar import compact_all, compact_features
from streaming.columnar_format import MANIFEST_NAME, columnar_root, features_dir, predictions_dir
from streaming.exceptions import ColumnarError, StoreError
from streaming.store import FeatureStore
from tests.columnar_helpers import TOPIC, build_store, ident, local_settings, write

pytestmark = pytest.mark.timeout(120)


def _manifest(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / MANIFEST_NAME).read_text())
    return result


def _parquet_rows(directory: Path) -> list[dict[str, Any]]:
    return ds.dataset(str(directory), format="parquet", partitioning="hive").to_table().to_pylist()


def test_compaction_keeps_lineage_offsets_and_digests(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    store = FeatureStore(settings.feature_store)
    rows = build_store(settings, batches=2)
    rows += write(store, 2, 0, 5, dead_letters=(0, 1, 2, 3, 4))  # a dead-letter-only batch: zero rows
    report = compact_features(settings, "sensor")
    assert report["batches"] == 5 and report["rows"] == len(rows) == 40
    out = features_dir(columnar_root(settings), "live", "sensor")
    manifest = _manifest(out)
    batches = {b.batch_id: b for b in store.batches("sensor")}
    seen: dict[str, int] = {}
    for entry in manifest["files"]:
        path = out / entry["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert entry["path"].startswith(f"date={entry['date']}/")
        table = pq.read_table(path)
        assert table.num_rows == entry["rows"] == sum(s["rows"] for s in entry["sources"])
        for source in entry["sources"]:
            info = batches[source["batch_id"]]
            assert source["sha256"] == info.manifest["sha256"]  # the .avro's digest, checked at read time
            assert source["ranges"][0]["first_offset"] == info.manifest["ranges"][0]["first_offset"]
            assert source["ranges"][0]["last_offset"] == info.manifest["ranges"][0]["last_offset"]
            offsets = [r["offset"] for r in table.to_pylist() if r["batch_id"] == source["batch_id"]]
            assert len(offsets) == source["rows"]
            assert all(source["ranges"][0]["first_offset"] <= o <= source["ranges"][0]["last_offset"] for o in offsets)
            seen[source["batch_id"]] = seen.get(source["batch_id"], 0) + source["rows"]
        assert table["event_time_ms"].to_pylist() == sorted(table["event_time_ms"].to_pylist())
    empty = [e["batch_id"] for e in manifest["empty_batches"]]
    assert len(empty) == 1 and batches[empty[0]].manifest["ranges"][0]["dead_letter_offsets"] == [0, 1, 2, 3, 4]
    assert seen == {bid: b.manifest["record_count"] for bid, b in batches.items() if bid not in empty}
    assert len({e["date"] for e in manifest["files"]}) >= 2  # rows cross a UTC midnight: one file per date
    got = _parquet_rows(columnar_root(settings) / "features")
    assert sorted(ident(r) for r in got) == sorted(ident(r) for r in rows)
    one = next(r for r in got if (r["partition"], r["offset"]) == (0, 4))
    assert one["x"] == [4.0, 0.0, pytest.approx(one["event_time_ms"] % 1000)]
    assert dict(one["labels"]) == {"y": 4.0, "z": 0.0} and one["key"] == "k0"
    assert (one["namespace"], one["kind"], one["topic"]) == ("live", "sensor", TOPIC)


def test_recompaction_is_idempotent_and_incremental(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    build_store(settings, batches=2)
    compact_features(settings, "sensor")
    out = features_dir(columnar_root(settings), "live", "sensor")
    before = (out / MANIFEST_NAME).read_bytes()
    files_before = sorted(p.name for p in out.rglob("*.parquet"))
    again = compact_features(settings, "sensor")
    assert (again["batches"], again["rows"], again["files"]) == (0, 0, 0)
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in out.rglob("*.parquet")) == files_before
    write(FeatureStore(settings.feature_store), 0, 20, 10)
    more = compact_features(settings, "sensor")
    assert (more["batches"], more["rows"]) == (1, 10)
    got = [ident(r) for r in _parquet_rows(out)]
    assert len(got) == len(set(got)) == 50


def test_a_step_killed_before_its_manifest_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = local_settings(tmp_path)
    rows = build_store(settings, batches=3)
    out = features_dir(columnar_root(settings), "live", "sensor")
    real_save = columnar.save_manifest
    saves = {"n": 0}

    def dies_on_second_step(directory: Path, manifest: dict[str, Any]) -> None:
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt("killed between the Parquet rename and the manifest")
        real_save(directory, manifest)

    monkeypatch.setattr(columnar, "save_manifest", dies_on_second_step)
    with pytest.raises(KeyboardInterrupt):
        compact_features(settings, "sensor", step_rows=20)  # 6 batches of 10 rows: 3 steps
    monkeypatch.setattr(columnar, "save_manifest", real_save)
    listed = {e["path"] for e in _manifest(out)["files"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.parquet")}
    assert listed and on_disk - listed, "the killed step left files its manifest does not list"
    report = compact_features(settings, "sensor", step_rows=20)
    assert report["orphans_removed"] == len(on_disk - listed)
    assert report["batches"] == 4  # the half-done step and the last one; the first is not read again
    got = [ident(r) for r in _parquet_rows(out)]
    assert sorted(got) == sorted(ident(r) for r in rows) and len(got) == len(set(got))
    assert {str(p.relative_to(out)) for p in out.rglob("*.parquet")} == {e["path"] for e in _manifest(out)["files"]}


_KILLED_COMPACTOR = """
import os, signal, sys
import streaming.columnar as columnar
from streaming import config
real, calls = columnar.save_manifest, []
def save(directory, manifest):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # after the step's Parquet files were renamed into place
    real(directory, manifest)
columnar.save_manifest = save
columnar.compact_features(config.load({"home": sys.argv[1]}), "sensor", step_rows=20)
"""


def test_a_compactor_killed_with_sigkill_is_redone(tmp_path: Path) -> None:
    """A real kill -9 (held lock, temp files, renamed but unlisted Parquet); the same command finishes it."""
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT

    settings = local_settings(tmp_path)
    rows = build_store(settings, batches=3)
    proc = subprocess.run([sys.executable, "-c", _KILLED_COMPACTOR, str(settings.home)], cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    out = features_dir(columnar_root(settings), "live", "sensor")
    assert len(_manifest(out)["files"]) >= 1
    report = compact_features(settings, "sensor", step_rows=20)  # the lock died with its holder
    assert report["orphans_removed"] >= 1
    got = [ident(r) for r in _parquet_rows(out)]
    assert sorted(got) == sorted(ident(r) for r in rows) and len(got) == len(set(got))


def test_a_modified_batch_is_left_out_and_the_rest_is_compacted(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """One damaged batch used to stop the compaction of the whole store (and the control API's background
    compaction every round, so /query went stale). It is now left out, named with its reason, and tried
    again next time: once its range is replayed (here: its bytes restored) it gets in."""
    from streamlearn.cli import main

    settings = local_settings(tmp_path)
    rows = build_store(settings, batches=2)
    info = FeatureStore(settings.feature_store).batches("sensor")[0]
    good = Path(info.path).read_bytes()
    data = bytearray(good)
    data[-20] ^= 0xFF
    Path(info.path).write_bytes(bytes(data))
    report = compact_features(settings, "sensor")
    assert [b["batch_id"] for b in report["skipped"]] == [info.batch_id]
    assert f"batch {info.batch_id}: its bytes do not match the sha256" in report["skipped"][0]["reason"]
    assert report["batches"] == 3 and report["rows"] == len(rows) - 10
    out = features_dir(columnar_root(settings), "live", "sensor")
    assert len(_parquet_rows(out)) == len(rows) - 10
    # the CLI compacts the rest too, says which batch needs a hand, and exits 1
    assert main(["--home", str(settings.home), "store", "compact", "--no-predictions"]) == 1
    captured = capsys.readouterr()
    assert "0 batches, 0 rows, 0 files, 1 left out" in captured.out
    assert f"error: batch {info.batch_id}: its bytes do not match" in captured.err
    Path(info.path).write_bytes(good)
    again = compact_features(settings, "sensor")
    assert again["batches"] == 1 and again["skipped"] == []
    assert sorted(ident(r) for r in _parquet_rows(out)) == sorted(ident(r) for r in rows)


def test_a_replaced_namespace_is_rebuilt(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    store = FeatureStore(settings.feature_store)
    write(store, 0, 0, 10)
    compact_features(settings, "sensor")
    store.remove_batch("sensor", store.batches("sensor")[0].batch_id)
    rows = write(store, 0, 0, 6) + write(store, 0, 6, 6)  # a replay cut the same offsets differently
    report = compact_features(settings, "sensor")
    assert report["rebuilt"] and report["rows"] == 12
    out = features_dir(columnar_root(settings), "live", "sensor")
    assert sorted(ident(r) for r in _parquet_rows(out)) == sorted(ident(r) for r in rows)


@pytest.mark.parametrize("kind, namespace", [("../etc", "live"), ("sensor", "a/b"), ("sensor", "..")])
def test_bad_names_are_refused(tmp_path: Path, kind: str, namespace: str) -> None:
    settings = local_settings(tmp_path)
    with pytest.raises(StoreError, match="namespace|kind"):
        compact_features(settings, kind, namespace)
    with pytest.raises(ColumnarError, match="must be 1-100 letters"):
        compact_all(settings, kinds=[kind], namespaces=[namespace], predictions=False)
    with pytest.raises(ColumnarError, match="model: '../m'"):
        predictions_dir(columnar_root(settings), "../m")
    assert not (columnar_root(settings).parent / "etc").exists()


def test_duckdb_and_pandas_read_the_layout(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb", reason="duckdb is a dev dependency (requirements.lock)")
    settings = local_settings(tmp_path)
    rows = build_store(settings, batches=2)
    compact_all(settings, predictions=False)
    glob = str(columnar_root(settings) / "features" / "**" / "*.parquet")
    sql = (f"select count(*), count(distinct key), count(distinct date), sum(list_sum(x)) "
           f"from read_parquet('{glob}', hive_partitioning=true) where kind = 'sensor' and namespace = 'live'")
    count, keys, dates, xsum = duckdb.sql(sql).fetchall()[0]
    assert count == len(rows) and keys == 4 and dates >= 2
    assert xsum == pytest.approx(sum(float(r.x.sum()) for r in rows))
    y = duckdb.sql(f"select labels['y'] from read_parquet('{glob}', hive_partitioning=true) "
                   "where partition = 1 and \"offset\" = 4").fetchall()[0][0]
    assert y == 4.0
    pd = pytest.importorskip("pandas", reason="pandas is not a dependency; the DuckDB and pyarrow reads ran")
    frame = pd.read_parquet(str(columnar_root(settings) / "features"))
    assert len(frame) == len(rows) and set(frame["kind"].astype(str)) == {"sensor"}


# ---- predictions, on the session broker --------------------------------------------------------------------
def _prediction(i: int, model: str = "sensor_forecaster") -> dict[str, Any]:
    return {"request_id": f"r-{i}", "model": model, "model_version": 1 + i % 2, "outputs": [float(i), 0.5],
            "predicted_label": None, "latency_ms": 3.0, "input_topic": "x.requests", "input_partition": 0,
            "input_offset": i, "error": None}


def test_predictions_compact_from_the_topic_and_resume_from_the_manifest(settings: Any) -> None:
    from streaming.columnar_predictions import compact_predictions
    from streaming.producer import Publisher
    from streaming.query import query_predictions
    from streaming.topics import dead_letter_topic, predictions_topic
    from tests.helpers import read_topic

    model = "sensor_forecaster"
    topic = predictions_topic(settings, model)
    with Publisher(settings) as pub:
        for i in range(12):
            pub.publish_to(topic, "Prediction", _prediction(i), key=f"r-{i}")
        pub.send_bytes(topic, b"\x00not avro at all", key=b"bad")
        pub.publish_to(topic, "Prediction", _prediction(99, model="digits_cnn"), key="r-99")  # wrong model
        # a finite latency no answer can have: its int64 request time overflowed and stopped the copy for good
        pub.publish_to(topic, "Prediction", {**_prediction(98), "latency_ms": 1e300}, key="r-98")
        pub.settle(30)
    first = compact_predictions(settings, model, idle_timeout_s=5.0)
    assert (first["rows"], first["dead_letters"]) == (12, 3)
    out = predictions_dir(columnar_root(settings), model)
    manifest = _manifest(out)
    assert sum(int(o) for o in manifest["offsets"].values()) == 15
    reasons = sorted(d["reason"] for d in manifest["dead_letters"])
    assert len(reasons) == 3 and any("model: the record answers 'digits_cnn'" in r for r in reasons), reasons
    assert any("latency_ms: 1e+300 is no latency" in r for r in reasons), reasons
    for entry in manifest["files"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    dead = read_topic(settings, dead_letter_topic(settings, "serving"), decode=False, expect=3)
    stages = [dict(d.headers)["dl.stage"] for d in dead]
    assert stages == [b"columnar"] * 3
    assert {dict(d.headers)["dl.source_topic"].decode() for d in dead} == {topic}
    assert b"\x00not avro at all" in [d.value for d in dead]

    with Publisher(settings) as pub:
        for i in range(12, 17):
            pub.publish_to(topic, "Prediction", _prediction(i), key=f"r-{i}")
        pub.settle(30)
    second = compact_predictions(settings, model, idle_timeout_s=5.0)
    assert (second["rows"], second["dead_letters"]) == (5, 0)  # resumed at the manifest's offsets
    got = ds.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pylist()
    assert sorted(r["request_id"] for r in got) == sorted(f"r-{i}" for i in range(17))
    assert all(r["answer_time_ms"] - r["request_time_ms"] == 3 for r in got)

    page = query_predictions(settings, model=model, request_id="r-13")
    assert [r["request_id"] for r in page.to_json()["rows"]] == ["r-13"]
    assert page.to_json()["rows"][0]["model"] == model and page.to_json()["rows"][0]["outputs"] == [13.0, 0.5]
    v2 = query_predictions(settings, model=model, version=2, limit=3)
    ids = [r["request_id"] for r in v2.to_json()["rows"]]
    while v2.next_cursor:
        v2 = query_predictions(settings, model=model, version=2, limit=3, cursor=v2.next_cursor)
        ids += [r["request_id"] for r in v2.to_json()["rows"]]
    assert sorted(ids) == sorted(f"r-{i}" for i in range(17) if i % 2 == 1)
    assert compact_predictions(settings, model, idle_timeout_s=1.0)["rows"] == 0


def test_cli_store_compact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamlearn.cli import main

    settings = local_settings(tmp_path)
    rows = build_store(settings, batches=1)
    home = ["--home", str(settings.home)]
    assert main([*home, "store", "compact", "--no-predictions", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["features"] == [{"namespace": "live", "kind": "sensor", "batches": 2, "rows": len(rows), "files": 1,
                                   "orphans_removed": 0, "rebuilt": False, "skipped": []}]
    assert report["predictions"] == []
    assert main([*home, "store", "compact", "--no-predictions", "--kind", "sensor"]) == 0
    assert "features live/sensor: 0 batches, 0 rows" in capsys.readouterr().out


def test_predictions_step_killed_before_its_manifest_is_redone(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import streaming.columnar_predictions as cp
    from streaming.producer import Publisher
    from streaming.topics import predictions_topic

    model = "digits_cnn"
    topic = predictions_topic(settings, model)
    with Publisher(settings) as pub:
        for i in range(9):
            pub.publish_to(topic, "Prediction", _prediction(i, model=model), key=f"r-{i}")
        pub.settle(30)

    def killed(directory: Path, manifest: dict[str, Any]) -> None:
        raise KeyboardInterrupt("killed between the Parquet rename and the manifest")

    monkeypatch.setattr(cp, "save_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        cp.compact_predictions(settings, model, idle_timeout_s=5.0)
    monkeypatch.undo()
    out = predictions_dir(columnar_root(settings), model)
    assert list(out.rglob("*.parquet")) and not (out / MANIFEST_NAME).exists()
    report = cp.compact_predictions(settings, model, idle_timeout_s=5.0)
    assert report["rows"] == 9 and report["orphans_removed"] >= 1  # one file per answer date
    got = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert sorted(got["request_id"].to_pylist()) == sorted(f"r-{i}" for i in range(9))


def test_predictions_after_the_broker_lost_compacted_offsets(settings: Any) -> None:
    """A manifest ahead of the topic's end (a broker kill -9 lost compacted answers, offsets re-used): the
    new answers are compacted, not skipped, and the gap is recorded."""
    from streaming.columnar_format import save_manifest
    from streaming.columnar_predictions import compact_predictions
    from streaming.producer import Publisher
    from streaming.topics import predictions_topic

    model = "weblog_classifier"
    topic = predictions_topic(settings, model)
    with Publisher(settings) as pub:
        pub.publish_to(topic, "Prediction", _prediction(0, model=model), key="r-0")
        pub.settle(30)
    assert compact_predictions(settings, model, idle_timeout_s=5.0)["rows"] == 1
    out = predictions_dir(columnar_root(settings), model)
    manifest = _manifest(out)
    # As if 50 more answers had been compacted and then lost by the broker: the offsets and last records named
    # by the manifest are no longer on the topic, and the broker hands those offsets to new answers.
    manifest["offsets"] = {p: int(o) + 50 for p, o in manifest["offsets"].items()}
    for tail in manifest["tails"].values():
        tail["offset"] += 50
    save_manifest(out, manifest)
    with Publisher(settings) as pub:
        for i in range(1, 4):
            pub.publish_to(topic, "Prediction", _prediction(i, model=model), key=f"r-{i}")
        pub.settle(30)
    assert compact_predictions(settings, model, idle_timeout_s=5.0)["rows"] == 3
    gaps = _manifest(out)["gaps"]
    assert gaps and all("broker lost answers after they were compacted" in g["reason"] for g in gaps)
    got = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert sorted(got["request_id"].to_pylist()) == ["r-0", "r-1", "r-2", "r-3"]


def test_predictions_notice_a_replaced_last_record(settings: Any) -> None:
    """The record at the manifest's last offset changed (lost, its offset re-used): resume by time, not offset."""
    from streaming.columnar_format import save_manifest
    from streaming.columnar_predictions import compact_predictions
    from streaming.producer import Publisher
    from streaming.topics import predictions_topic

    model = "weblog_classifier"
    topic = predictions_topic(settings, model)
    with Publisher(settings) as pub:
        for i in range(3):
            pub.publish_to(topic, "Prediction", _prediction(i, model=model), key="same-key")  # one partition
            pub.settle(30)  # acked and past the loss window: the next answer gets a later timestamp
    assert compact_predictions(settings, model, idle_timeout_s=5.0)["rows"] == 3
    out = predictions_dir(columnar_root(settings), model)
    manifest = _manifest(out)
    (p, tail), = manifest["tails"].items()
    tail["digest"] = "0" * 40  # the answer compacted at that offset is not the one there now
    tail["time"] -= 1  # ... and the one there now is newer than it
    save_manifest(out, manifest)
    assert compact_predictions(settings, model, idle_timeout_s=5.0)["rows"] == 1  # the "new" answer, once
    assert [g["partition"] for g in _manifest(out)["gaps"]] == [int(p)]
