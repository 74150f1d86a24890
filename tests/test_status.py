"""`streamlearn status`: alive/dead from the pid now, never a frozen uptime; partitions and lag from Kafka."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from streaming import config
from streaming.consumer import Subscriber
from streaming.producer import Publisher
from streaming.topics import raw_topic
from streamlearn.cli import main
from streamlearn.status import render, worker_rows
from tests.test_sdk_kafka import sensor


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _state(services: list[dict]) -> dict:
    return {"supervisor_pid": _dead_pid(), "stopped": False, "updated": time.time() - 300, "services": services}


def test_workers_of_a_dead_supervisor_are_not_shown_up(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = config.load({"home": tmp_path})
    svc = {"name": "stream-weblog", "state": "running", "pid": _dead_pid(), "restarts": 2, "uptime_s": 199.9,
           "metrics_port": 9100}
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "state.json").write_text(json.dumps(_state([svc])))
    assert main(["--home", str(tmp_path), "--bootstrap", "127.0.0.1:1", "status"]) == 3
    out = capsys.readouterr().out
    assert "not running" in out and "199.9" not in out and "up 199" not in out
    [row] = worker_rows(settings, _state([svc]), supervisor_alive=False, kafka=False)
    assert row.state == "dead" and row.uptime_s is None and row.restarts == 2


def test_an_orphaned_live_worker_is_alive_with_a_real_uptime(tmp_path) -> None:
    settings = config.load({"home": tmp_path})
    svc = {"name": "train-digits_cnn", "state": "running", "pid": os.getpid(), "restarts": 0,
           "started_unix_s": time.time() - 42}
    [row] = worker_rows(settings, _state([svc]), supervisor_alive=False, kafka=False)
    assert row.state.startswith("alive (orphan")
    assert row.uptime_s is not None and 41 <= row.uptime_s < 100
    assert row.model_version == "none yet"
    assert "train-digits_cnn" in "\n".join(render([row]))


def test_partitions_owned_and_lag_come_from_the_group(settings: config.Settings) -> None:
    with Publisher(settings) as pub:
        for i in range(5):
            pub.publish("sensor", sensor(i))
    group = settings.group("stream.sensor")
    svc = {"name": "stream-sensor", "state": "running", "pid": os.getpid(), "restarts": 0,
           "started_unix_s": time.time()}
    with Subscriber(settings, raw_topic(settings, "sensor"), group=group) as sub:
        deadline = time.monotonic() + 30
        while not sub.assignment() and time.monotonic() < deadline:
            sub.poll_batch(300)
        [row] = worker_rows(settings, _state([svc]), supervisor_alive=True)
        ends = sub.consumer.end_offsets(list(sub.assignment()))
    assert row.partitions == ",".join(str(p) for p in range(settings.partitions))
    assert int(row.lag) == sum(ends.values()) >= 5  # nothing committed: lag is the end offsets (markers too)


def test_a_replica_of_up_workers_shows_its_own_partitions(tmp_path) -> None:
    """`up --workers stream.sensor=2`: `stream-sensor-2` was looked up as a group "sensor-2" (no partitions,
    no lag), and the first replica showed the whole group's partitions. Each row now shows what its own
    process owns (its member file)."""
    from streaming import members

    settings = config.load({"home": tmp_path, "metrics_port": -1})
    lease = members.claim(settings, settings.group("stream.sensor"), "stream-sensor")
    try:
        lease.set_status(partitions=[2])
        svc = {"name": "stream-sensor-2", "state": "running", "pid": os.getpid(), "restarts": 0,
               "started_unix_s": time.time()}
        [row] = worker_rows(settings, _state([svc]), supervisor_alive=True, kafka=False)
    finally:
        lease.release(leave=False)
    assert row.partitions == "2"


def test_a_dead_members_partitions_are_shown_as_the_last_it_held(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A killed pinned member was listed as holding [0, 1, 2] while another member owned them."""
    from streamlearn.commands.up import _print_members

    settings = config.load({"home": tmp_path})
    d = tmp_path / "members" / "stream.sensor"
    d.mkdir(parents=True)
    (d / "id-pinA.json").write_text(json.dumps({"role": "stream-sensor", "pid": _dead_pid(), "instance_id": "pinA",
                                                "partitions": [0, 1, 2]}))
    _print_members(settings)
    out = capsys.readouterr().out
    assert "DEAD" in out and "last held partitions [0, 1, 2]" in out
