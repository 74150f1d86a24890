"""Queries over the columnar store (streaming/query.py): the engine of `GET /query` and `streamlearn query`.

Every answer is checked against a brute-force filter of the rows that were written to the feature store.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streaming import config
from streaming.columnar import compact_features
from streaming.query import QueryError, QueryLimits, QueryPage, QueryTooLargeError, query_features, query_predictions
from streaming.store import FeatureStore, StoredRow
from tests.columnar_helpers import T0, build_store, ident, local_settings, order_key

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def compacted(tmp_path: Path) -> tuple[config.Settings, list[StoredRow]]:
    """8 batches over 2 partitions with interleaved times, compacted in 3 steps (files overlap in time)."""
    settings = local_settings(tmp_path)
    rows = build_store(settings, batches=4)
    compact_features(settings, "sensor", step_rows=30)
    return settings, rows


def _all_pages(settings: config.Settings, limit: int, **query: Any) -> tuple[list[dict[str, Any]], int]:
    page = query_features(settings, kind="sensor", limit=limit, **query)
    rows, pages = list(page.to_json()["rows"]), 1
    while page.next_cursor is not None:
        assert len(page.to_json()["rows"]) == limit
        page = query_features(settings, kind="sensor", limit=limit, cursor=page.next_cursor, **query)
        rows += page.to_json()["rows"]
        pages += 1
    return rows, pages


def test_pages_cover_every_row_once_in_order(compacted: tuple[config.Settings, list[StoredRow]]) -> None:
    settings, rows = compacted
    expected = [ident(r) for r in sorted(rows, key=order_key)]
    got, pages = _all_pages(settings, 7)
    assert [ident(r) for r in got] == expected  # none twice, none missing, in (time, topic, partition, offset)
    assert pages == -(-len(expected) // 7)
    exact, _ = _all_pages(settings, 16)  # a limit dividing the total: the last full page says "no more"
    assert [ident(r) for r in exact] == expected


def test_time_range_key_and_batch_filters(compacted: tuple[config.Settings, list[StoredRow]]) -> None:
    settings, rows = compacted
    start, end = T0 + 5 * 600_000, T0 + 23 * 600_000 + 7  # includes partition 0's offset 23, not partition 1's
    want = [ident(r) for r in sorted(rows, key=order_key) if start <= r.event_time_ms < end]
    got, _ = _all_pages(settings, 4, start_ms=start, end_ms=end)
    assert [ident(r) for r in got] == want and (rows[0].topic, 0, 23) in want and (rows[0].topic, 1, 23) not in want
    want_key = [ident(r) for r in sorted(rows, key=order_key) if start <= r.event_time_ms < end and r.key == "k1"]
    got_key, _ = _all_pages(settings, 3, start_ms=start, end_ms=end, key="k1")
    assert [ident(r) for r in got_key] == want_key and want_key
    assert {r["key"] for r in got_key} == {"k1"}
    batch = FeatureStore(settings.feature_store).batches("sensor")[3]
    got_batch, _ = _all_pages(settings, 100, batch=batch.batch_id)
    assert len(got_batch) == batch.manifest["record_count"] and {r["batch_id"] for r in got_batch} == {batch.batch_id}
    assert query_features(settings, kind="sensor", start_ms=T0 + 10**9).to_json() == \
        {"rows": [], "count": 0, "next_cursor": None}
    assert query_features(settings, kind="weblog").table.num_rows == 0  # nothing compacted: an empty page


def test_formats_round_trip(compacted: tuple[config.Settings, list[StoredRow]]) -> None:
    settings, _ = compacted
    page = query_features(settings, kind="sensor", limit=5, key="k2")
    assert pa.ipc.open_stream(page.to_arrow_ipc()).read_all().equals(page.table)
    assert pq.read_table(io.BytesIO(page.to_parquet())).equals(page.table)
    body = page.to_json()
    json.dumps(body, allow_nan=False)  # JSON-safe: no NaN, maps are objects
    first = body["rows"][0]
    assert set(first) >= {"namespace", "kind", "key", "event_time_ms", "topic", "partition", "offset", "batch_id",
                          "labels", "x"}
    assert isinstance(first["labels"], dict) and first["labels"]["y"] in (None, float(first["offset"]))


def test_an_altered_or_foreign_cursor_is_refused(compacted: tuple[config.Settings, list[StoredRow]]) -> None:
    settings, _ = compacted
    cursor = query_features(settings, kind="sensor", limit=3).next_cursor
    assert cursor is not None
    payload, mac = cursor.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data[-1] += 1  # skip one row further
    forged = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()
    for bad in [f"{forged}.{mac}", cursor[:-2], "garbage", cursor + "x", "a.b.c"]:
        with pytest.raises(QueryError, match="cursor: not a cursor of this query"):
            query_features(settings, kind="sensor", limit=3, cursor=bad)
    with pytest.raises(QueryError, match="cursor: "):  # another query's cursor
        query_features(settings, kind="sensor", limit=3, key="k1", cursor=cursor)
    assert query_features(settings, kind="sensor", limit=3, cursor=cursor).table.num_rows == 3


def test_too_large_names_the_limit(compacted: tuple[config.Settings, list[StoredRow]]) -> None:
    settings, _ = compacted
    base = QueryLimits.from_settings(settings)
    cases = [
        (dict(limit=base.max_rows + 1), base, "query_max_rows"),
        (dict(limit=10), dataclasses.replace(base, max_scan_rows=20), "query_max_scan_rows"),
        (dict(limit=50), dataclasses.replace(base, max_bytes=500), "query_max_bytes"),
        (dict(limit=10), dataclasses.replace(base, timeout_s=1e-9), "query_timeout_s"),
    ]
    for args, limits, name in cases:
        with pytest.raises(QueryTooLargeError) as err:
            query_features(settings, kind="sensor", limits=limits, **args)
        assert err.value.limit == name and name in str(err.value)
        assert f"STREAMLEARN_{name.upper()}" in str(err.value)
        assert isinstance(err.value, QueryError)
    small = dataclasses.replace(base, max_scan_rows=40)  # a narrow range scans fewer row groups: it passes
    assert query_features(settings, kind="sensor", limits=small, end_ms=T0 + 3 * 600_000).table.num_rows == 6


@pytest.mark.parametrize("args, needle", [
    (dict(kind="../sensor"), "kind: '../sensor'"),
    (dict(kind="sensor", namespace="a/b"), "namespace: 'a/b'"),
    (dict(kind="sensor", start_ms=10, end_ms=10), "start_ms/end_ms"),
    (dict(kind="sensor", start_ms="yesterday"), "start_ms: must be an integer"),
    (dict(kind="sensor", limit=0), "limit: must be >= 1"),
    (dict(kind="sensor", end_ms=2**70), "end_ms: must be <= "),
    (dict(kind="sensor", key=""), "key: must be a non-empty string"),
    (dict(kind="sensor", batch="x" * 2000), "batch: must be a non-empty string"),
])
def test_bad_arguments_name_the_argument(tmp_path: Path, args: dict[str, Any], needle: str) -> None:
    settings = local_settings(tmp_path)
    with pytest.raises(QueryError) as err:
        query_features(settings, **args)
    assert needle in str(err.value) and not isinstance(err.value, QueryTooLargeError)


def test_prediction_arguments_are_checked(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    with pytest.raises(QueryError, match="model: '../x'"):
        query_predictions(settings, model="../x")
    with pytest.raises(QueryError, match="version: must be >= 0"):
        query_predictions(settings, model="m", version=-1)
    with pytest.raises(QueryError, match="version: must be <= 2147483647"):
        query_predictions(settings, model="m", version=2**40)
    assert query_predictions(settings, model="m").to_json()["rows"] == []


def test_cli_query_json_lines_and_files(compacted: tuple[config.Settings, list[StoredRow]], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from streamlearn.cli import main

    settings, rows = compacted
    home = ["--home", str(settings.home)]
    assert main([*home, "query", "features", "--kind", "sensor", "--limit", "5", "--key", "k3"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5 and {r["key"] for r in lines} == {"k3"} and "--cursor " in err
    assert main([*home, "query", "features", "--kind", "sensor", "--all", "--limit", "7", "--format", "parquet",
                 "--output", str(tmp_path / "all.parquet")]) == 0
    assert pq.read_table(tmp_path / "all.parquet").num_rows == len(rows)
    assert main([*home, "query", "features", "--kind", "sensor", "--all", "--limit", "9", "--format", "arrow",
                 "--output", str(tmp_path / "all.arrows"), "--key", "k0"]) == 0
    streamed = pa.ipc.open_stream((tmp_path / "all.arrows").read_bytes()).read_all()
    assert streamed.num_rows == sum(1 for r in rows if r.key == "k0") and set(streamed["key"].to_pylist()) == {"k0"}
    assert main([*home, "query", "features", "--kind", "sensor", "--start", "2030-01-01", "--format", "parquet",
                 "--output", str(tmp_path / "none.parquet")]) == 0
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    assert main([*home, "query", "features", "--kind", "sensor", "--limit", "999999"]) == 1
    assert "query_max_rows" in capsys.readouterr().err
    assert main([*home, "query", "features", "--kind", "sensor", "--max-rows", "3", "--limit", "4"]) == 1
    assert "query_max_rows (3" in capsys.readouterr().err


def test_json_turns_nan_into_null() -> None:
    labels = pa.array([[("y", float("inf"))], []], pa.map_(pa.string(), pa.float64()))
    page = QueryPage(pa.table({"a": [1.0, float("nan")], "labels": labels}), None, 0)
    assert page.to_json() == {"rows": [{"a": 1.0, "labels": {"y": None}}, {"a": None, "labels": {}}], "count": 2,
                              "next_cursor": None}


@pytest.mark.parametrize("step_rows", [10, 1000])
def test_pages_with_equal_times_across_many_files(tmp_path: Path, step_rows: int) -> None:
    """Ties on event time are ordered by (topic, partition, offset); one file per batch or one for all."""
    from tests.columnar_helpers import write

    settings = local_settings(tmp_path)
    store = FeatureStore(settings.feature_store)
    rows: list[StoredRow] = []
    for b in range(3):
        for p in (0, 1, 2):
            rows += write(store, p, b * 10, 10, step_ms=0, t0=T0 + (b % 2) * 1000)  # two distinct times only
    compact_features(settings, "sensor", step_rows=step_rows)
    want = [ident(r) for r in sorted(rows, key=order_key)]
    for limit in (3, 89, 90, 91):
        got, _ = _all_pages(settings, limit)
        assert [ident(r) for r in got] == want, limit


def test_a_tenant_reads_only_its_own_copy(compacted: tuple[config.Settings, list[StoredRow]]) -> None:
    settings, rows = compacted
    tenant = settings.with_(tenant="acme")
    assert query_features(tenant, kind="sensor").table.num_rows == 0
    assert query_features(settings, kind="sensor", limit=100).table.num_rows == len(rows)
    from streaming.columnar_format import columnar_root

    assert columnar_root(tenant) == settings.home / "tenants" / "acme" / "columnar"


def test_pages_over_small_row_groups_stop_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files of many row groups: every page is right, and a page reads only the row groups it needs."""
    import streaming.columnar_format as fmt

    monkeypatch.setattr(fmt, "ROW_GROUP_ROWS", 4)
    settings = local_settings(tmp_path)
    rows = build_store(settings, batches=4)
    compact_features(settings, "sensor")  # one step: one file per date, each of many row groups
    assert max(pq.ParquetFile(p).num_row_groups for p in (settings.home / "columnar").rglob("*.parquet")) > 5
    want = [ident(r) for r in sorted(rows, key=order_key)]
    got, _ = _all_pages(settings, 5)
    assert [ident(r) for r in got] == want
    first = query_features(settings, kind="sensor", limit=5)
    assert first.scanned_rows < len(rows) / 2, first.scanned_rows
    ties, _ = _all_pages(settings, 6, key="k2")
    assert [ident(r) for r in ties] == [ident(r) for r in sorted(rows, key=order_key) if r.key == "k2"]


def test_event_time_bounds_before_1970_select_backfilled_rows(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Backfilled history goes back to 1678; `--start 1962-01-01` was clamped to 1970 (every 1960s row
    left out) and a range before 1970 was an 'empty range' error. The same bounds over HTTP."""
    from streamlearn.api.requests import parse_when
    from streamlearn.cli import main
    from tests.columnar_helpers import write

    settings = local_settings(tmp_path)
    t1962 = -252_460_800_000  # 1962-01-01T00:00:00Z
    rows = write(FeatureStore(settings.feature_store), 0, 0, 30, step_ms=30 * 86_400_000, t0=t1962)
    compact_features(settings, "sensor")
    home = ["--home", str(settings.home)]
    assert main([*home, "query", "features", "--kind", "sensor", "--all", "--start", "1962-01-01",
                 "--end", "1963-01-01"]) == 0
    got = [json.loads(line)["event_time_ms"] for line in capsys.readouterr().out.splitlines()]
    assert got == [r.event_time_ms for r in rows if r.event_time_ms < -220_924_800_000]  # before 1963
    assert len(got) == 13
    assert parse_when("1962-01-01", "start", event_time=True) == t1962
    assert parse_when(str(t1962), "start", event_time=True) == t1962
