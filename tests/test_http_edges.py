"""Edges of the HTTP servers found by probes: compressed bodies, TF Serving's other verbs, clients that leave.

* A compressed request body is a 415 that names Content-Encoding, on every server: none decompresses
  (there would be a gzip bomb to bound), and read as it was sent a gzip body was answered 400 "not valid
  UTF-8 JSON" by serving, the control API and the registry. The shared body guard (schemas/httpguard.py)
  now checks it; the gateway had its own check.
* Serving says which TF Serving verbs it answers; a prediction whose client left while it was queued is
  dropped.
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from schemas.access import load_keys
from schemas.registry import FileRegistry
from schemas.server import create_app as registry_app
from serving.http_api import create_app as serving_app
from serving.inputs import Featurization
from serving.policy import Policy
from serving.versions import VersionManager
from streaming import config
from streaming.config import Settings
from streamlearn.api.app import create_app as api_app

KEYS = "enc:enctoken-123"
AUTH = {"Authorization": "Bearer enctoken-123", "Content-Type": "application/json"}


def _post_both(tc: TestClient, path: str, body: dict[str, object]) -> tuple[int, str, int]:
    """(status, error text) of the gzip'd body, and the status of the same body sent plain."""
    raw = json.dumps(body).encode()
    packed = tc.post(path, content=gzip.compress(raw), headers={**AUTH, "Content-Encoding": "gzip"})
    plain = tc.post(path, content=raw, headers={**AUTH, "Content-Encoding": "identity"})
    return packed.status_code, packed.json()["error"] if "error" in packed.json() else packed.text, plain.status_code


def test_registry_refuses_a_gzip_body_with_415(tmp_path: Path) -> None:
    tc = TestClient(registry_app(FileRegistry(tmp_path), keys=load_keys(KEYS, None), read_open=False))
    schema = {"schema": '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}'}
    status, text, plain = _post_both(tc, "/subjects/s-value/versions", schema)
    assert status == 415 and "Content-Encoding 'gzip' is not accepted" in text, text
    assert plain == 200


def test_control_api_refuses_a_gzip_body_with_415(tmp_path: Path) -> None:
    s = config.load({"home": tmp_path / "home", "metrics_port": -1, "api_compact_interval_s": 0})
    with TestClient(api_app(s, keys=load_keys(KEYS + ":admin", None), compact=False)) as tc:
        status, text, plain = _post_both(tc, "/trainModel", {"model": "nosuchmodel"})
    assert status == 415 and "Content-Encoding 'gzip' is not accepted" in text, text
    assert plain not in (415, 500)  # the plain body reaches the route (which refuses the unknown model)


def test_serving_refuses_a_gzip_body_with_415(broker_settings: Settings, tmp_path: Path) -> None:
    s = config.load({"home": tmp_path, "kafka_bootstrap": broker_settings.bootstrap,
                     "topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "metrics_port": -1})
    manager = VersionManager(s, "encmodel", Policy.parse("latest"), poll_interval_s=0.1, follow_updates=False)
    tc = TestClient(serving_app(manager, Featurization(), "encmodel", keys=load_keys(KEYS, None)))
    status, text, plain = _post_both(tc, "/v1/models/encmodel:predict", {"instances": [[0.0, 1.0]]})
    assert status == 415 and "Content-Encoding 'gzip' is not accepted" in text, text
    assert plain != 415  # no version loaded: refused further on, for that reason


def test_serving_says_which_tf_serving_verbs_it_answers(broker_settings: Settings, tmp_path: Path) -> None:
    """`:classify` and `:regress` matched `GET /v1/models/{name}` and were a 405 that named nothing."""
    s = config.load({"home": tmp_path, "kafka_bootstrap": broker_settings.bootstrap,
                     "topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "metrics_port": -1})
    manager = VersionManager(s, "encmodel", Policy.parse("latest"), poll_interval_s=0.1, follow_updates=False)
    tc = TestClient(serving_app(manager, Featurization(), "encmodel", keys=load_keys(KEYS, None)))
    for path in ("/v1/models/encmodel:classify", "/v1/models/encmodel/versions/1:regress"):
        answer = tc.post(path, json={"examples": [{"x": 1.0}]}, headers=AUTH)
        assert answer.status_code == 501 and ":predict with" in answer.json()["error"], (path, answer.text)
    other = tc.post("/v1/models/encmodel/nothing", json={}, headers=AUTH)
    assert other.status_code == 404 and ":predict" in other.json()["error"], other.text


def test_a_prediction_whose_client_left_while_it_was_queued_is_dropped(broker_settings: Settings, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose client had gone kept its prediction queued, then running, and kept its concurrency slot:
    ten abandoned slow requests held all 8 slots for ~20 s. Queued work of a client that left is now dropped."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from serving.exceptions import RequestDecodeError
    from serving.http_api import ServeLimits

    s = config.load({"home": tmp_path, "kafka_bootstrap": broker_settings.bootstrap,
                     "topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "metrics_port": -1})
    manager = VersionManager(s, "encmodel", Policy.parse("latest"), poll_interval_s=0.1, follow_updates=False)
    monkeypatch.setattr(manager, "current", lambda: SimpleNamespace(stable=SimpleNamespace(version=1)))
    ran: list[object] = []

    class Spy(Featurization):
        def check_features(self, values: object, lv: object) -> object:  # type: ignore[override]
            ran.append(values)
            raise RequestDecodeError("not reached in this test")

    app = serving_app(manager, Spy(), "encmodel", limits=ServeLimits(pool_workers=1))
    gate = threading.Event()
    app.state.pool.submit(gate.wait, 60)  # the one inference thread is busy: the request's work is queued
    body = json.dumps({"instances": [[0.0, 1.0]]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/models/encmodel:predict", "raw_path": b"",
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}  # the client has gone

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    try:
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 20))  # before: waited for the busy thread
        assert next(m["status"] for m in sent if m["type"] == "http.response.start") == 499
    finally:
        gate.set()
        app.state.pool.shutdown(wait=True)
    assert ran == []  # its prediction never ran
