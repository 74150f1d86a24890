"""End to end, with every worker a real subprocess under the supervisor, on a real broker.

events -> batches -> model v1 -> predictions; more data -> v2 while requests keep flowing; kill -9
of each worker type during the run -> every event in exactly one batch, every request answered
exactly once; broker stop/start -> workers reconnect by themselves.

No timings are asserted (recovery time is a benchmark figure); waits are bounded polls.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from streaming import config
from streaming.broker import EmbeddedBroker, free_port
from streaming.config import Settings
from streaming.jsoncodec import to_json
from streaming.model_registry import ModelRegistry
from streaming.producer import Publisher
from streaming.store import FeatureStore, read_batch
from streaming.topics import ensure_topics, predictions_topic, raw_topic, requests_topic
from streamlearn.stack import Supervisor, default_services
from tests.helpers import read_topic, wait_until

pytestmark = pytest.mark.slow


def _digits(start: int, stop: int) -> list[dict]:
    from ingest.generators import digits

    return list(digits())[start:stop]


def _covered(settings: Settings, kind: str) -> Counter[tuple[int, int]]:
    """(partition, offset) of every event persisted in a batch or recorded as dead-lettered."""
    seen: Counter[tuple[int, int]] = Counter()
    for info in FeatureStore(settings.feature_store).batches(kind):
        arrays = read_batch(info.path)
        seen.update(zip(arrays["partition"].tolist(), arrays["offset"].tolist(), strict=True))
        for dl in info.manifest.get("dead_letters", []):
            seen[(int(dl["partition"]), int(dl["offset"]))] += 1
    return seen


def _topic_offsets(settings: Settings, topic: str) -> set[tuple[int, int]]:
    return {(i.partition, i.offset) for i in read_topic(settings, topic, decode=False)}


def _request(i: int, event: dict) -> dict:
    return {"request_id": f"r{i}-{uuid.uuid4().hex[:6]}", "model": "digits_cnn",
            "timestamp": int(time.time() * 1000), "event_json": to_json(event), "features": None,
            "reply_topic": None}


def test_events_batches_models_predictions_with_kills(settings: Settings) -> None:
    s = settings.with_(batch_max_records=100, batch_max_seconds=1.0, retrain_every_batches=3,
                       retrain_every_seconds=5.0)
    wanted = {"stream-image", "train-digits_cnn", "serve-digits_cnn"}
    services = [svc for svc in default_services(s) if svc.name in wanted]
    for svc in services:
        svc.metrics_port = None  # -1 from the settings: no /metrics servers in tests
    sup = Supervisor(s, services, max_backoff=2.0)
    registry = ModelRegistry(s.model_dir)
    images = _digits(0, 1797)
    pub = Publisher(s)
    requests: list[str] = []

    def send_requests(n: int) -> None:
        for ev in images[len(requests) % 1500: len(requests) % 1500 + n]:
            req = _request(len(requests), ev)
            pub.publish_to(requests_topic(s, "digits_cnn"), "PredictionRequest", req)
            requests.append(req["request_id"])
        pub.flush()

    try:
        for ev in images[:900]:
            pub.publish("image", ev)
        pub.flush()
        sup.start()
        wait_until(lambda: registry.promoted("digits_cnn") is not None, 300, 0.5, "a promoted digits_cnn v1")
        send_requests(30)
        for ev in images[900:]:
            pub.publish("image", ev)
        pub.flush()
        for name in ("serve-digits_cnn", "stream-image", "train-digits_cnn"):
            sup.kill(name, signal.SIGKILL)
            send_requests(20)
        wait_until(lambda: len(registry.versions("digits_cnn")) >= 2, 300, 0.5, "a second digits_cnn version")
        send_requests(30)
        answers = read_topic(s, predictions_topic(s, "digits_cnn"), expect=len(requests), timeout=240)
        wait_until(lambda: len(_covered(s, "image")) >= 1797, 180, 0.5, "every image in a batch")
    finally:
        codes = sup.stop()
        pub.close()
    ids = Counter(a.value["request_id"] for a in answers)
    assert set(ids) == set(requests), f"missing {len(set(requests) - set(ids))} answers"
    assert max(ids.values()) == 1, "a request was answered twice"
    assert not [a for a in answers if a.value.get("error")], "failed requests"
    ever_promoted = {h["version"] for h in registry.history("digits_cnn")
                     if "promot" in str(h.get("action", "")).lower()}
    ever_promoted.add(registry.promoted("digits_cnn"))
    assert {a.value["model_version"] for a in answers} <= ever_promoted
    covered = _covered(s, "image")
    assert set(covered) == _topic_offsets(s, raw_topic(s, "image")), "missing events in batches"
    assert max(covered.values()) == 1, "an event is in two batches"
    assert sup.status()[0]["restarts"] >= 1
    assert all(c is not None for c in codes.values())


def test_workers_reconnect_after_broker_restart(tmp_path: Path) -> None:
    s = config.load({"home": tmp_path / "home", "broker_port": free_port(), "batch_max_records": 100,
                     "batch_max_seconds": 1.0, "metrics_port": -1}, environ={})
    broker = EmbeddedBroker(s)
    broker.start()
    sup = Supervisor(s, [svc for svc in default_services(s) if svc.name == "stream-sensor"], max_backoff=2.0)
    sup.services[0].metrics_port = None
    try:
        ensure_topics(s)
        from ingest.sensors import generate

        readings = list(generate(600, n_sensors=6, seed=5, start_ms=int(time.time() * 1000) - 3_600_000,
                                 interval_ms=1000))
        with Publisher(s) as pub:
            for r in readings[:300]:
                pub.publish("sensor", r)
        sup.start()
        wait_until(lambda: len(_covered(s, "sensor")) >= 300, 120, 0.5, "first 300 readings batched")
        broker.stop()
        broker.start()
        with Publisher(s) as pub:
            for r in readings[300:]:
                pub.publish("sensor", r)
        wait_until(lambda: len(_covered(s, "sensor")) >= 600, 180, 0.5, "all 600 readings batched after restart")
        covered = _covered(s, "sensor")
        assert set(covered) == _topic_offsets(s, raw_topic(s, "sensor"))
        assert max(covered.values()) == 1
    finally:
        sup.stop()
        broker.stop()
