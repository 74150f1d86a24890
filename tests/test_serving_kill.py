"""Exactly once across crashes: kill -9 a `streamlearn serve` subprocess under load, six times."""

from __future__ import annotations

import random
import subprocess
import time
from typing import Any

import pytest

from schemas.registry import open_registry
from schemas.serde import AvroDeserializer
from serving.client import ensure_model_topics
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from streaming.topics import predictions_topic
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until
from tests.serving_helpers import GroupProgress, RequestLoad, assert_each_answered_once, publish

MODEL = "killme"
KILLS = 6  # each is a cold TensorFlow start (~9 s on 2 cores); six random kill points cover the batch cycle


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
    # A short liveness watchdog (streaming/watchdog.py) rides along: under load, through kill -9 restarts,
    # fenced transactions and the final drain, the batch loop must keep coming round (a watchdog exit
    # would show as the worker dying on its own, which the loop below asserts never happens).
    return subprocess.Popen(streamlearn_cmd("serve", MODEL), env=subprocess_env(settings, STREAMLEARN_WATCHDOG_S="10"),
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.timeout(900)  # six cold starts of TensorFlow; ~60 s on an idle 2-core box
def test_kill_9_under_load_every_request_answered_exactly_once(settings: Settings, tmp_path: Any) -> None:
    publish(ModelRegistry(settings.model_dir), MODEL, tag=1.0)
    ensure_model_topics(settings, MODEL)
    progress = GroupProgress(settings, MODEL)
    load = RequestLoad(settings, MODEL, "k", 13)
    rng = random.Random(7)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = _start(settings, log)
        load.start()
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
            load.stop()
            wait_until(lambda: progress.done() >= progress.total(), timeout=180, interval=0.5,
                       message=f"the worker to consume all {len(load.sent)} requests")
        finally:
            load.stop()
            proc.terminate()
            proc.wait(timeout=20)
            progress.close()
    text = log_path.read_text(errors="replace")
    assert "watchdog: this process exits if its serve killme loop stalls for 10 s" in text
    assert "has not come round" not in text, text[-3000:]
    answers = _answers(settings, len(load.sent))
    assert len(load.sent) > 300
    assert_each_answered_once([rid for rid, _ in answers], load.sent)
    decode = AvroDeserializer(open_registry(settings.registry_url, settings.registry_dir))
    values = [decode(v).value for _, v in answers]
    assert all(v["error"] is None and v["model_version"] == 1 for v in values)
