"""Test helpers: bounded polling instead of sleeps, subprocess environments, topic reads."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from streaming.config import Settings, to_env
from streaming.polling import poll_until

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
APACHE_LOGS = SHARED / "data" / "weblogs" / "apache_logs"


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass (then fail)."""
    value = poll_until(predicate, timeout, interval_s=interval)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting for {message}")
    return value


def subprocess_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess that sees exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
    env.update(to_env(settings))
    env["PYTHONUNBUFFERED"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.update(extra)
    return env


def printed_records(out: Path) -> list[dict[str, Any]]:
    """The records a `streamlearn subscribe --json` wrote to ``out`` so far (other lines, and a line
    still being written, are skipped)."""
    import json

    rows = []
    for line in out.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "offset" in rec:
            rows.append(rec)
    return rows


def streamlearn_cmd(*args: str) -> list[str]:
    """Command line that runs the CLI with this interpreter (works without the console script)."""
    return [sys.executable, "-m", "streamlearn.cli", *args]


def read_topic(settings: Settings, topic: str, *, decode: bool = True, idle_timeout: float = 3.0,
               expect: int | None = None, timeout: float = 30.0, **kwargs: Any) -> list[Any]:
    """Read a topic from the beginning to its current end offsets (read_committed); return the items.

    The read always goes on to the end offsets, so a "published exactly once" check sees a duplicate
    that follows the first record. ``expect``: records are still arriving; keep reading until at
    least that many came (then on to the end), or until ``timeout``. ``idle_timeout``: once no
    record arrived for this long (and ``expect``, if given, is met), stop even if the position never
    reached the end offsets (a transaction left open by a killed producer holds read_committed back).
    """
    from streaming.consumer import Subscriber

    items: list[Any] = []
    deadline = time.monotonic() + timeout
    last_record = time.monotonic()
    with Subscriber(settings, topic, start="beginning", decode=decode, **kwargs) as sub:
        while time.monotonic() < deadline:
            batch = sub.poll_batch(timeout_ms=300)
            items.extend(batch)
            if batch:
                last_record = time.monotonic()
            enough = expect is None or len(items) >= expect
            if not enough:
                continue
            ends = sub.consumer.end_offsets(list(sub.assignment()))
            if all(sub.consumer.position(tp) >= end for tp, end in ends.items()):
                break
            if time.monotonic() - last_record >= idle_timeout:
                break
    return items
