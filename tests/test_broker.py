"""The embedded broker's lifecycle: readiness, refusal of a second broker, persistence across restarts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from streaming import config
from streaming.broker import EmbeddedBroker, free_port, probe
from streaming.consumer import Subscriber
from streaming.exceptions import BrokerAlreadyRunningError, BrokerError
from streaming.producer import Publisher
from streaming.topics import ensure_topics, raw_topic
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until


@pytest.fixture()
def own_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = config.load({"home": tmp_path / "home", "broker_port": free_port()}, environ={})
    broker = EmbeddedBroker(settings)
    yield settings, broker
    broker.stop()


def test_start_status_stop_and_refuse_second(own_broker) -> None:  # type: ignore[no-untyped-def]
    settings, broker = own_broker
    assert not broker.status().running
    status = broker.start()
    assert status.running and status.pid and probe(settings.bootstrap) is not None
    assert (settings.broker_dir / "broker.log").exists()
    with pytest.raises(BrokerAlreadyRunningError) as err:
        EmbeddedBroker(settings).start()
    assert str(settings.broker_dir / "data") in str(err.value)
    assert broker.stop() is True
    assert not broker.status().running
    assert probe(settings.bootstrap, timeout_s=0.5) is None
    assert broker.stop() is False


def test_port_taken_by_another_program_is_a_clear_error(own_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, broker = own_broker
    broker.start()
    other = config.load({"home": tmp_path / "other", "broker_port": settings.broker_port}, environ={})
    with pytest.raises(BrokerError) as err:
        EmbeddedBroker(other).start()
    assert "already in use" in str(err.value) and "STREAMLEARN_BROKER_PORT" in str(err.value)


def test_external_bootstrap_starts_nothing(tmp_path: Path, broker_settings: config.Settings) -> None:
    settings = config.load({"home": tmp_path / "h"}, environ={"STREAMLEARN_KAFKA_BOOTSTRAP": broker_settings.bootstrap})
    status = EmbeddedBroker(settings).start()
    assert status.external and not (settings.broker_dir / "broker.pid").exists()
    out = subprocess.run(streamlearn_cmd("broker", "start"), env=subprocess_env(settings), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "not starting" in out.stdout


def test_stop_start_keeps_topics_data_and_committed_offsets(own_broker) -> None:  # type: ignore[no-untyped-def]
    settings, broker = own_broker
    broker.start()
    ensure_topics(settings)
    topic = raw_topic(settings, "sensor")
    with Publisher(settings) as pub:
        metas = [pub.publish("sensor", {"sensor_id": "s1", "timestamp": 1_700_000_000_000 + i, "value": float(i),
                                        "unit": "c"}).get(timeout=10) for i in range(25)]
    tp = TopicPartition(topic, metas[0].partition)
    group = settings.group("keep")
    with Subscriber(settings, topic, group=group) as sub:
        got = []
        wait_until(lambda: got.extend(sub.poll_batch(200)) or len(got) >= 10, 20, message="10 records")
        sub.commit({tp: 10})
    # past the persistence window: the state file has been rewritten after our last change
    state = settings.broker_dir / "data" / "kafka.json"
    wait_until(lambda: state.exists() and str(topic).encode() in state.read_bytes(), 20, message="state persisted")
    broker.stop()
    broker.start()
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        assert topic in consumer.topics()
        assert consumer.end_offsets([tp])[tp] == 25
        assert consumer.committed(tp) == 10
    finally:
        consumer.close()
    with Subscriber(settings, topic, start="beginning", until="end") as sub:
        values = sorted(r.value["value"] for r in sub)
    assert values == [float(i) for i in range(25)]


def test_cli_broker_start_status_stop(tmp_path: Path) -> None:
    settings = config.load({"home": tmp_path / "cli", "broker_port": free_port()}, environ={})
    env = subprocess_env(settings)
    try:
        start = subprocess.run(streamlearn_cmd("broker", "start"), env=env, capture_output=True, text=True, timeout=90)
        assert start.returncode == 0, start.stderr
        status = subprocess.run(streamlearn_cmd("broker", "status"), env=env, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0 and "running" in status.stdout
        again = subprocess.run(streamlearn_cmd("broker", "start"), env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        stop = subprocess.run(streamlearn_cmd("broker", "stop"), env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    status = subprocess.run(streamlearn_cmd("broker", "status"), env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 3
    assert os.path.exists(tmp_path / "cli" / "broker" / "broker.log")


def test_a_broker_started_by_the_supervisor_is_started_again_after_kill_9(tmp_path: Path) -> None:
    """`up` started the embedded broker but never watched it: after the broker died (an OOM kill, a crash)
    every supervised worker retried against nothing until somebody ran `streamlearn broker start` by hand.
    The broker it started is now restarted on the same data dir. (What a kill -9 of noida-db loses of its
    last writes is docs/RECOVERY.md's matter, not checked here.)"""
    import signal

    from streaming.broker import kept_broker

    settings = config.load({"home": tmp_path / "home", "broker_port": free_port()}, environ={})
    with kept_broker(settings, timeout_s=60) as kept:
        assert kept.owned and kept.revive() is None  # alive: nothing to do
        ensure_topics(settings)
        first = kept.status.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        note = wait_until(kept.revive, 60, 0.05, "the broker started again")
        assert f"(pid {first}) exited with code -9; started it again as pid {kept.status.pid}" in note
        assert kept.status.pid != first and kept.restarts == 1
        assert probe(settings.bootstrap) is not None
        assert EmbeddedBroker(settings).status().pid == kept.status.pid  # `status` sees the new one
        ensure_topics(settings)  # it answers Kafka requests again
    assert not EmbeddedBroker(settings).status().running  # stopped on the way out, as before


def test_a_broker_the_supervisor_did_not_start_is_left_alone(own_broker) -> None:  # type: ignore[no-untyped-def]
    """A broker from `streamlearn broker start` belongs to whoever started it: `up` uses it, and neither
    restarts it nor stops it."""
    from streaming.broker import kept_broker

    settings, broker = own_broker
    broker.start()
    with kept_broker(settings) as kept:
        assert not kept.owned
        broker.kill()
        assert kept.revive() is None
    assert not EmbeddedBroker(settings).status().running


def test_up_restarts_the_embedded_broker_it_started(tmp_path: Path) -> None:
    """The same through the command: `streamlearn up` says so on its output, and still drains and stops."""
    import json
    import signal

    settings = config.load({"home": tmp_path / "home", "broker_port": free_port()}, environ={})
    env = subprocess_env(settings, STREAMLEARN_REGISTRY_PORT=str(free_port()))
    out = tmp_path / "up.out"
    with open(out, "w") as fh:
        up = subprocess.Popen(streamlearn_cmd("up", "--only", "registry", "--no-standby"), env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Ctrl-C or SIGTERM drains" in out.read_text(), 120, 0.1, "up started")
        first = EmbeddedBroker(settings).status().pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: "started it again as pid" in out.read_text(), 90, 0.1, "up to restart the broker")
        again = json.loads((settings.broker_dir / "broker.pid").read_text())["pid"]
        assert again != first and probe(settings.bootstrap) is not None
        up.send_signal(signal.SIGTERM)
        assert up.wait(120) == 0, out.read_text()[-3000:]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(30)
        EmbeddedBroker(settings).stop()
    assert not EmbeddedBroker(settings).status().running, out.read_text()[-3000:]


def test_every_client_retries_a_broker_at_least_once_a_second(own_broker) -> None:  # type: ignore[no-untyped-def]
    """kafka-python doubled its reconnect back-off up to 30 s, its bootstrap too: a `replay` started while the
    broker was down, which came back 8 s later, made its last try at 7 s and failed at 30 s ("cannot reach the
    Kafka broker") with the broker up. Every client built with kafka_security() now retries at least once a
    second: here the broker comes back after the back-off would have grown past 10 s, and the read that was
    waiting for it answers within a few seconds."""
    import threading
    import time

    from kafka import KafkaAdminClient, KafkaProducer

    from streaming.kafka_compat import RECONNECT_BACKOFF_MAX_MS
    from streaming.kafka_security import kafka_security
    from streaming.offsets import earliest_and_end

    settings, broker = own_broker
    assert kafka_security(settings) == {}  # PLAINTEXT: no kwargs, but the defaults are set
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert client.DEFAULT_CONFIG["reconnect_backoff_max_ms"] == RECONNECT_BACKOFF_MAX_MS
    broker.start()
    ensure_topics(settings)
    broker.stop()
    answer: dict[str, object] = {}

    def read() -> None:
        try:
            answer["ends"] = earliest_and_end(settings, raw_topic(settings, "sensor"))
        except Exception as exc:  # noqa: BLE001 - reported below
            answer["error"] = exc
        answer["at"] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    threading.Event().wait(12)  # the outage: 50 ms doubling had reached a 12.8 s gap by now
    broker.start()
    back = time.monotonic()
    reader.join(60)
    assert "error" not in answer, answer.get("error")
    assert float(answer["at"]) - back < 5, f"answered {float(answer['at']) - back:.1f} s after the broker was back"
