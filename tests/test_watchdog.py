"""The liveness watchdog (streaming/watchdog.py): a stalled loop ends its process; waits on the broker do not.

The ending cases run in child processes, since the watchdog ends the process it lives in (and
faulthandler's timer is process-wide). The last test runs `streamlearn stream` with the watchdog on and
a short limit, to show that a working worker's loop keeps it quiet through join, batches and idle.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest

from streaming.config import Settings
from streaming.watchdog import EXIT_STALLED, Watchdog
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until

PRELUDE = """
import logging, re, sys, threading, time
logging.basicConfig(level=logging.INFO)
from streaming import watchdog
watchdog.HARD_MARGIN_S = 0.5
wd = watchdog.Watchdog(0.5, "test", hard=True).start()
"""


def _child(body: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_a_loop_that_stops_coming_round_ends_the_process_with_its_stack() -> None:
    done = _child("""
        def blocked_here():
            threading.Event().wait()  # a call that never returns (releases the GIL)
        for _ in range(10):
            wd.beat(); time.sleep(0.05)
        blocked_here()
    """)
    assert done.returncode == EXIT_STALLED, done.stderr[-2000:]
    assert "has not come round" in done.stderr and "STREAMLEARN_WATCHDOG_S" in done.stderr
    assert "blocked_here" in done.stderr  # every thread's stack: where it hung


def test_waiting_on_the_broker_is_not_a_stall_and_beats_keep_it_quiet() -> None:
    done = _child("""
        with wd.waiting("kafka transaction"):
            time.sleep(2.0)  # four times the limit
        for _ in range(30):  # 1.5 s of a loop that comes round
            wd.beat(); time.sleep(0.05)
        wd.stop()
        time.sleep(2.0)  # stopped: neither the thread nor faulthandler's timer fires
        print("still here")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "still here" in done.stdout
    assert "has not come round" not in done.stderr


def test_a_loop_holding_the_gil_is_ended_by_the_c_timer() -> None:
    """The watchdog's own thread cannot run while the loop holds the GIL (the regex engine never releases
    it), so faulthandler's timer, armed at 2 x 0.5 + 0.5 s, dumps the stacks and exits (status 1)."""
    done = _child("""
        wd.beat()
        re.match(r"(a+)+$", "a" * 40 + "b")  # catastrophic backtracking: minutes, GIL held throughout
    """)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Timeout" in done.stderr and "<module>" in done.stderr


def test_on_stall_is_called_once_per_stall_and_not_after_stop() -> None:
    stalls: list[float] = []
    called = threading.Event()

    def on_stall(what: str, age: float, limit: float) -> None:
        assert what == "unit" and limit == 0.2
        stalls.append(age)
        called.set()

    wd = Watchdog(0.2, "unit", on_stall=on_stall).start()
    try:
        assert called.wait(5), "no stall reported"
        assert stalls[0] > 0.2
    finally:
        wd.stop()
    n = len(stalls)
    assert not called.wait(0) or len(stalls) == n  # nothing more after stop
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Watchdog(0, "unit")


def test_stream_worker_with_a_short_watchdog_works_and_exits_cleanly(settings: Settings, tmp_path: Any) -> None:
    """`streamlearn stream sensor` with STREAMLEARN_WATCHDOG_S=5: group join, batches, idle back-off and the
    drain all come round in time, so the run ends with --idle-exit (status 0), not the watchdog's 70."""
    from streaming.producer import Publisher
    from streaming.store import FeatureStore
    from streamlearn.commands.publish import generated

    with Publisher(settings) as pub:
        for record in generated("sensor", 600, seed=5):
            pub.publish("sensor", record)
        pub.flush()
    log = tmp_path / "stream.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(streamlearn_cmd("stream", "sensor", "--idle-exit", "3"),
                                env=subprocess_env(settings, STREAMLEARN_WATCHDOG_S="5"), stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is not None, timeout=120, message="stream worker to exit")
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "watchdog: this process exits if its stream sensor loop stalls for 5 s" in text
    assert "has not come round" not in text
    covered = sum(r["last_offset"] - r["first_offset"] + 1
                  for b in FeatureStore(settings.feature_store).batches("sensor") for r in b.manifest["ranges"])
    assert covered == 600  # every record in a durable batch before the clean exit
