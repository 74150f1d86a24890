"""The supervisor: crashed workers restart with backoff and are counted; stop drains group by group."""

from __future__ import annotations

from streaming.config import Settings
from streamlearn.stack import CORE, INTAKE, STREAM, Service, Supervisor, read_state
from tests.helpers import wait_until


def test_crashed_worker_restarts_with_backoff_and_is_counted(settings: Settings) -> None:
    # `topics describe` exits at once: to the supervisor that is a worker that keeps dying
    sup = Supervisor(settings, [Service("flaky", ["topics", "describe", "nope"], CORE)], max_backoff=1.0)
    sup.start()
    try:
        wait_until(lambda: sup.status()[0]["restarts"] >= 3, 60, 0.1, "three restarts")
    finally:
        sup.stop()
    restarts = [e for e in sup.events if e["event"] == "restart"]
    delays = [e["delay_s"] for e in restarts]
    assert delays[:3] == [0.5, 1.0, 1.0], "exponential backoff, capped"
    assert all(e["exit_code"] == 1 for e in restarts)  # a named topic that does not exist: exit 1
    state = read_state(settings)
    assert state is not None and state["stopped"] and state["services"][0]["restarts"] >= 3


def test_stop_drains_intake_before_stream_workers(settings: Settings) -> None:
    topic = "weblog.raw"
    long_running = ["subscribe", topic, "--idle-timeout", "600"]
    sup = Supervisor(settings, [Service("stream", long_running, STREAM), Service("intake", long_running, INTAKE)])
    sup.start()
    wait_until(lambda: all(s["state"] == "running" for s in sup.status()), 30, 0.1, "both running")
    codes = sup.stop(timeout_per_group=30)
    stopped = [e["service"] for e in sup.events if e["event"] == "stopped"]
    assert stopped == ["intake", "stream"]
    assert set(codes) == {"intake", "stream"} and all(c is not None for c in codes.values())
