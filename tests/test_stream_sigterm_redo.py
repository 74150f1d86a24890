"""SIGTERM while a stream worker is redoing a refused batch (issue 12, item 0).

A batch the store refuses (here: the kind's directory is a regular file, which refuses root too) is
held, the partitions are paused, and the batch is redone with a growing backoff ("backpressure
persists" in the log). A SIGTERM that lands in that redo loop must end the process promptly (a
generous deadline, no timed assertion), commit nothing the store did not take, and a restart with
the same command must store every record, dead letters included, exactly once.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from streaming.config import Settings
from streaming.producer import Publisher
from streaming.store import FeatureStore
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import committed, end_offsets, sensor_events, stored_offsets, topic_offsets

#: Generous bound for a SIGTERM to end the process (a wedge, not a speed goal).
STOP_DEADLINE_S = 60.0
#: The retry wait the SIGTERM must land in: long enough that an unwoken sleep would show.
LONG_WAIT_S = 3.2
_RETRY_RE = re.compile(r"backpressure persists: .*; retrying in ([0-9.]+) s")


def _longest_wait(text: str) -> float:
    """The longest retry wait logged so far. Why not count the lines: repeated warnings are rate-limited
    (streaming/logs.py), so the fourth line came ~50 s after the fourth redo."""
    return max((float(w) for w in _RETRY_RE.findall(text)), default=0.0)


def _start(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(streamlearn_cmd("stream", "sensor", "--instance-id", "redo-worker"),
                                env=subprocess_env(settings, STREAMLEARN_LOG_LEVEL="INFO"),
                                stdout=subprocess.DEVNULL, stderr=log)


def _log(log_path: Path) -> str:
    return log_path.read_text(errors="replace") if log_path.exists() else ""


@pytest.mark.timeout(300)
def test_sigterm_during_refused_batch_redo_exits_promptly_and_restart_is_exactly_once(
        settings: Settings, tmp_path: Path) -> None:
    s = settings.with_(batch_max_records=40, batch_max_seconds=0.2)
    log_path = tmp_path / "worker.log"
    store = FeatureStore(s.feature_store)
    topic = raw_topic(s, "sensor")
    pub = Publisher(s)
    proc = _start(s, log_path)
    try:
        # 1. a first round is stored and committed normally
        for r in sensor_events(60):
            pub.publish("sensor", r)
        pub.flush(30)
        first = topic_offsets(s, topic)
        wait_until(lambda: set(stored_offsets(s, "sensor")) >= first or proc.poll() is not None, 60,
                   message="first round stored")
        assert proc.poll() is None, _log(log_path)[-3000:]
        wait_until(lambda: committed(s, "sensor") == end_offsets(s, "sensor"), 30, message="first round committed")
        committed_before = committed(s, "sensor")

        # 2. the store refuses every write; a second round (with one undecodable record, so the held batch
        #    carries a dead letter) is redone again and again
        kind_dir = store.directory("sensor")
        kind_dir.rename(tmp_path / "sensor-aside")
        kind_dir.write_text("in the way")
        for r in sensor_events(90, start=60):
            pub.publish("sensor", r)
        pub.producer.send(topic, key=b"poison", value=b"\x00\x00\x00\x00\x01not avro", partition=0).get(timeout=30)
        pub.flush(30)
        wait_until(lambda: _longest_wait(_log(log_path)) >= LONG_WAIT_S or proc.poll() is not None, 90,
                   message="the worker redoing the refused batch")
        assert proc.poll() is None, _log(log_path)[-3000:]

        # 3. SIGTERM in the redo loop: the process ends within the deadline, cleanly
        redos = _log(log_path).count("backpressure persists")
        assert redos >= 2, _log(log_path)[-3000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"worker ignored SIGTERM during the redo for {STOP_DEADLINE_S} s\n"
                                 f"{_log(log_path)[-3000:]}") from None
        stop_s = time.monotonic() - t0
        assert code == 0, _log(log_path)[-3000:]
        # nothing committed beyond what the store holds: the group's offsets did not move
        assert committed(s, "sensor") == committed_before
        assert kind_dir.is_file(), "the refused store changed under the test"

        # 4. the store takes writes again; the same command processes everything exactly once
        kind_dir.unlink()
        (tmp_path / "sensor-aside").rename(kind_dir)
        assert set(stored_offsets(s, "sensor")) == first, "the refused batch was stored after all"
        proc = _start(s, log_path)
        expected = topic_offsets(s, topic)
        assert len(expected) == 60 + 90 + 1
        wait_until(lambda: set(stored_offsets(s, "sensor")) >= expected or proc.poll() is not None, 90,
                   message="everything stored after the restart")
        assert proc.poll() is None, _log(log_path)[-3000:]
        wait_until(lambda: committed(s, "sensor") == end_offsets(s, "sensor"), 30, message="final commit")
        got = stored_offsets(s, "sensor")
        assert len(got) == len(set(got)), "an offset stored twice"
        assert set(got) == expected
        dls = read_topic(s, dead_letter_topic(s, "sensor"), decode=False)
        assert [d.key for d in dls] == [b"poison"], "the refused batch's dead letter must be kept exactly once"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_DEADLINE_S) == 0
        print(json.dumps({"redos_before_sigterm": redos, "sigterm_exit_s": round(stop_s, 2),
                          "records": len(expected)}))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        pub.close()
