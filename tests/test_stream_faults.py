"""Fault injection: kill -9 the worker process 10 times at random points while events arrive.

At the end the union of the batches holds every offset of the topic exactly once, every visible
``.avro`` is complete (its sha256 matches its manifest, its row count too), and the features
equal an uninterrupted run's (the window state checkpointed with each batch was restored).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streaming.config import Settings
from streaming.features import get_featurizer
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.store import FeatureStore, read_batch
from streaming.topics import raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import committed, end_offsets, sensor_events, stored_offsets

N_EVENTS = 2000
KILLS = 10
SEED = 20240611


def _log_path(settings: Settings) -> Path:
    return settings.home / "worker.log"


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    # Static membership: the restarted process takes the partitions back at once instead of
    # waiting for the killed member's session to time out. Logs go to a file (a pipe nobody reads
    # until the end could fill up and block the worker).
    _log_path(settings).parent.mkdir(parents=True, exist_ok=True)
    with open(_log_path(settings), "ab") as log:
        return subprocess.Popen(
            streamlearn_cmd("stream", "sensor", "--instance-id", "fault-worker"),
            env=subprocess_env(settings, STREAMLEARN_LOG_LEVEL="INFO"), stdout=subprocess.DEVNULL, stderr=log)


KILL_POINTS = ("start", "mid-write", "first-new-batch", "second-new-batch")


def _wait_for_kill_point(point: str, store: FeatureStore, before: int, proc: subprocess.Popen[bytes]) -> str:
    """Poll (no sleeps) until the worker reaches ``point``; returns the point reached.

    A transient state the poll misses within its bound (a temp file lives for milliseconds) falls
    back to the next observable one: a new batch. The kill then still lands inside a batch cycle.
    """
    def batches_beyond(n: int) -> bool:
        return len(store.batch_ids("sensor")) >= before + n or proc.poll() is not None

    def temp_file() -> bool:
        d = store.directory("sensor")
        return proc.poll() is not None or (d.is_dir() and any(n.endswith(".tmp") for n in os.listdir(d)))

    if point == "start":
        return point
    if point == "mid-write" and poll_until(temp_file, 20, interval_s=0.001):
        return point
    wanted = 2 if point == "second-new-batch" else 1
    wait_until(lambda: batches_beyond(wanted), 60, interval=0.005, message=f"worker progress ({point})")
    return point


@pytest.mark.slow
def test_kill_9_at_random_points_loses_and_duplicates_nothing(settings: Settings) -> None:
    s = settings.with_(batch_max_records=60, batch_max_seconds=0.25)
    rng = random.Random(SEED)
    events = sensor_events(N_EVENTS, sensors=23)
    per_round = N_EVENTS // KILLS
    pub = Publisher(s)

    def publish_round(k: int) -> None:  # events arrive while the worker runs and gets killed
        for r in events[k * per_round:(k + 1) * per_round]:
            pub.publish("sensor", r)
        pub.flush()

    store = FeatureStore(s.feature_store)
    kills = 0
    stderr_tail = b""
    proc = None
    try:
        while kills < KILLS:
            proc = _start_worker(s)
            before = len(store.batch_ids("sensor"))
            feeder = threading.Thread(target=publish_round, args=(kills,), daemon=True)
            feeder.start()
            # The kill point is a state of the worker, drawn per round, not a random delay: right
            # after the start (joining, restoring), while a batch's temp files exist (mid-write), or
            # right after the first or second new batch appeared (between rename and commit).
            _wait_for_kill_point(rng.choice(KILL_POINTS), store, before, proc)
            assert proc.poll() is None, _log_path(s).read_text(errors="replace")[-3000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            feeder.join(60)
        pub.close()
        proc = _start_worker(s)
        topic = raw_topic(s, "sensor")
        expected = {(it.partition, it.offset) for it in read_topic(s, topic, decode=False)}
        assert len(expected) == N_EVENTS
        try:
            wait_until(lambda: set(stored_offsets(s, "sensor")) >= expected, 90, message="everything persisted")
            wait_until(lambda: committed(s, "sensor") == end_offsets(s, "sensor"), 30, message="final commit")
        except AssertionError as exc:
            proc.kill()
            proc.wait(10)
            err = _log_path(s).read_text(errors="replace")[-4000:]
            missing = sorted(expected - set(stored_offsets(s, "sensor")))[:20]
            raise AssertionError(f"{exc}; missing {missing}; worker stderr:\n{err}") from exc
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if _log_path(s).exists():
            stderr_tail = _log_path(s).read_bytes()[-3000:]
    got = stored_offsets(s, "sensor")
    assert len(got) - len(set(got)) == 0, "duplicates in the store"
    assert set(got) == expected, stderr_tail.decode(errors="replace")
    directory = store.directory("sensor")
    for name in os.listdir(directory):
        assert name.endswith((".avro", ".json")) or (name.startswith(".") and name.endswith(".tmp")), name
    for b in store.batches("sensor"):
        store.verify(b)  # a visible .avro is always complete
        assert len(read_batch(b.path)["offset"]) == b.manifest["record_count"]
    # features equal one uninterrupted pass per partition (state restored at every restart)
    fz = get_featurizer("sensor")
    states: dict[int, Any] = {}
    reference = {}
    for item in sorted(read_topic(s, topic), key=lambda r: (r.partition, r.offset)):
        reference[(item.partition, item.offset)] = fz.featurize(item.value, states.setdefault(
            item.partition, fz.new_state())).x
    for b in store.batches("sensor"):
        arrays = read_batch(b.path)
        for x, p, o in zip(arrays["x"], arrays["partition"], arrays["offset"], strict=True):
            np.testing.assert_array_equal(x, reference[(int(p), int(o))])
