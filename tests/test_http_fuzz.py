"""Schema-driven fuzz (schemathesis) of the gateway, serving HTTP and registry OpenAPI: no 5xx.

Every operation of each API gets ``FUZZ_EXAMPLES`` generated requests (derandomized, so CI sees the
same cases every run), sent with a valid key so the fuzz reaches past authentication. A 5xx is a
failure; the figures (cases, 5xx) are printed, and the whole run is bounded by pytest's timeout.

Run: ``pytest tests/test_http_fuzz.py -q -s`` (``-s`` shows the figures).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from ingest.gateway.routes import create_app as gateway_app
from schemas.access import load_keys
from schemas.registry import FileRegistry
from schemas.server import create_app as registry_app
from serving.http_api import create_app as serving_app
from serving.inputs import Featurization
from serving.policy import Policy
from serving.versions import VersionManager
from streaming import config
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from tests.helpers import wait_until
from tests.serving_helpers import WEBLOG_FEATURIZER, publish

FUZZ_EXAMPLES = 25  # per operation: modest, so the three APIs fuzz in about a minute on 2 cores
KEYS = "fuzz:fuzztoken"
AUTH = {"Authorization": "Bearer fuzztoken"}


def fuzz(app: Any, openapi: dict[str, Any], name: str, prepare: Callable[[TestClient], None] | None = None) -> None:
    schema = schemathesis.openapi.from_dict(openapi)
    schema.app = app
    cases, errors, started = 0, [], time.monotonic()
    per_operation: dict[str, int] = {}
    if prepare is not None:
        prepare(TestClient(app))
    for result in schema.get_all_operations():
        operation = result.ok()

        @hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            nonlocal cases
            cases += 1
            label = f"{case.method} {case.path}"
            per_operation[label] = per_operation.get(label, 0) + 1
            response = case.call(headers=AUTH)
            if response.status_code >= 500:
                errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        run()
    print(f"\nfuzz {name}: {cases} cases, {len(errors)} 5xx, {time.monotonic() - started:.1f} s; {per_operation}")
    assert cases > 0
    assert not errors, "\n".join(errors[:10])


def pin(openapi: dict[str, Any], name: str, values: list[str]) -> dict[str, Any]:
    """Restrict path parameter ``name`` to ``values``, so cases reach past the 404 of an unknown name."""
    for path in openapi["paths"].values():
        for op in path.values():
            for param in op.get("parameters", []):
                if param["name"] == name:
                    param["schema"] = {"type": "string", "enum": values}
    return openapi


def test_fuzz_gateway(settings: Settings) -> None:
    app = gateway_app(settings.with_(keys=KEYS))
    with TestClient(app):  # lifespan: the publisher is closed afterwards
        fuzz(app, pin(app.openapi(), "kind", ["weblog", "sensor", "image"]), "gateway")


def test_fuzz_registry(tmp_path: Path) -> None:
    app = registry_app(FileRegistry(tmp_path), keys=load_keys(KEYS, None), read_open=False)

    def prepare(tc: TestClient) -> None:  # something to find, so lookups reach the store
        body = {"schema": '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}'}
        assert tc.post("/subjects/s-value/versions", json=body, headers=AUTH).status_code == 200

    fuzz(app, app.openapi(), "registry", prepare)


def test_fuzz_serving(broker_settings: Settings, tmp_path: Path) -> None:
    s = config.load({"home": tmp_path, "kafka_bootstrap": broker_settings.bootstrap,
                     "topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "metrics_port": -1})
    publish(ModelRegistry(s.model_dir), "fuzzmodel", tag=5.0, n_features=64, n_outputs=1, featurizer=WEBLOG_FEATURIZER)
    manager = VersionManager(s, "fuzzmodel", Policy.parse("latest"), poll_interval_s=0.1, follow_updates=False).start()
    try:
        wait_until(lambda: manager.current().stable is not None, timeout=60, message="model loaded")
        app = serving_app(manager, Featurization(), "fuzzmodel", keys=load_keys(KEYS, None))
        fuzz(app, pin(app.openapi(), "name", ["fuzzmodel"]), "serving")
        ok = TestClient(app).post("/v1/models/fuzzmodel:predict", json={"instances": [np.zeros(64).tolist()]},
                                  headers=AUTH)
        assert ok.status_code == 200, ok.text  # the server still answers after the fuzz
    finally:
        manager.stop()
