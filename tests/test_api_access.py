"""Keys, scopes and tenants of the control API, verb by verb; and its OpenAPI fuzzed (schemathesis).

Jobs run through ``tests/api_hold.py`` and are never released: what is checked is who may start,
see and cancel them, and what command a tenant's job runs with which settings.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from schemas.access import load_keys
from streaming import config
from streamlearn.api.app import create_app
from streamlearn.api.jobs import JobRunner
from tests.helpers import ROOT
from tests.test_http_fuzz import fuzz

KEYS = ("ops:tok-ops:*:*,acme:tok-acme:train+process+query:acme,globex:tok-globex:*:globex,"
        "reader:tok-read:query,proc:tok-proc:process,boss:tok-boss:admin,ingest:tok-ing:ingest,fuzz:fuzztoken")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ACME, GLOBEX, READER, PROC, BOSS, OPS, INGEST = (auth(t) for t in (
    "tok-acme", "tok-globex", "tok-read", "tok-proc", "tok-boss", "tok-ops", "tok-ing"))
REPLAY = {"action": "replay", "kind": "weblog", "namespace": "rebuild-1", "start": "2026-01-01T00:00:00Z",
          "end": "1767312000000"}


@pytest.fixture()
def tc(tmp_path: Path) -> Iterator[TestClient]:
    s = config.load({"home": tmp_path / "home", "metrics_port": -1, "api_cancel_grace_s": 5.0, "api_max_jobs": 8,
                     "api_compact_interval_s": 0})
    runner = JobRunner(s, cli=[sys.executable, str(ROOT / "tests" / "api_hold.py"), str(tmp_path / "never")])
    with TestClient(create_app(s, keys=load_keys(KEYS, None), runner=runner, compact=False)) as client:
        yield client


def test_unauthenticated_and_unknown_keys(tc: TestClient) -> None:
    for method, path in (("post", "/trainModel"), ("post", "/process"), ("get", "/jobs"),
                         ("get", "/jobs/20261130T000000-00000000"), ("delete", "/jobs/20261130T000000-00000000"),
                         ("get", "/query?what=features&kind=weblog")):
        kwargs = {"json": {"model": "x"}} if method == "post" else {}
        missing = getattr(tc, method)(path, **kwargs)
        assert missing.status_code == 401 and "Bearer" in missing.headers["www-authenticate"], (path, missing.text)
        wrong = getattr(tc, method)(path, headers=auth("nope"), **kwargs)
        assert wrong.status_code == 403, (path, wrong.text)


def test_scopes_per_verb(tc: TestClient) -> None:
    assert tc.post("/trainModel", json={"model": "weblog_classifier"}, headers=READER).status_code == 403
    assert tc.post("/trainModel", json={"model": "weblog_classifier"}, headers=INGEST).status_code == 403
    pinned = tc.post("/trainModel", json={"model": "weblog_classifier", "reproduce_version": 3}, headers=BOSS)
    assert pinned.status_code == 202
    assert pinned.json()["job"]["argv"] == ["retrain", "--reproduce", "weblog_classifier/3"]
    assert tc.delete(f"/jobs/{pinned.json()['job']['id']}", headers=BOSS).status_code == 200
    assert tc.post("/process", json=REPLAY, headers=READER).status_code == 403
    assert tc.get("/jobs", headers=READER).status_code == 403
    replay = tc.post("/process", json=REPLAY, headers=PROC)
    assert replay.status_code == 202, replay.text
    assert replay.json()["job"]["argv"] == ["replay", "weblog", "--into", "rebuild-1", "--progress-interval", "2",
                                            "--from-timestamp", "1767225600000ms", "--to", "1767312000000ms"]
    promote = {"action": "promote", "kind": "weblog", "namespace": "rebuild-2"}
    refused = tc.post("/process", json=promote, headers=PROC)
    assert refused.status_code == 403 and "'admin'" in refused.json()["error"]
    ok = tc.post("/process", json=promote, headers=BOSS)
    assert ok.status_code == 202 and ok.json()["job"]["argv"] == ["store", "promote", "weblog", "--from", "rebuild-2",
                                                                  "--json"]
    # a process key sees its replay but not the promote (admin); the admin key sees both
    assert [j["kind"] for j in tc.get("/jobs", headers=PROC).json()["jobs"]] == ["replay"]
    assert {j["kind"] for j in tc.get("/jobs", headers=BOSS).json()["jobs"]} == {"train", "replay", "promote"}
    assert tc.delete(f"/jobs/{ok.json()['job']['id']}", headers=PROC).status_code == 404
    assert tc.delete(f"/jobs/{ok.json()['job']['id']}", headers=BOSS).status_code == 200


def test_tenant_isolation_on_every_verb(tc: TestClient, tmp_path: Path) -> None:
    # POST /trainModel: only the tenant's own model names
    assert tc.post("/trainModel", json={"model": "globex.weblog_classifier"}, headers=ACME).status_code == 403
    assert tc.post("/trainModel", json={"model": "weblog_classifier"}, headers=ACME).status_code == 403
    started = tc.post("/trainModel", json={"model": "acme.weblog_classifier"}, headers=ACME)
    assert started.status_code == 202, started.text
    job = started.json()["job"]
    assert job["tenant"] == "acme" and job["argv"][:2] == ["train", "weblog_classifier"]
    # the child runs as the tenant, on the tenant's stores
    environ = Path(f"/proc/{job['pid']}/environ").read_bytes().split(b"\0")
    home = tmp_path / "home"
    assert b"STREAMLEARN_TENANT=acme" in environ
    assert f"STREAMLEARN_FEATURE_STORE={home / 'tenants' / 'acme' / 'features'}".encode() in environ
    assert f"STREAMLEARN_MODEL_DIR={home / 'tenants' / 'acme' / 'models'}".encode() in environ
    # globex may train its own model of the same short name at the same time (another resource)
    theirs = tc.post("/trainModel", json={"model": "globex.weblog_classifier"}, headers=GLOBEX)
    assert theirs.status_code == 202, theirs.text
    # POST /process: the namespace is in the tenant's own store; both may use the same name
    assert tc.post("/process", json=REPLAY, headers=ACME).status_code == 202
    assert tc.post("/process", json=REPLAY, headers=GLOBEX).status_code == 202
    assert tc.post("/process", json={"action": "promote", "kind": "weblog", "namespace": "rebuild-1"},
                   headers=ACME).status_code == 403  # no admin scope
    # GET /jobs, GET /jobs/{id}, DELETE /jobs/{id}: only the tenant's own jobs
    mine = {j["id"] for j in tc.get("/jobs", headers=ACME).json()["jobs"]}
    theirs_ids = {j["id"] for j in tc.get("/jobs", headers=GLOBEX).json()["jobs"]}
    assert job["id"] in mine and job["id"] not in theirs_ids and len(mine) == len(theirs_ids) == 2
    assert tc.get(f"/jobs/{job['id']}", headers=GLOBEX).status_code == 404
    assert tc.delete(f"/jobs/{job['id']}", headers=GLOBEX).status_code == 404
    assert tc.get(f"/jobs/{job['id']}", headers=ACME).status_code == 200
    assert len(tc.get("/jobs", headers=OPS).json()["jobs"]) == 4  # the operator key sees every tenant
    assert tc.delete(f"/jobs/{job['id']}", headers=ACME).json()["job"]["status"] == "cancelled"
    # GET /query: predictions of another tenant's model are refused before anything is read
    other = tc.get("/query", params={"what": "predictions", "model": "globex.weblog_classifier"}, headers=ACME)
    assert other.status_code == 403
    assert tc.get("/query", params={"what": "features", "kind": "weblog"}, headers=PROC).status_code == 403


def test_bad_requests_are_400_406_413(tc: TestClient) -> None:
    assert tc.post("/trainModel", content=b"[" * 50, headers={**ACME, "Content-Type": "application/json"}
                   ).status_code == 400
    assert tc.post("/trainModel", json={"model": "acme.x", "extra": 1}, headers=ACME).status_code == 400
    assert tc.post("/trainModel", json={"model": "acme.--help"}, headers=ACME).status_code == 400
    unknown = tc.post("/trainModel", json={"model": "acme.nosuchmodel"}, headers=ACME)  # was a 202, then a failed job
    assert unknown.status_code == 400 and "not a model this platform knows" in unknown.json()["error"]
    bad_time = tc.post("/process", json={**REPLAY, "start": "yesterday"}, headers=PROC)
    assert bad_time.status_code == 400 and "start" in bad_time.json()["error"]
    backwards = tc.post("/process", json={**REPLAY, "end": "2025-01-01"}, headers=PROC)
    assert backwards.status_code == 400
    live = tc.post("/process", json={**REPLAY, "namespace": "live"}, headers=PROC)
    assert live.status_code == 400 and "promote" in live.json()["error"]
    big = tc.post("/trainModel", content=json.dumps({"model": "a" * 100_000}).encode(), headers=ACME)
    assert big.status_code == 413
    accept = tc.get("/query", params={"what": "features", "kind": "weblog"}, headers={**READER, "Accept": "text/csv"})
    assert accept.status_code == 406 and "arrow" in accept.json()["error"]
    assert tc.get("/jobs/..%2F..%2Fetc", headers=ACME).status_code == 404
    # A chunked body (no Content-Length) over the limit is refused while it is read: that was a 500, the
    # request-counting middleware (BaseHTTPMiddleware) wrapping the guard's error in an ExceptionGroup.
    chunked = tc.post("/trainModel", content=iter([b'{"model": "', b"a" * 40_000, b"a" * 40_000, b'"}']),
                      headers={**ACME, "Content-Type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert "larger than the control API limit" in chunked.json()["error"]


def test_fuzz_control_api(tc: TestClient) -> None:
    """Every operation of the OpenAPI spec, with an all-scopes key (``fuzz:fuzztoken``): never a 5xx.

    ``GET /query`` is fuzzed where the columnar engine (``streaming.query``) is installed; without it
    the route answers 501 by design.
    """
    app: Any = tc.app
    spec = app.openapi()
    if importlib.util.find_spec("streaming.query") is None:
        spec["paths"].pop("/query")
    fuzz(app, spec, "control API")
    assert tc.get("/healthz").status_code == 200
