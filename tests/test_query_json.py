"""A query page as JSON, built column by column (streaming/query_json.py): the same rows as the per-cell
``to_pylist`` conversion it replaced, for every column type the columnar store has and the edge cases
(nulls, NaN/inf, sliced and multi-chunk columns, repeated map keys), and the same body through ``GET /query``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from schemas.access import load_keys
from streaming import query_json
from streaming.columnar import compact_features
from streaming.columnar_format import PREDICTION_SCHEMA
from streaming.query import QueryPage, query_features
from streamlearn.api.app import create_app
from tests.columnar_helpers import build_store, local_settings

pytestmark = pytest.mark.timeout(120)


def _old_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_old_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _old_safe(v) for k, v in value.items()}
    return value


def _old_rows(table: pa.Table) -> list[dict[str, Any]]:
    """``QueryPage.to_json``'s rows as they were built before: one Python scalar per cell."""
    maps = {f.name for f in table.schema if pa.types.is_map(f.type)}
    return [{k: _old_safe(dict(v) if k in maps and v is not None else v) for k, v in row.items()}
            for row in table.to_pylist()]


def _old_body(table: pa.Table, cursor: str | None) -> bytes:
    """What Starlette's JSONResponse sent for the old ``to_json``."""
    rows = _old_rows(table)
    return json.dumps({"rows": rows, "count": len(rows), "next_cursor": cursor}, ensure_ascii=False, allow_nan=False,
                      indent=None, separators=(",", ":")).encode("utf-8")


def _features(n: int = 40) -> pa.Table:
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((n, 4)).astype(np.float32)
    x = [None if i == 5 else [None, float("nan")] if i == 6 else list(map(float, xs[i])) for i in range(n)]
    labels = [None if i == 7 else [] if i == 8 else [("y", float("inf") if i == 9 else float(i)), ("z", None),
                                                    ("y", 2.5) if i == 10 else ("w", -0.0)] for i in range(n)]
    table = pa.table({
        "event_time_ms": pa.array(np.arange(n, dtype=np.int64) + 1_700_000_000_000),
        "key": pa.array([None if i == 3 else f"clé-{i % 5} ✓" for i in range(n)]),
        "partition": pa.array([None if i == 4 else i % 3 for i in range(n)], pa.int32()),
        "offset": pa.array(np.arange(n, dtype=np.int64) * 2**40),
        "labels": pa.array(labels, pa.map_(pa.string(), pa.float64())),
        "x": pa.array(x, pa.list_(pa.float32())),
        "ok": pa.array([i % 2 == 0 for i in range(n)]),
        "meta": pa.array([{"a": i, "b": float("nan") if i == 2 else 0.5} for i in range(n)]),  # a struct: per cell
        "tiny": pa.array([1e-7 * i for i in range(n)], pa.float64()),
    })
    return table.add_column(0, "namespace", pa.array(["live"] * n))


def _predictions() -> pa.Table:
    n = 12
    cols: dict[str, Any] = {
        "answer_time_ms": list(range(n)), "request_time_ms": [None] + list(range(1, n)),
        "request_id": [f"r-{i}" for i in range(n)], "model_version": [i % 2 for i in range(n)],
        "outputs": [[float(i), float("-inf") if i == 2 else 0.5] for i in range(n)],
        "predicted_label": [None if i % 3 else "spike" for i in range(n)],
        "latency_ms": [float("nan") if i == 1 else 1.25 * i for i in range(n)], "error": [None] * n,
        "input_topic": ["in"] * n, "input_partition": [0] * n, "input_offset": list(range(n)),
        "topic": ["out"] * n, "partition": [1] * n, "offset": list(range(n))}
    return pa.table(cols, schema=PREDICTION_SCHEMA)


def _variants(table: pa.Table) -> list[pa.Table]:
    """The table, a slice of it (offsets not starting at 0), several chunks, and a sorted copy (take)."""
    half = table.num_rows // 2
    return [table, table.slice(3, half), pa.concat_tables([table.slice(0, half), table.slice(half)]),
            table.take(np.arange(table.num_rows)[::-1].copy()), table.slice(0, 0)]


@pytest.mark.parametrize("make", [_features, _predictions])
def test_rows_match_the_per_cell_conversion(make: Any) -> None:
    for table in _variants(make()):
        assert query_json.table_rows(table) == _old_rows(table)
        page = QueryPage(table, "next", 0)
        assert json.loads(page.to_json_bytes()) == page.to_json() == {"rows": _old_rows(table),
                                                                    "count": table.num_rows, "next_cursor": "next"}


def test_values_keep_their_python_types_and_float32_widening() -> None:
    table = _features()
    rows = query_json.table_rows(table)
    assert rows[0]["x"] == [float(v) for v in table["x"][0].values.to_numpy()]  # the double each float32 is
    assert rows[10]["labels"] == {"y": 2.5, "z": None, } and rows[9]["labels"]["y"] is None  # last repeated key
    assert rows[6]["x"] == [None, None] and rows[5]["x"] is None and rows[7]["labels"] is None
    assert type(rows[1]["event_time_ms"]) is int and type(rows[1]["ok"]) is bool and rows[4]["partition"] is None
    assert list(rows[0]) == table.column_names  # keys in column order


def test_without_orjson_the_body_is_byte_identical_to_the_old_response(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(query_json, "orjson", None)
    for make in (_features, _predictions):
        for table in _variants(make()):
            assert QueryPage(table, None, 0).to_json_bytes() == _old_body(table, None)


def test_with_orjson_only_exponent_spellings_differ() -> None:
    pytest.importorskip("orjson")
    table = _features()
    new, old = QueryPage(table, "c", 0).to_json_bytes(), _old_body(table, "c")
    assert new != old and len(new) != len(old)  # 1e-07 in json is 1e-7 / 0.0000001 in orjson
    assert json.loads(new) == json.loads(old)
    untouched = table.drop_columns(["tiny", "x", "labels"])  # no float to spell differently: the same bytes
    assert QueryPage(untouched, "c", 0).to_json_bytes() == _old_body(untouched, "c")


def test_get_query_answers_the_engines_json(tmp_path: Path) -> None:
    """The route sends the page's column-wise body (built in the worker thread), as application/json."""
    settings = local_settings(tmp_path)
    build_store(settings, batches=2)
    compact_features(settings, "sensor")
    page = query_features(settings, kind="sensor", limit=7)
    app = create_app(settings, keys=load_keys("reader:tok:query", None), compact=False)
    with TestClient(app) as tc:
        reply = tc.get("/query", params={"what": "features", "kind": "sensor", "limit": 7},
                       headers={"Authorization": "Bearer tok"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["rows"] == page.to_json()["rows"] == _old_rows(page.table) and body["count"] == 7
    assert body["next_cursor"] and reply.headers["x-next-cursor"] == body["next_cursor"]
