"""A source command stopped while its broker is down exits, and the same command sends what was not acked.

Before, `streamlearn publish sensor --file F` stopped with Ctrl-C after its broker died waited for acks
forever: no line said what it waited for, a second Ctrl-C or a SIGTERM did nothing, and only ``kill -9``
ended it. Now the first signal stops the reading and waits for the records in flight; a second one (or
``STOP_GRACE_S``) gives the wait up, exit status 3, nothing of it checkpointed. Real CLI, a private
broker killed with -9, bounded polls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

from streaming.config import Settings
from streaming.consumer import Subscriber
from streaming.topics import raw_topic
from streamlearn.commands.ingest import EXIT_NOT_ACKED, _stop_on_signals
from tests.broker_crash_helpers import Kill9Restart, crash_broker_fixture  # noqa: F401 - the fixture
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until

LINES = 60_000  # enough that the run is still sending when the broker is killed (~20,000 lines/s here)


def _write(path: Path) -> None:
    with path.open("w") as fh:
        for i in range(LINES):
            fh.write(json.dumps({"sensor_id": f"s{i % 50}", "timestamp": 1_764_547_200_000 + i, "value": float(i),
                                 "unit": "celsius"}) + "\n")


def test_a_second_signal_ends_a_stop_whose_broker_is_gone_and_the_same_command_resumes(
        crash_broker: tuple[Settings, Kill9Restart], tmp_path: Path) -> None:
    settings, kill9_restart = crash_broker
    path, err = tmp_path / "readings.jsonl", tmp_path / "stderr.txt"
    _write(path)
    cmd = streamlearn_cmd("publish", "sensor", "--file", str(path))
    env = subprocess_env(settings)
    # One consumer, ready before the run: a new one per poll took long enough for a fast run to finish
    # between two polls (seen in tests/test_publish_resume.py on CI).
    sub = Subscriber(settings, raw_topic(settings, "sensor"), start="end", decode=False)
    parts = list(sub.assignment())
    with err.open("w") as err_fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err_fh, text=True)
    try:
        try:
            wait_until(lambda: sum(sub.consumer.end_offsets(parts).values()) >= 5_000, timeout=120, interval=0.02,
                       message="records on the topic")
        finally:
            sub.close()  # before the broker is killed
        assert proc.poll() is None, "the run ended before the broker was killed; make LINES larger"
        ended: list[tuple[int, str]] = []

        def while_down() -> None:
            os.kill(proc.pid, signal.SIGINT)  # stop reading, wait for the acks...
            wait_until(lambda: "stopping: waiting for the records in flight" in err.read_text(), timeout=30,
                       message="the stop hint")
            assert proc.poll() is None  # ...which a dead broker never sends
            os.kill(proc.pid, signal.SIGINT)  # the second one gives the wait up
            out, _ = proc.communicate(timeout=30)
            ended.append((proc.returncode, out))

        kill9_restart(while_down)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    code, out = ended[0]
    stderr = err.read_text()
    assert code == EXIT_NOT_ACKED, stderr[-3000:]
    assert "not acked by the broker (not checkpointed: the same command sends them again)" in out, out
    assert "gave up waiting for" in stderr and "the broker unreachable for" in stderr, stderr[-3000:]

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    seen = Counter(r.value["timestamp"] for r in read_topic(settings, raw_topic(settings, "sensor"), timeout=120))
    assert len(seen) == LINES, f"{LINES - len(seen)} lines missing after the resume"
    assert max(seen.values()) == 1, "a line is on the topic twice"


def test_the_stop_grace_gives_the_wait_up_without_a_second_signal() -> None:
    give_up = threading.Event()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = _stop_on_signals(give_up, grace_s=0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(stop.is_set, timeout=5, message="the stop")
        assert not give_up.is_set(), "the first signal must wait for acks, not give them up"
        assert give_up.wait(10), "the grace did not give the wait up"
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_a_publisher_given_up_returns_from_flush_while_the_broker_is_gone(
        crash_broker: tuple[Settings, Kill9Restart]) -> None:
    from streaming.producer import Publisher

    settings, kill9_restart = crash_broker
    give_up = threading.Event()
    pub = Publisher(settings, give_up=give_up)
    results: list[bool] = []

    def while_down() -> None:
        for i in range(200):
            pub.publish("sensor", {"sensor_id": "s1", "timestamp": 1_764_547_200_000 + i, "value": 1.0, "unit": "C"})
        waiter = threading.Thread(target=lambda: results.append(pub.flush()))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive(), "flush returned while nothing could be acked"
        give_up.set()
        waiter.join(10)
        assert not waiter.is_alive(), "flush did not return once given up"

    try:
        kill9_restart(while_down)
    finally:
        pub.close(timeout=1.0)
    assert results == [False] and pub.abandoned > 0


def test_the_gateway_stops_within_its_grace_while_the_broker_is_gone(
        crash_broker: tuple[Settings, Kill9Restart], tmp_path: Path) -> None:
    """Before, SIGTERM to `ingest serve` with its broker down took 86 s (a 60 s settle, then a traceback and
    "Application shutdown failed"), past the 20 s `streamlearn up` allows before SIGKILL."""
    import time

    import httpx

    from streaming.broker import free_port
    from streaming.producer import STOP_GRACE_S

    settings, kill9_restart = crash_broker
    token, port = "tok-stop_0123456789", free_port()
    env = subprocess_env(settings.with_(ingest_tokens=f"stop:{token}", ingest_port=port))
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    event = {"sensor_id": "s1", "timestamp": 1_764_547_200_000, "value": 1.0, "unit": "C"}
    log = tmp_path / "gateway.log"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def post_quietly() -> None:
        try:
            httpx.post(f"{url}/ingest/sensor", json={**event, "value": 2.0}, headers=auth, timeout=60)
        except httpx.HTTPError:
            pass

    with log.open("w") as log_fh:
        proc = subprocess.Popen(streamlearn_cmd("ingest", "serve"), env=env, stdout=log_fh, stderr=subprocess.STDOUT)
    took: list[float] = []
    try:
        wait_until(healthy, 90, message="gateway healthy")
        assert httpx.post(f"{url}/ingest/sensor", json=event, headers=auth, timeout=30).status_code == 200

        def while_down() -> None:
            posting = threading.Thread(target=post_quietly, daemon=True)
            posting.start()  # an event in flight that no broker will ack
            wait_until(lambda: "broker connection lost" in log.read_text() or not posting.is_alive(), 30,
                       message="the gateway to notice the broker is gone")
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=STOP_GRACE_S + 30)
            took.append(time.monotonic() - began)

        kill9_restart(while_down)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert took and took[0] < STOP_GRACE_S + 10, f"the stop took {took} s"
    assert "Application shutdown failed" not in out, out[-3000:]
    # what it left, said: events in flight (their clients retry) or acked ones the ledger could not confirm
    assert "not acked by the broker after" in out or "not yet confirmed kept by the broker" in out, out[-3000:]

