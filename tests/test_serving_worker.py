"""Serving worker on the real embedded broker: answers, bad requests, hot swaps under load."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from serving.client import predict, to_request
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from streaming.topics import dead_letter_topic, predictions_topic
from tests.helpers import read_topic, wait_until
from tests.serving_helpers import Running, expected_outputs, publish

MODEL = "tiny"


def _feature_requests(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [to_request(MODEL, {"request_id": f"r{seed}-{i}-{uuid.uuid4().hex[:6]}",
                               "features": rng.normal(size=4).round(3).tolist()}) for i in range(n)]


@pytest.fixture()
def registry(settings: Settings) -> ModelRegistry:
    return ModelRegistry(settings.model_dir)


@pytest.fixture()
def running(settings: Settings, registry: ModelRegistry) -> Iterator[Running]:
    publish(registry, MODEL, tag=100.0)
    r = Running(settings, MODEL)
    yield r
    r.stop()


def test_answers_feature_requests_with_the_promoted_version(settings: Settings, running: Running) -> None:
    reqs = _feature_requests(40)
    answers = predict(settings, MODEL, reqs, timeout_s=60)
    for req, ans in zip(reqs, answers, strict=True):
        assert ans["error"] is None, ans
        assert ans["model_version"] == 1
        np.testing.assert_allclose(ans["outputs"], expected_outputs(req["features"], 100.0), rtol=1e-5)
        assert ans["latency_ms"] >= 0 and ans["input_topic"].endswith(f"{MODEL}.requests")
    assert running.worker.batches < 40  # dynamic batching put several requests in one model call


def test_bad_requests_get_an_error_answer_and_a_dead_letter(settings: Settings, running: Running) -> None:
    bad = [to_request(MODEL, {"request_id": "short", "features": [1.0, 2.0]}),
           to_request(MODEL, {"request_id": "notjson", "event_json": "{nope"}),
           to_request(MODEL, {"request_id": "noinput", "features": None, "event_json": None})]
    good = _feature_requests(3, seed=1)
    answers = {a["request_id"]: a for a in predict(settings, MODEL, bad + good, timeout_s=60)}
    for rid, word in (("short", "takes 4 features"), ("notjson", "not valid JSON"), ("noinput", "neither")):
        assert answers[rid]["outputs"] == [] and word in answers[rid]["error"], answers[rid]
    assert all(answers[r["request_id"]]["error"] is None for r in good)
    dls = read_topic(settings, dead_letter_topic(settings, "serving"), decode=False, expect=3, timeout=20)
    reasons = {bytes(d.key).decode(): dict(d.headers) for d in dls}
    assert set(reasons) == {"short", "notjson", "noinput"}
    assert reasons["short"]["dl.stage"] == b"serving"
    assert b"takes 4 features" in reasons["short"]["dl.message"]


def test_twenty_swaps_while_requests_flow(settings: Settings, registry: ModelRegistry, running: Running) -> None:
    """Publish+promote 20 versions one after another while a client keeps sending requests:
    no answer fails, none is missing or duplicated, each one is computed by a version that was ready."""
    tags = {1: 100.0}
    results: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        seed = 10
        try:
            while not stop.is_set():
                reqs = _feature_requests(25, seed=seed)
                seed += 1
                sent.extend(reqs)
                results.extend(predict(settings, MODEL, reqs, timeout_s=60))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    manager = running.worker.manager
    for i in range(20):
        tag = 1000.0 * (i + 2)
        v = publish(registry, MODEL, tag=tag)
        tags[v] = tag
        wait_until(lambda v=v: manager.current().stable and manager.current().stable.version == v,  # type: ignore[union-attr]
                   timeout=30, message=f"swap to v{v}")
        wait_until(lambda n=len(results): len(results) > n, timeout=30, message="answers after the swap")
    stop.set()
    t.join(timeout=90)
    assert not errors, errors
    assert manager.stats.swaps == 21 and manager.stats.failures == 0
    ready = set(manager.stats.ready_versions)
    by_id: dict[str, int] = {}
    for item in read_topic(settings, predictions_topic(settings, MODEL)):
        by_id[item.value["request_id"]] = by_id.get(item.value["request_id"], 0) + 1
    assert len(by_id) == len(sent), "missing answers"
    assert max(by_id.values()) == 1, "duplicated answers"
    req_by_id = {r["request_id"]: r for r in sent}
    used = set()
    for ans in results:
        assert ans["error"] is None, ans
        assert ans["model_version"] in ready
        used.add(ans["model_version"])
        np.testing.assert_allclose(ans["outputs"], expected_outputs(req_by_id[ans["request_id"]]["features"],
                                                                     tags[ans["model_version"]]), rtol=1e-5)
    assert len(used) >= 10, f"requests were answered by only {sorted(used)}"


def test_predict_cli_prints_answers_and_names_missing_on_timeout(settings: Settings, running: Running,
                                                                 tmp_path: Any) -> None:
    import json
    import subprocess

    from tests.helpers import streamlearn_cmd, subprocess_env

    path = tmp_path / "requests.jsonl"
    path.write_text('{"features": [1, 2, 3, 4]}\n\n{"request_id": "mine", "features": [0, 0, 0, 4]}\n')
    out = subprocess.run(streamlearn_cmd("predict", MODEL, "--file", str(path), "--timeout", "60"),
                         env=subprocess_env(settings), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["error"] for a in answers] == [None, None] and answers[1]["request_id"] == "mine"
    np.testing.assert_allclose(answers[1]["outputs"], expected_outputs([0, 0, 0, 4], 100.0), rtol=1e-5)
    out = subprocess.run(streamlearn_cmd("predict", "nobody_serves_this", "--file", str(path), "--timeout", "1"),
                         env=subprocess_env(settings), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "2 of 2 requests got no answer" in out.stderr, out.stderr


def test_at_least_once_mode_skips_a_redelivered_request_id(settings: Settings, registry: ModelRegistry) -> None:
    """transactions=False: answers are flushed before offsets are committed, and a request id seen
    recently is not answered twice (the client de-duplicates across restarts)."""
    from prometheus_client import REGISTRY

    publish(registry, MODEL, tag=3.0)
    s = settings.with_(transactions=False)
    run = Running(s, MODEL)
    try:
        before = REGISTRY.get_sample_value("streamlearn_serving_duplicates_total", {"model": MODEL}) or 0.0
        req = to_request(MODEL, {"request_id": "twice", "features": [1.0, 1.0, 1.0, 1.0]})
        assert predict(s, MODEL, [req], timeout_s=60)[0]["model_version"] == 1
        from streaming.producer import Publisher
        from streaming.topics import requests_topic

        with Publisher(s) as pub:  # a re-delivery of the same request id
            pub.publish_to(requests_topic(s, MODEL), "PredictionRequest", req, key=req["request_id"])
        wait_until(lambda: (REGISTRY.get_sample_value("streamlearn_serving_duplicates_total",
                                                      {"model": MODEL}) or 0) - before == 1,
                   timeout=30, message="the repeat to be recognised")
        predict(s, MODEL, _feature_requests(2, seed=5), timeout_s=60)
        ids = [i.value["request_id"] for i in read_topic(s, predictions_topic(s, MODEL))]
        assert ids.count("twice") == 1 and len(ids) == 3
    finally:
        run.stop()
