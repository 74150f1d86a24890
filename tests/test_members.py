"""Group members of this host (streaming.members), phantom members, stuck workers, and `up`'s preflight.

Everything runs as subprocesses started the way the README shows, against the real embedded broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from streaming import members
from streaming.broker import free_port
from streaming.config import Settings
from streaming.exceptions import MemberSlotBusyError
from streaming.offsets import group_state
from streaming.topics import raw_topic
from streaming.worker import default_group
from streamlearn.stack import Service, Supervisor
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import committed, end_offsets, publish, sensor_events


def _start(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(streamlearn_cmd(*args), env=subprocess_env(settings), stdout=fh,
                                stderr=subprocess.STDOUT)


def _run(settings: Settings, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(streamlearn_cmd(*args), env=subprocess_env(settings, **env), capture_output=True,
                          text=True, timeout=timeout)


def _owned(settings: Settings, group: str) -> list[int]:
    """Partitions the group's members of this host report owning (from their status files)."""
    return sorted(p for e in members.local_entries(settings, group) if e["alive"] for p in e.get("partitions") or [])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def test_slots_are_exclusive_and_the_lowest_free_one_is_reused(settings: Settings) -> None:
    a = members.claim(settings, "g", "role")
    b = members.claim(settings, "g", "role")
    try:
        assert (a.slot, b.slot) == (0, 1) and a.instance_id != b.instance_id
        with pytest.raises(MemberSlotBusyError, match=f"pid {os.getpid()}"):
            members.claim(settings, "g", "role", slot=1)
        pinned = members.claim(settings, "g", "role", instance="mine")
        with pytest.raises(MemberSlotBusyError, match="mine"):
            members.claim(settings, "g", "role", instance="mine")
        pinned.release(leave=False)
        a.release(leave=False)
        again = members.claim(settings, "g", "role")
        assert again.slot == 0 and again.instance_id == a.instance_id  # a restart gets the same static id
        again.release(leave=False)
        assert {e["slot"]: e["alive"] for e in members.local_entries(settings, "g")} == {1: True}
    finally:
        b.release(leave=False)


def test_phantom_member_of_a_killed_worker_is_listed_and_reset_removes_it(settings: Settings, tmp_path: Path) -> None:
    group = default_group(settings, "sensor")
    publish(settings, "sensor", sensor_events(50))
    proc = _start(settings, tmp_path / "worker.log", "stream", "sensor")
    try:
        wait_until(lambda: _owned(settings, group) == [0, 1, 2], 90, 0.1, "the worker owns every partition")
        refused = _run(settings, "offsets", "reset", "--kind", "sensor", "--to-earliest")
        assert refused.returncode != 0 and f"pid {proc.pid}" in refused.stderr and "ALIVE" in refused.stderr
        proc.kill()  # kill -9: the embedded broker keeps its (static) member forever
        proc.wait(30)
        shown = _run(settings, "offsets", "show", "--kind", "sensor", "--json")
        assert shown.returncode == 0, shown.stderr
        listed = json.loads(shown.stdout)["member_list"]
        assert [(m["pid"], m["local"], m["alive"]) for m in listed] == [(proc.pid, True, False)]
        assert "DEAD" in _run(settings, "offsets", "show", "--kind", "sensor").stdout
        done = _run(settings, "offsets", "reset", "--kind", "sensor", "--to-earliest")
        assert done.returncode == 0, done.stderr
        assert group_state(settings, group) == ("Empty", 0)
    finally:
        _stop(proc)


def _blocker(settings: Settings, group: str) -> tuple[Any, threading.Event]:
    """A live member that is not of this host (kafka-python's default client id) and stops polling after
    it got the partitions: any rebalance then waits for it, as for a hung process elsewhere."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=group, enable_auto_commit=False,
                             session_timeout_ms=10_000, heartbeat_interval_ms=1_000)
    consumer.subscribe([raw_topic(settings, "sensor")])
    wait_until(lambda: consumer.poll(100) is not None and len(consumer.assignment()) == 3, 60, 0.01,
               "the blocker owns the partitions")
    return consumer, threading.Event()


def test_stuck_worker_warns_once_status_shows_it_and_idle_exit_fails(settings: Settings, tmp_path: Path) -> None:
    group = default_group(settings, "sensor")
    publish(settings, "sensor", sensor_events(30))
    blocker, _ = _blocker(settings, group)
    log = tmp_path / "stuck.log"
    proc = _start(settings, log, "stream", "sensor")
    try:
        wait_until(lambda: "has owned no partition" in log.read_text(errors="replace"), 120, 0.2,
                   "the stuck warning")
        text = log.read_text(errors="replace")
        warning = next(ln for ln in text.splitlines() if "has owned no partition" in ln)
        assert "WARNING" in warning and group in warning and "member(s)" in warning and "What to do" in warning
        status = _run(settings, "status")
        assert "WARNING" in status.stdout and "has owned no partition" in status.stdout, status.stdout
        _stop(proc)
        assert proc.returncode == 0
        started = time.monotonic()
        idle = _run(settings, "stream", "sensor", "--idle-exit", "3", timeout=180)
        took = time.monotonic() - started
        assert idle.returncode != 0, idle.stdout
        assert "owned no partition" in idle.stderr
        # the blocked rebalance also holds the coordinator's answer to the committed-offset check, which is
        # bounded now; a wedge bound, not a speed goal: before, the check alone waited kafka-python's 30 s
        assert "30 record(s) not known to be processed" in idle.stderr or "30 unprocessed record(s)" in idle.stderr
        assert took < 28, f"--idle-exit 3 took {took:.0f} s to refuse: the offset check is not bounded"
        assert text.count("has owned no partition") == 1  # one WARNING, not one per loop
    finally:
        _stop(proc)
        blocker.close()


def test_up_mints_a_gateway_token_when_none_is_set(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = subprocess_env(settings, STREAMLEARN_INGEST_PORT=str(port))
    out = tmp_path / "up.log"
    with out.open("wb") as fh:
        proc = subprocess.Popen(streamlearn_cmd("up", "--only", "gateway"), env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    token_file = settings.home / "secrets" / "ingest.token"
    try:
        wait_until(lambda: f"minted a token into {token_file}" in out.read_text(errors="replace"), 60, 0.1,
                   "the minted token's path on the console")
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        assert token not in out.read_text(errors="replace")  # the path is printed, never the token

        def accepted() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(accepted, 90, 0.2, "the gateway up")
        event = {"event_id": "up-1", "client_ip": "10.0.0.1", "timestamp": 1_700_000_000_000, "method": "GET",
                 "path": "/", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 1, "user_agent": "t",
                 "latency_ms": 1.0}
        ok = httpx.post(f"http://127.0.0.1:{port}/ingest/weblog", json=event, timeout=20,
                        headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200, ok.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    assert proc.returncode == 0, out.read_text(errors="replace")[-3000:]


def test_up_refuses_a_malformed_setting_with_one_line(settings: Settings) -> None:
    res = _run(settings, "up", "--only", "gateway", STREAMLEARN_INGEST_TOKENS="bad name:tok-123456")
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "ingest_tokens" in errors[0], res.stderr
    assert "refusing to start" in res.stderr and not (settings.home / "stack" / "state.json").exists()
    # a malformed STREAMLEARN_KEYS entry: the gateway crash-looped five times and the stack ran on empty
    res = _run(settings, "up", "--only", "gateway", STREAMLEARN_KEYS="x:short:nosuchscope")
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: keys:") and "STREAMLEARN_KEYS" in errors[0], res.stderr
    assert not (settings.home / "stack" / "state.json").exists()


def test_supervisor_says_why_and_stops_restarting_after_rapid_crashes(settings: Settings,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # `offsets show` without --kind fails at once with an error line: a worker with a bad setting
    # rapid_s: on a loaded box one CLI start can take over the default 30 s; every crash here is "rapid"
    sup = Supervisor(settings, [Service("broken", ["offsets", "show"], 0)], max_backoff=0.2, give_up_after=3,
                     rapid_s=600.0)
    with caplog.at_level("WARNING", logger="streamlearn.stack"):
        sup.start()
        try:
            wait_until(lambda: sup.status()[0]["state"] == "gave up", 120, 0.1, "the supervisor to give up")
        finally:
            sup.stop()
    assert sup.status()[0]["restarts"] == 2
    crashes = [r.getMessage() for r in caplog.records if "broken exited" in r.getMessage()]
    assert len(crashes) == 3 and all("error: offsets: give --kind" in m for m in crashes), crashes
    assert "NOT restarted" in crashes[-1]
    status = _run(settings, "status")
    assert "gave up" in status.stdout and "not restarted: crashed 3 times" in status.stdout, status.stdout


def _wait_or_show_logs(tmp_path: Path, predicate: Any, what: str) -> None:
    try:
        wait_until(predicate, 120, 0.1, what)
    except AssertionError as exc:
        logs = "\n".join(f"== {p.name}\n" + "\n".join(ln for ln in p.read_text(errors="replace").splitlines()
                                                        if "dead letter" not in ln)[-2000:]
                         for p in sorted(tmp_path.glob("w*.log")))
        raise AssertionError(f"{exc}\n{logs}") from exc


def test_scale_down_after_kill_9_the_restarted_worker_takes_every_partition(settings: Settings,
                                                                           tmp_path: Path) -> None:
    group = default_group(settings, "sensor")
    publish(settings, "sensor", sensor_events(30))
    procs = [_start(settings, tmp_path / f"w{i}.log", "stream", "sensor") for i in range(2)]
    try:
        def sharing() -> bool:  # both processes joined and own something (a slow start must not pass as one)
            entries = [e for e in members.local_entries(settings, group) if e["alive"]]
            return len(entries) == 2 and all(e.get("partitions") for e in entries) and _owned(settings, group) == [
                0, 1, 2]

        _wait_or_show_logs(tmp_path, sharing, "two workers sharing the partitions")
        for p in procs:
            p.kill()
            p.wait(30)
        # one worker back: slot 0 is its own; slot 1's dead member would keep its partitions forever on the
        # embedded broker unless the new worker removes it
        procs.append(_start(settings, tmp_path / "w2.log", "stream", "sensor"))
        _wait_or_show_logs(tmp_path, lambda: _owned(settings, group) == [0, 1, 2], "the restarted worker owns all")
        assert "removed 1 dead member(s) of this host" in (tmp_path / "w2.log").read_text(errors="replace")
    finally:
        for p in procs:
            _stop(p)


def test_a_rebalance_held_open_by_a_dead_extra_worker_is_cleared_by_the_live_ones(settings: Settings,
                                                                                  tmp_path: Path) -> None:
    """Three workers and an extra fourth (no partition) killed with -9 and not restarted (a scale-down by
    kill), then a clean stop of another: the rebalance waited on the dead member (the embedded broker
    never expires it) and the live workers, still holding their old assignment while their joins were
    parked, neither warned nor removed it. The group sat for ~5 minutes; now the live workers remove it
    after the session timeout."""
    group = default_group(settings, "sensor")
    publish(settings, "sensor", sensor_events(30))
    procs = []
    try:
        for i in range(3):
            procs.append(_start(settings, tmp_path / f"w{i}.log", "stream", "sensor"))
            _wait_or_show_logs(tmp_path, lambda n=i + 1: len(_owned(settings, group)) == 3 and len(
                [e for e in members.local_entries(settings, group) if e["alive"] and e.get("partitions")]) == n,
                f"{i + 1} worker(s) sharing the partitions")
        procs.append(_start(settings, tmp_path / "w3.log", "stream", "sensor"))
        _wait_or_show_logs(tmp_path, lambda: "assigned []" in (tmp_path / "w3.log").read_text(errors="replace"),
                           "the extra worker joined with nothing")
        procs[3].kill()
        procs[3].wait(30)
        _stop(procs[1])  # a clean leave: the rebalance starts and waits for every member, the dead one too
        publish(settings, "sensor", sensor_events(30, start=30))
        end = end_offsets(settings, "sensor")
        try:
            wait_until(lambda: committed(settings, "sensor") == end, 90, 0.5, "the live workers committing all")
        except AssertionError as exc:
            logs = "\n".join((tmp_path / f"w{i}.log").read_text(errors="replace")[-1500:] for i in (0, 2))
            raise AssertionError(f"{exc}\n{logs}") from exc
        logs = "".join((tmp_path / f"w{i}.log").read_text(errors="replace") for i in (0, 2))
        assert "Removed 1 dead member(s) of this host" in logs
    finally:
        for p in procs:
            _stop(p)


def test_a_clean_exit_leaves_the_group_even_with_a_pinned_instance_id(settings: Settings) -> None:
    group = default_group(settings, "sensor")
    publish(settings, "sensor", sensor_events(30))
    res = _run(settings, "stream", "sensor", "--instance-id", "pinned-1", "--idle-exit", "2", timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["records"] == 30
    # static members do not leave by themselves; the worker removes its own member on a clean stop
    wait_until(lambda: group_state(settings, group) == ("Empty", 0), 10, 0.1, "the group empty after a clean exit")
    assert _run(settings, "offsets", "reset", "--kind", "sensor", "--to-earliest").returncode == 0
