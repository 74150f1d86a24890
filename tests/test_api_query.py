"""``GET /query`` of the control API: formats, pagination, limits, tenants and time parameters.

The route's own work (auth, tenant settings, time parsing, Accept negotiation, status mapping) is
checked against a recording engine with ``streaming.query``'s interface, so it runs without the
columnar store; ``test_query_reads_the_columnar_store`` runs the real engine where it is installed.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from schemas.access import load_keys
from schemas.exceptions import StreamlearnError
from streaming import config, query_json
from streaming.config import Settings
from streamlearn.api import query as query_route
from streamlearn.api.app import create_app
from streamlearn.api.jobs import JobRunner

# pyarrow is pinned with the columnar store (branch colstore); without it these route tests cannot build pages.
pa = pytest.importorskip("pyarrow")
pytest.importorskip("pyarrow.ipc")
pq = pytest.importorskip("pyarrow.parquet")

KEYS = "reader:tok-read:query,acme:tok-acme:query:acme"
READER, ACME = {"Authorization": "Bearer tok-read"}, {"Authorization": "Bearer tok-acme"}


class RecordingEngine:
    """``streaming.query``'s interface over a fixed table; records each call's arguments."""

    class QueryError(StreamlearnError):
        pass

    class QueryTooLargeError(QueryError):
        limit = "query_max_rows"

    class QueryLimits:
        @classmethod
        def from_settings(cls, settings: Settings) -> str:
            return "limits"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Settings, dict[str, Any]]] = []
        self.table = pa.table({"key": ["a", "b", "c"], "value": [1.0, 2.0, 3.0]})

    def _page(self, kw: dict[str, Any]) -> Any:
        start = int(kw["cursor"] or 0)
        if kw["limit"] > 1000:
            raise self.QueryTooLargeError("the query reads 5000 rows, over query_max_rows=100; narrow it")
        rows = self.table.slice(start, kw["limit"])
        nxt = str(start + kw["limit"]) if start + kw["limit"] < self.table.num_rows else None

        def ipc() -> bytes:
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, rows.schema) as writer:
                writer.write_table(rows)
            return sink.getvalue()

        def parquet() -> bytes:
            sink = io.BytesIO()
            pq.write_table(rows, sink)
            return sink.getvalue()

        return SimpleNamespace(table=rows, next_cursor=nxt, scanned_rows=self.table.num_rows,
                               to_json_bytes=lambda: query_json.page_bytes(rows.to_pylist(), nxt),
                               to_arrow_ipc=ipc, to_parquet=parquet)

    def query_features(self, settings: Settings, **kw: Any) -> Any:
        self.calls.append(("features", settings, kw))
        if kw["key"] == "bad":
            raise self.QueryError("key: bad is not a key; give one of the store's keys")
        if kw["key"] == "rebuilt":
            from streaming.exceptions import ColumnarChangedError

            raise ColumnarChangedError("columnar file x.parquet is listed in its manifest but missing")
        return self._page(kw)

    def query_predictions(self, settings: Settings, **kw: Any) -> Any:
        self.calls.append(("predictions", settings, kw))
        return self._page(kw)


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    engine = RecordingEngine()
    monkeypatch.setattr(query_route, "engine", lambda: engine)
    s = config.load({"home": tmp_path / "home", "metrics_port": -1})
    app = create_app(s, keys=load_keys(KEYS, None), runner=JobRunner(s), compact=False)
    with TestClient(app) as tc:
        yield tc, engine, s


def test_json_pages_with_a_cursor(setup: Any) -> None:
    tc, engine, s = setup
    first = tc.get("/query", params={"what": "features", "kind": "weblog", "limit": 2,
                                     "start": "2026-01-01T00:00:00Z", "end": "1767312000000"}, headers=READER)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["count"] == 2 and [r["key"] for r in body["rows"]] == ["a", "b"] and body["next_cursor"] == "2"
    _, settings, kw = engine.calls[-1]
    assert kw["start_ms"] == 1767225600000 and kw["end_ms"] == 1767312000000 and kw["namespace"] == "live"
    assert kw["limits"] == "limits" and settings.feature_store == s.feature_store
    rest = tc.get("/query", params={"what": "features", "kind": "weblog", "limit": 2, "cursor": body["next_cursor"]},
                  headers=READER).json()
    assert [r["key"] for r in rest["rows"]] == ["c"] and rest["next_cursor"] is None


def test_arrow_and_parquet_by_accept(setup: Any) -> None:
    tc, _, _ = setup
    params = {"what": "features", "kind": "sensor", "limit": 2}
    arrow = tc.get("/query", params=params, headers={**READER, "Accept": "application/vnd.apache.arrow.stream"})
    assert arrow.status_code == 200 and arrow.headers["content-type"] == "application/vnd.apache.arrow.stream"
    assert arrow.headers["x-next-cursor"] == "2"
    assert pa.ipc.open_stream(arrow.content).read_all().column("key").to_pylist() == ["a", "b"]
    for accept in ("application/vnd.apache.parquet", "application/x-parquet"):
        parquet = tc.get("/query", params=params, headers={**READER, "Accept": accept})
        assert parquet.status_code == 200
        assert pq.read_table(io.BytesIO(parquet.content)).num_rows == 2
    assert tc.get("/query", params=params, headers={**READER, "Accept": "text/html"}).status_code == 406


def test_limits_and_errors_are_4xx(setup: Any) -> None:
    tc, _, _ = setup
    big = tc.get("/query", params={"what": "features", "kind": "weblog", "limit": 5000}, headers=READER)
    assert big.status_code == 413 and "query_max_rows" in big.json()["error"]
    bad = tc.get("/query", params={"what": "features", "kind": "weblog", "key": "bad"}, headers=READER)
    assert bad.status_code == 400 and "key" in bad.json()["error"]
    assert tc.get("/query", params={"what": "features"}, headers=READER).status_code == 400  # no kind
    assert tc.get("/query", params={"what": "predictions"}, headers=READER).status_code == 400  # no model
    when = tc.get("/query", params={"what": "features", "kind": "weblog", "start": "soon"}, headers=READER)
    assert when.status_code == 400 and "start" in when.json()["error"]
    long = tc.get("/query", params={"what": "features", "kind": "weblog", "start": "9" * 16}, headers=READER)
    assert long.status_code == 400 and "over 15 digits" in long.json()["error"], long.text


def test_a_tenant_queries_its_own_store_and_models(setup: Any) -> None:
    tc, engine, s = setup
    assert tc.get("/query", params={"what": "features", "kind": "weblog"}, headers=ACME).status_code == 200
    _, settings, _ = engine.calls[-1]
    assert settings.tenant == "acme" and Path(settings.feature_store) == s.home / "tenants" / "acme" / "features"
    ok = tc.get("/query", params={"what": "predictions", "model": "acme.weblog_classifier", "version": 2,
                                  "request_id": "r1"}, headers=ACME)
    assert ok.status_code == 200
    _, settings, kw = engine.calls[-1]
    assert (kw["model"], kw["version"], kw["request_id"]) == ("weblog_classifier", 2, "r1")
    assert tc.get("/query", params={"what": "predictions", "model": "weblog_classifier"},
                  headers=ACME).status_code == 403


def test_a_copy_rebuilt_under_a_query_is_a_503_to_retry_not_a_500(setup: Any) -> None:
    """`store promote` rebuilds the copy; a query reading it then was "internal error of the control API"."""
    tc, _, _ = setup
    resp = tc.get("/query", params={"what": "features", "kind": "weblog", "key": "rebuilt"}, headers=READER)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1", resp.text
    assert "repeat the query" in resp.json()["error"]


def test_a_columnar_dir_set_for_the_api_is_split_per_tenant(tmp_path: Path) -> None:
    """With STREAMLEARN_COLUMNAR_DIR set, every tenant's queries and background compactions used that one
    directory: each tenant read every tenant's feature rows."""
    from streaming.columnar_format import columnar_root
    from streamlearn.api.requests import tenant_settings

    shared = tmp_path / "col"
    s = config.load({"home": tmp_path / "home", "metrics_port": -1, "columnar_dir": shared})
    roots = {t: columnar_root(tenant_settings(s, t)) for t in ("", "acme", "ac")}
    assert roots[""] == shared.absolute()
    assert roots["acme"] == shared.absolute() / "tenants" / "acme"
    assert roots["ac"] == shared.absolute() / "tenants" / "ac"


def test_without_the_engine_the_route_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "streaming.query", None)  # import fails as in a build without it
    s = config.load({"home": tmp_path / "home", "metrics_port": -1})
    with TestClient(create_app(s, runner=JobRunner(s), compact=False)) as tc:
        resp = tc.get("/query", params={"what": "features", "kind": "weblog"})
    assert resp.status_code == 501 and "streaming.query" in resp.json()["error"]


def test_a_namespace_the_command_line_can_make_can_be_queried(setup: Any) -> None:
    """The API allowed `[A-Za-z0-9][A-Za-z0-9_-]{0,63}` while `replay --into` allows the store's rule (dots,
    100 characters): `rebuild.2026-12` was a namespace the API could not reach. One pattern now."""
    tc, engine, _ = setup
    for ns in ("rebuild.2026-12", "r" * 100):
        got = tc.get("/query", params={"what": "features", "kind": "weblog", "namespace": ns}, headers=READER)
        assert got.status_code == 200, got.text
        assert engine.calls[-1][2]["namespace"] == ns
    for bad in ("..", ".hidden", "a/b", "r" * 101):
        assert tc.get("/query", params={"what": "features", "kind": "weblog", "namespace": bad},
                      headers=READER).status_code == 400, bad
