"""Helpers of the poison suites (tests/test_poison_*.py): watched worker subprocesses and topic tails.

A poison test feeds hostile inputs to a real worker subprocess and fails when the worker exits,
wedges (no progress on good records within the deadline, at most 30 s) or exceeds its stated RSS.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastavro import schemaless_writer

from schemas.serde import frame
from streaming.config import Settings
from streaming.producer import Publisher
from tests.helpers import streamlearn_cmd, subprocess_env

T = TypeVar("T")

#: No progress on a good record for this long is a wedge (issue 12).
WEDGE_S = 30.0


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux /proc); 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


class Worker:
    """A worker subprocess started with the CLI; :meth:`check` fails if it died or grew past ``max_rss_mb``."""

    def __init__(self, settings: Settings, args: list[str], log_path: Path, max_rss_mb: float) -> None:
        self.settings = settings
        self.args = args
        self.log_path = log_path
        self.max_rss_mb = max_rss_mb
        self.peak_rss_mb = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env: dict[str, str] = {}
        self.start()

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(streamlearn_cmd(*self.args), env=subprocess_env(self.settings, **self.extra_env),
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def check(self, what: str = "") -> None:
        assert self.proc is not None
        code = self.proc.poll()
        assert code is None, f"worker {self.args} exited with {code} {what}\n{self.tail()}"
        rss = rss_mb(self.proc.pid)
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        assert rss <= self.max_rss_mb, f"worker RSS {rss:.0f} MiB > {self.max_rss_mb} MiB {what}\n{self.tail()}"

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait; returns the seconds it took (fails when it ignores SIGTERM)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker {self.args} ignored SIGTERM for {timeout} s\n{self.tail()}") from None
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Tail:
    """Reads a topic from the beginning as it grows (read_committed); items kept in :attr:`items`."""

    def __init__(self, settings: Settings, topic: str, *, decode: bool = True) -> None:
        from streaming.consumer import Subscriber

        self.sub = Subscriber(settings, topic, start="beginning", decode=decode)
        self.items: list[Any] = []

    def poll(self) -> list[Any]:
        new = self.sub.poll_batch(timeout_ms=200)
        self.items.extend(new)
        return new

    def close(self) -> None:
        self.sub.close()


def wait_progress(predicate: Callable[[], T], workers: list[Worker], what: str, timeout: float = WEDGE_S) -> T:
    """Poll ``predicate`` until truthy, checking the workers each time; fail after ``timeout`` (a wedge)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for w in workers:
            w.check(f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress for {timeout} s waiting for {what}\n"
                                 + "\n".join(w.tail() for w in workers))
        time.sleep(0.05)  # poll interval inside a deadline loop


def foreign_send(pub: Publisher, topic: str, record_name: str, record: dict[str, Any],
                 key: str | bytes | None = None) -> Any:
    """Send ``record`` as someone else's producer would: Avro-encoded by fastavro alone (none of
    streamlearn's validation, so no id bound: schemas/ids.py) and framed with the registered schema
    id, through the plain kafka-python producer under ``pub`` (no key bound: MAX_KEY_BYTES).

    Why: the SDK now refuses an over-long id or key at publish, but anyone who can produce to a topic
    can still write one; the poison suites check that the workers survive exactly that.
    Returns kafka-python's future (``pub.flush()`` waits for it too).
    """
    ser = pub.serializer(topic, record_name)
    buf = io.BytesIO()
    schemaless_writer(buf, ser.parsed, record)
    raw_key = key.encode() if isinstance(key, str) else key
    return pub.producer.send(topic, frame(ser.schema_id, buf.getvalue()), key=raw_key)
