"""Serving HTTP: the key matrix, tenant-owned model names and the limits of issue 12 item 3.

One module-scoped model (TensorFlow export is slow) served by several apps that differ only in
their keys and limits; the apps run in-process under Starlette's TestClient.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from schemas.access import KeyTable, load_keys
from serving.http_api import ServeLimits, create_app
from serving.inputs import Featurization
from serving.policy import Policy
from serving.versions import VersionManager
from streaming import config
from streaming.model_registry import ModelRegistry
from tests.helpers import wait_until
from tests.serving_helpers import WEBLOG_FEATURIZER, publish

KEYS = ("ops:opstoken, ingestonly:ingesttoken:ingest, acme:acmetoken:predict:acme, "
        "globex:globextoken:*:globex")
ACME_MODEL = "acme.tiny"
X = np.linspace(-1, 1, 64).round(4).tolist()


@pytest.fixture(scope="module")
def manager(broker_settings: config.Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VersionManager]:
    home: Path = tmp_path_factory.mktemp("serving-access")
    s = config.load({"home": home, "kafka_bootstrap": broker_settings.bootstrap,
                     "topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "metrics_port": -1})
    reg = ModelRegistry(s.model_dir)
    publish(reg, ACME_MODEL, tag=5.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER)
    mgr = VersionManager(s, ACME_MODEL, Policy.parse("latest"), poll_interval_s=0.1, follow_updates=False).start()
    wait_until(lambda: mgr.current().stable is not None, timeout=60, message="model loaded")
    yield mgr
    mgr.stop()


def client(manager: VersionManager, keys: KeyTable | None = None, **limits: Any) -> TestClient:
    return TestClient(create_app(manager, Featurization(), ACME_MODEL, keys=keys, limits=ServeLimits(**limits)),
                      raise_server_exceptions=False)


def test_predict_matrix_and_tenant_owned_model(manager: VersionManager) -> None:
    tc = client(manager, load_keys(KEYS, None))
    url, body = f"/v1/models/{ACME_MODEL}:predict", {"instances": [X]}
    codes = {}
    for who, token in (("none", None), ("wrong", "nope-0000"), ("scope", "ingesttoken"), ("tenant", "globextoken"),
                       ("default-tenant", "opstoken"), ("right", "acmetoken")):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = tc.post(url, json=body, headers=headers)
        codes[who] = r.status_code
        assert set(r.json()) == ({"predictions"} if r.status_code == 200 else {"error"}), r.text
        assert token is None or token not in r.text
    assert codes == {"none": 401, "wrong": 403, "scope": 403, "tenant": 403, "default-tenant": 403,
                     "right": 200}, codes
    status = {t: tc.get(f"/v1/models/{ACME_MODEL}", headers={"Authorization": f"Bearer {t}"}).status_code
              for t in ("acmetoken", "globextoken")}
    assert status == {"acmetoken": 200, "globextoken": 403}
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value("streamlearn_serving_http_requests_total",
                                     {"model": ACME_MODEL, "tenant": "acme", "status": "200"}) >= 1


def test_hostile_requests_get_4xx_in_tf_serving_shape(manager: VersionManager) -> None:
    tc = client(manager, max_instances=4, max_body_bytes=64 * 1024)
    base = f"/v1/models/{ACME_MODEL}"
    cases = [
        ("get", f"{base}/versions/²", None, 400),  # "²".isdigit() is True; int("²") raises
        ("get", f"{base}/versions/{'9' * 5000}", None, 400),
        ("get", f"{base}/versions/1", None, 200),
        ("get", f"{base}/labels/stable", None, 200),
        ("get", f"{base}/labels/blue", None, 404),
        ("get", "/v1/nothing/here", None, 404),
        ("post", f"{base}:predict", {"instances": [[True] + X[1:]]}, 400),
        ("post", f"{base}:predict", {"instances": [X] * 5}, 413),
        ("post", f"{base}:predict", b'{"instances": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400),
        ("post", f"{base}:predict", b'{"instances": [' + b"1," * 40_000 + b"1]}", 413),  # over 64 KiB
        ("post", f"{base}:predict", b'{"instances": [' + b"[]," * 100 + b"[]]}", 413),  # over 4*4+16 arrays
        ("post", f"{base}:predict", {"inputs": {"x": [X]}}, 200),
        ("put", f"{base}:predict", {"instances": [X]}, 405),
    ]
    for method, url, body, want in cases:
        if isinstance(body, bytes):
            r = tc.request(method, url, content=body, headers={"content-type": "application/json"})
        else:
            r = tc.request(method, url, json=body)
        assert r.status_code == want, (url[:80], r.status_code, r.text[:200])
        if want >= 400:
            assert set(r.json()) == {"error"} and "Traceback" not in r.text, r.text[:200]
    boolean = tc.post(f"{base}:predict", json={"instances": [[True] + X[1:]]}).json()["error"]
    assert "boolean" in boolean
    status = tc.get(f"{base}/labels/stable").json()
    assert status["model_version_status"][0]["version"] == "1"


def test_concurrency_and_tenant_quota_answer_429(manager: VersionManager) -> None:
    full = client(manager, max_concurrent=0)
    r = full.post(f"/v1/models/{ACME_MODEL}:predict", json={"instances": [X]})
    assert r.status_code == 429 and set(r.json()) == {"error"}
    keys = load_keys(KEYS, None)
    quota = client(manager, keys, tenant_rate=0.01, max_instances=4)
    acme = {"Authorization": "Bearer acmetoken"}
    assert quota.post(f"/v1/models/{ACME_MODEL}:predict", json={"instances": [X] * 4}, headers=acme).status_code == 200
    r = quota.post(f"/v1/models/{ACME_MODEL}:predict", json={"instances": [X]}, headers=acme)
    assert r.status_code == 429 and "acme" in r.json()["error"] and "Retry-After" in r.headers
    # the columnar form counts its rows too: {"inputs": {"x": [1000 rows]}} was one instance, through a spent quota
    fresh = client(manager, keys, tenant_rate=0.01, max_instances=4)
    r = fresh.post(f"/v1/models/{ACME_MODEL}:predict", json={"inputs": {"x": [X] * 3}}, headers=acme)
    assert r.status_code == 200, r.text
    r = fresh.post(f"/v1/models/{ACME_MODEL}:predict", json={"inputs": {"x": [X] * 3}}, headers=acme)
    assert r.status_code == 429, r.text  # 3 + 3 rows over a burst of 4
