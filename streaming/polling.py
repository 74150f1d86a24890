"""One bounded-polling helper for code and tests: ``poll_until(predicate, timeout_s)``.

Why: the project waits on things that give no notification (a broker starting to answer, a topic
becoming visible in metadata, uvicorn flipping ``server.started``). Each of those used to carry its
own "sleep inside a deadline loop"; one helper keeps the deadline arithmetic right (the predicate is
always tried once more at the deadline, the last sleep never overshoots it) and makes the remaining
sleeps easy to find. Callers raise their own error with their own context when it times out.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(predicate: Callable[[], T], timeout_s: float, *, interval_s: float = 0.05,
               stop: threading.Event | None = None) -> T:
    """Call ``predicate`` until it returns a truthy value or ``timeout_s`` seconds pass.

    Returns the first truthy value, or the last (falsy) value once the deadline passed or ``stop``
    was set; the caller decides what a timeout means. An exception from ``predicate`` propagates at
    once (use it to abort early, e.g. when the process being waited for died). ``stop``, when
    given, is waited on instead of sleeping so a shutdown interrupts the wait. ``interval_s=0`` is
    for predicates that block by themselves (a Kafka ``poll`` with a timeout): no sleep between calls.
    """
    if interval_s < 0:
        raise ValueError(f"interval_s must be >= 0, got {interval_s}")
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        left = end - time.monotonic()
        if left <= 0:
            return value
        pause = min(interval_s, left)
        if pause == 0:
            if stop is not None and stop.is_set():
                return value
            continue
        if stop is not None:
            if stop.wait(pause):
                return value
        else:
            time.sleep(pause)  # the one poll interval inside a deadline loop
