"""A compressed request body is a 415 that names Content-Encoding, on every HTTP server.

Why: no server decompresses (there would be a gzip bomb to bound), and read as it was sent a gzip body
was answered 400 "not valid UTF-8 JSON" by serving, the control API and the registry, which named the
wrong problem. The gateway had its own check; the shared body guard (schemas/httpguard.py) now has it.
"""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

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
