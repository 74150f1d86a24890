"""Exactly once across crashes: kill -9 a `streamlearn serve` subprocess under load, ten times."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from typing import Any

import pytest

from schemas.registry import open_registry
from schemas.serde import AvroDeserializer
from serving.client import ensure_model_topics, to_request
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from streaming.producer import Publisher
from streaming.topics import predictions_topic, requests_topic
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until
from tests.serving_helpers import GroupProgress, publish

MODEL = "killme"
KILLS = 10


def _answers(settings: Settings, expect: int, timeout: float = 120) -> list[tuple[str, bytes]]:
    """Every committed answer, read by a fresh read_committed consumer from the beginning."""
    from kafka import KafkaConsumer, TopicPartition

    topic = predictions_topic(settings, MODEL)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                             isolation_level="read_committed")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        items: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        idle_since = time.monotonic()
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=300)
            for recs in polled.values():
                items.extend((r.key.decode(), r.value) for r in recs)
            if polled:
                idle_since = time.monotonic()
            elif len(items) >= expect and time.monotonic() - idle_since > 2.0:
                break  # everything expected, and nothing more (no late duplicate) for 2 s
        return items
    finally:
        consumer.close()


def _start(settings: Settings, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(streamlearn_cmd("serve", MODEL), env=subprocess_env(settings),
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.timeout(900)  # ten cold starts of TensorFlow; ~90 s on an idle 2-core box
def test_kill_9_under_load_every_request_answered_exactly_once(settings: Settings, tmp_path: Any) -> None:
    publish(ModelRegistry(settings.model_dir), MODEL, tag=1.0)
    ensure_model_topics(settings, MODEL)
    progress = GroupProgress(settings, MODEL)
    sent: list[str] = []
    stop_load = threading.Event()

    def load() -> None:  # a steady stream of requests for the whole test (about 50/s)
        n = 0
        with Publisher(settings) as pub:
            while not stop_load.is_set():
                req = to_request(MODEL, {"request_id": f"k{n}", "features": [float(n % 13), 0.0, 1.0, 2.0]})
                pub.publish_to(requests_topic(settings, MODEL), "PredictionRequest", req, key=req["request_id"])
                sent.append(req["request_id"])
                n += 1
                stop_load.wait(0.02)  # pacing of the load generator, not a wait for a condition

    loader = threading.Thread(target=load, daemon=True)
    rng = random.Random(7)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = _start(settings, log)
        loader.start()
        try:
            for k in range(KILLS):
                seen = progress.done()
                wait_until(lambda s=seen, p=proc: progress.done() > s + 20 or p.poll() is not None, timeout=180,
                           message=f"answers after restart {k}")
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(rng.uniform(0.0, 0.3))  # random point inside the worker's batch cycle
                proc.kill()  # SIGKILL: no clean-up, an open transaction is left behind
                proc.wait(timeout=10)
                proc = _start(settings, log)
            stop_load.set()
            loader.join(timeout=10)
            wait_until(lambda: progress.done() >= progress.total(), timeout=180, interval=0.5,
                       message=f"the worker to consume all {len(sent)} requests")
        finally:
            stop_load.set()
            proc.terminate()
            proc.wait(timeout=20)
            progress.close()
    answers = _answers(settings, len(sent))
    counts: dict[str, int] = {}
    for rid, _ in answers:
        counts[rid] = counts.get(rid, 0) + 1
    assert len(sent) > 300
    assert set(counts) == set(sent), f"missing {len(set(sent) - set(counts))}"
    dups = {r: c for r, c in counts.items() if c > 1}
    assert not dups, f"{len(dups)} requests answered more than once, e.g. {list(dups.items())[:5]}"
    decode = AvroDeserializer(open_registry(settings.registry_url, settings.registry_dir))
    values = [decode(v).value for _, v in answers]
    assert all(v["error"] is None and v["model_version"] == 1 for v in values)
