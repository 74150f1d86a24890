"""Authorization matrix and hostile bodies on every HTTP surface (issue 12 items 0, 2, 3, 6).

Each surface (ingest gateway, serving HTTP, registry REST) x no key / wrong key / wrong scope /
wrong tenant / right key, with one key table shared by all three (``STREAMLEARN_KEYS``), plus
tenant isolation (a tenant's records, subjects and models stay under its prefix) and the bodies
that used to cost memory or give 500s: deep nesting, ``[[],[],...]``, Unicode digits, booleans,
``latency_ms = 1e308``, a 5000-deep schema, slow headers.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ingest.gateway.limits import GatewayLimits
from ingest.gateway.routes import create_app
from schemas.access import load_keys
from schemas.httpguard import server_config
from schemas.registry import FileRegistry
from schemas.server import create_app as registry_app
from streaming.config import Settings
from streaming.consumer import Record
from streaming.topics import dead_letter_topic, declared_topics, ensure_topics, raw_topic
from tests.helpers import read_topic, wait_until

NOW = int(time.time() * 1000)
KEYS = ("ops:opstoken, sensoronly:sensortoken:ingest.sensor, reader:readtoken:schema-read+predict,"
        "acme:acmetoken:ingest+predict+schema-admin:acme, globex:globextoken:*:globex")
NO_KEY: dict[str, str] = {}
WRONG = {"Authorization": "Bearer not-a-key-0000"}
OPS = {"Authorization": "Bearer opstoken"}
SENSOR_ONLY = {"Authorization": "Bearer sensortoken"}
READER = {"Authorization": "Bearer readtoken"}
ACME = {"Authorization": "Bearer acmetoken"}
GLOBEX = {"Authorization": "Bearer globextoken"}


def weblog(i: int, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"w-{i}", "client_ip": "10.0.0.1", "timestamp": NOW + i, "method": "GET", "path": f"/p/{i}",
            "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 100, "user_agent": "x", "latency_ms": 3.5, **extra}


def tenant(settings: Settings, name: str) -> Settings:
    return settings.with_(topic_prefix=f"{settings.topic_prefix}{name}.")


@pytest.fixture()
def gateway(settings: Settings) -> Iterator[tuple[TestClient, Settings]]:
    s = settings.with_(keys=KEYS)
    for name in ("acme", "globex"):
        scoped = tenant(s, name)
        ensure_topics(scoped, [spec for spec in declared_topics(scoped) if spec.name.endswith((".raw", ".deadletter"))])
    with TestClient(create_app(s, limits=GatewayLimits(rate_records_per_s=1000, burst_records=50))) as tc:
        yield tc, s


# -- gateway ---------------------------------------------------------------------------------------
def test_gateway_matrix_and_tenant_topics(gateway: tuple[TestClient, Settings]) -> None:
    tc, s = gateway
    codes = {who: tc.post("/ingest/weblog", json=[weblog(1)], headers=h).status_code
             for who, h in (("none", NO_KEY), ("wrong", WRONG), ("scope", SENSOR_ONLY), ("right", OPS))}
    assert codes == {"none": 401, "wrong": 403, "scope": 403, "right": 200}, codes
    scope = tc.post("/ingest/weblog", json=[weblog(1)], headers=SENSOR_ONLY)
    assert set(scope.json()) == {"error"} and "ingest.weblog" in scope.json()["error"]
    # the same event id from two tenants: each is accepted into its own tenant's topic
    assert tc.post("/ingest/weblog", json=[weblog(7)], headers=ACME).json()["results"][0]["status"] == "accepted"
    assert tc.post("/ingest/weblog", json=[weblog(7)], headers=GLOBEX).json()["results"][0]["status"] == "accepted"
    acme = read_topic(s, raw_topic(tenant(s, "acme"), "weblog"), expect=1, timeout=20)
    globex = read_topic(s, raw_topic(tenant(s, "globex"), "weblog"), expect=1, timeout=20)
    default = read_topic(s, raw_topic(s, "weblog"), expect=1, timeout=20)
    assert [r.value["event_id"] for r in acme if isinstance(r, Record)] == ["w-7"]
    assert [r.value["event_id"] for r in globex if isinstance(r, Record)] == ["w-7"]
    assert [r.value["event_id"] for r in default if isinstance(r, Record)] == ["w-1"]  # ops only
    bad = tc.post("/ingest/weblog", json=[{"client_ip": "x"}], headers=ACME)
    assert bad.status_code == 422
    kept = read_topic(s, dead_letter_topic(tenant(s, "acme"), "weblog"), decode=False, expect=1, timeout=20)
    assert len(kept) == 1 and read_topic(s, dead_letter_topic(s, "weblog"), decode=False, idle_timeout=1) == []
    metrics = tc.get("/metrics").text
    assert 'streamlearn_gateway_tenant_records_total{kind="weblog",status="accepted",tenant="acme"} 1.0' in metrics
    assert "acmetoken" not in metrics and "opstoken" not in metrics


def test_one_key_cannot_make_anothers_event_a_duplicate(settings: Settings) -> None:
    s = settings.with_(keys="mallory:mallorytoken:ingest, owner:ownertoken:ingest")
    with TestClient(create_app(s)) as tc:
        forged = tc.post("/ingest/weblog", json=[weblog(3, path="/forged")],
                         headers={"Authorization": "Bearer mallorytoken"})
        real = tc.post("/ingest/weblog", json=[weblog(3)], headers={"Authorization": "Bearer ownertoken"})
        again = tc.post("/ingest/weblog", json=[weblog(3)], headers={"Authorization": "Bearer ownertoken"})
    assert forged.json()["results"][0]["status"] == "accepted"
    assert real.json()["results"][0]["status"] == "accepted"  # not suppressed by mallory's copy
    assert again.json()["results"][0]["status"] == "duplicate"  # the owner's own resend still dedupes
    paths = sorted(r.value["path"] for r in read_topic(s, raw_topic(s, "weblog"), expect=2, timeout=20)
                   if isinstance(r, Record))
    assert paths == ["/forged", "/p/3"]


def test_gateway_refuses_hostile_bodies_by_shape_and_charges_them(settings: Settings) -> None:
    s = settings.with_(keys="ops:opstoken")
    limits = GatewayLimits(rate_records_per_s=0.01, burst_records=101, max_records_per_request=100)
    with TestClient(create_app(s, limits=limits)) as tc:
        deep = tc.post("/ingest/weblog", content=b"[" * 100_000 + b"]" * 100_000,
                       headers={**OPS, "content-type": "application/json"})
        assert deep.status_code == 400 and "nested" in deep.json()["error"], deep.text
        wide = b"[" + b",".join([b"[]"] * 2_000_000) + b"]"  # 6 MB of empty arrays
        started = time.monotonic()
        r = tc.post("/ingest/weblog", content=wide, headers={**OPS, "content-type": "application/json"})
        assert r.status_code == 413 and "arrays/objects" in r.json()["error"], r.text[:300]
        assert time.monotonic() - started < 60
        # the refused bodies were charged: 1 + 100 records (the cap per request) against a burst of 101
        spent = tc.post("/ingest/weblog", json=[weblog(1)], headers=OPS)
        assert spent.status_code == 429 and "Retry-After" in spent.headers


def test_weblog_latency_must_be_finite_and_bounded(settings: Settings) -> None:
    with TestClient(create_app(settings.with_(keys="ops:opstoken"))) as tc:
        r = tc.post("/ingest/weblog", json=[weblog(1, latency_ms=1e308), weblog(2, latency_ms=-1),
                                            weblog(3, latency_ms=True), weblog(4)], headers=OPS)
        assert r.status_code == 207, r.text
        assert [x["status"] for x in r.json()["results"]] == ["rejected", "rejected", "rejected", "accepted"]
        assert "latency_ms" in r.json()["results"][0]["error"]


def test_unicode_digits_are_not_epoch_milliseconds(settings: Settings) -> None:
    from tests.test_gateway_http import png

    with TestClient(create_app(settings.with_(keys="ops:opstoken"))) as tc:
        r = tc.post("/ingest/images", files={"files": ("a.png", png(), "image/png")}, data={"timestamp": "²"},
                    headers=OPS)
    # a 400 naming the field (it was a 500: "²".isdigit() is True but int("²") fails)
    assert r.status_code == 400 and "form field timestamp" in r.json()["error"], r.text


def test_healthz_does_not_reveal_the_bootstrap(settings: Settings) -> None:
    with TestClient(create_app(settings.with_(keys="ops:opstoken"))) as tc:
        body = tc.get("/healthz").text
    assert settings.bootstrap not in body and settings.bootstrap.split(":")[0] not in body


# -- registry --------------------------------------------------------------------------------------
SCHEMA = json.dumps({"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]})


def _register(tc: TestClient, subject: str, headers: dict[str, str], schema: str = SCHEMA) -> Any:
    return tc.post(f"/subjects/{subject}/versions", json={"schema": schema}, headers=headers)


def test_registry_matrix_tenants_and_keyed_reads(tmp_path: Path) -> None:
    keys = load_keys(KEYS, None)
    tc = TestClient(registry_app(FileRegistry(tmp_path), keys=keys, read_open=False, topic_prefix="p-"))
    acme_subject, other = "p-acme.weblog.raw-value", "p-weblog.raw-value"
    codes = {who: _register(tc, acme_subject, h).status_code for who, h in
             (("none", NO_KEY), ("wrong", WRONG), ("scope", READER), ("tenant", GLOBEX), ("right", ACME))}
    assert codes == {"none": 401, "wrong": 403, "scope": 403, "tenant": 403, "right": 200}, codes
    assert _register(tc, other, OPS).status_code == 200
    assert _register(tc, other, ACME).status_code == 403  # a tenant cannot write the default tenant's subjects
    assert tc.get("/subjects", headers=ACME).json() == [acme_subject]
    assert sorted(tc.get("/subjects", headers=OPS).json()) == [other]  # acme is a tenant: not the operator's
    assert tc.get("/subjects").status_code == 401  # reads keyed
    assert tc.get(f"/subjects/{other}/versions", headers=GLOBEX).status_code == 403
    assert tc.put("/config", json={"compatibility": "NONE"}, headers=ACME).status_code == 403
    assert tc.put("/config", json={"compatibility": "NONE"}, headers=OPS).status_code == 200
    assert tc.delete(f"/subjects/{acme_subject}", headers=GLOBEX).status_code == 403
    acme_id = _register(tc, acme_subject, ACME).json()["id"]
    assert tc.get(f"/schemas/ids/{acme_id}", headers=GLOBEX).status_code == 404
    assert tc.get(f"/schemas/ids/{acme_id}", headers=ACME).status_code == 200
    # reads open: no key needed for a read, writes still keyed
    open_tc = TestClient(registry_app(FileRegistry(tmp_path), keys=keys, read_open=True, topic_prefix="p-"))
    assert open_tc.get("/subjects").status_code == 200
    assert _register(open_tc, "x-value", NO_KEY).status_code == 401
    basic = open_tc.post("/subjects/x-value/versions", json={"schema": SCHEMA}, auth=("ops", "opstoken"))
    assert basic.status_code == 200, basic.text


@pytest.mark.parametrize("schema, status", [
    ("[" * 5000 + '"int"' + "]" * 5000, 422),
    (json.dumps({"type": "record", "name": "R", "fields": [{"name": "a b", "type": "int"}]}), 422),
    (json.dumps({"type": "record", "name": "R", "fields": [{"name": f"f{i}", "type": "int"}
                                                           for i in range(200_000)]}), 413),
])
def test_registry_refuses_hostile_schemas_with_4xx(tmp_path: Path, schema: str, status: int) -> None:
    tc = TestClient(registry_app(FileRegistry(tmp_path)), raise_server_exceptions=False)
    r = _register(tc, "s-value", NO_KEY, schema)
    assert r.status_code == status, r.text[:300]
    assert set(r.json()) == {"error_code", "message"} and "Traceback" not in r.text


# -- slow clients ----------------------------------------------------------------------------------
def test_slow_header_clients_are_disconnected(tmp_path: Path) -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(registry_app(FileRegistry(tmp_path)), header_timeout_s=1.0,
                                          lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, message="server started")
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        for conn in slow:
            conn.sendall(b"GET /subjects HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        for conn in slow:
            assert conn.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < 9
        with socket.create_connection(("127.0.0.1", port), timeout=10) as ok:
            ok.sendall(b"GET /subjects HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert ok.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def test_gateway_through_a_keyed_registry_registers_each_tenants_subject(settings: Settings, tmp_path: Path) -> None:
    """The compose wiring: the registry needs schema-admin for writes, the services carry the
    operator key (tenant *) in the registry URL, and a tenant's first event registers its subject."""
    from schemas.server import start_in_thread

    registry_keys = load_keys("platform:platformtoken:schema-admin:*, acme:acmetoken:*:acme", None)
    server = start_in_thread(FileRegistry(tmp_path / "reg"), keys=registry_keys, topic_prefix=settings.topic_prefix)
    try:
        host = server.url.split("//", 1)[1]
        s = settings.with_(keys=KEYS, registry_url=f"http://platform:platformtoken@{host}")
        scoped = tenant(s, "acme")
        ensure_topics(scoped, [spec for spec in declared_topics(scoped) if spec.name.endswith((".raw", ".deadletter"))])
        with TestClient(create_app(s)) as tc:
            r = tc.post("/ingest/weblog", json=[weblog(11)], headers=ACME)
        assert r.status_code == 200, r.text
        subjects = TestClient(registry_app(FileRegistry(tmp_path / "reg"))).get("/subjects").json()
        assert f"{raw_topic(scoped, 'weblog')}-value" in subjects
    finally:
        server.stop()


def test_tenant_quota_is_shared_by_the_tenants_keys(settings: Settings) -> None:
    s = settings.with_(keys="a1:a1token:ingest:acme, a2:a2token:ingest:acme, g:gtoken:ingest:globex")
    for name in ("acme", "globex"):
        scoped = tenant(s, name)
        ensure_topics(scoped, [spec for spec in declared_topics(scoped) if spec.name.endswith((".raw", ".deadletter"))])
    limits = GatewayLimits(burst_records=3, tenant_rate_records_per_s=0.01)
    with TestClient(create_app(s, limits=limits)) as tc:
        first = tc.post("/ingest/weblog", json=[weblog(1), weblog(2), weblog(3)],
                        headers={"Authorization": "Bearer a1token"})
        second = tc.post("/ingest/weblog", json=[weblog(4)], headers={"Authorization": "Bearer a2token"})
        other = tc.post("/ingest/weblog", json=[weblog(5)], headers={"Authorization": "Bearer gtoken"})
    assert first.status_code == 200, first.text
    assert second.status_code == 429 and "tenant 'acme'" in second.json()["error"] and "Retry-After" in second.headers
    assert other.status_code == 200  # another tenant's quota is its own


def test_a_body_that_trickles_in_is_cut_off(tmp_path: Path) -> None:
    import uvicorn

    from schemas.httpguard import BodyLimitMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:  # reads the whole body, then answers
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = BodyLimitMiddleware(app, 1 << 20, body_timeout_s=1.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(guarded, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, message="server started")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            answer = b""
            try:
                for _ in range(8):  # a byte every 0.3 s: each chunk is in time, the body is not
                    conn.sendall(b"x")
                    time.sleep(0.3)  # the slow client being simulated, not a wait for the server
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered and closed while we were still sending
            try:
                while not answer.endswith(b"}"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            except ConnectionResetError:
                pass
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
