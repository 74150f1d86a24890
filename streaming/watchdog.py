"""Liveness watchdog: a worker whose loop stops coming round ends its own process, so it is replaced.

Why: nothing outside a worker process can tell "busy" from "hung" cheaply. The health checks of
`docker-compose.yml` and `streamlearn up` ask the /metrics server, which runs in a thread of its own
and keeps answering while the worker's loop is wedged (a deadlock, a call that never returns, a
stuck disk). A hung *active* serving process also keeps its member lock, so its warm standby never
takes over (docs/STANDBY.md). The loop itself knows when it last came round, so it is the loop that
reports progress (:meth:`Watchdog.beat`), and a thread of the watchdog ends the process when the
beats stop for ``timeout_s``: first every thread's stack on stderr (the diagnosis), then
``os._exit(EXIT_STALLED)``. The supervisor (``up``, Docker's ``restart: unless-stopped``) restarts
it, or the standby takes the freed lock; ending a process this way is a ``kill -9``, which every
worker already survives without losing or duplicating an effect (docs/RECOVERY.md).

Waiting for the broker is not a hang: a worker that waits out a broker outage comes back by itself
when the broker does, and a restart would only wait again. Calls that block until the broker
answers (a Kafka transaction's commit, whose kafka-python wait has no timeout) run inside
:meth:`Watchdog.waiting`, which the watchdog does not time.

A loop stuck while *holding the GIL* (a C extension that never releases it) stops the watchdog's
own thread too, so the thread also keeps :func:`faulthandler.dump_traceback_later` armed, at twice
the timeout plus a margin: that timer runs in C, dumps the stacks and exits without the GIL. It is
process-global, which is why only a worker's command line turns the watchdog on (``hard=True``),
never a worker built inside another program or a test.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from streaming import metrics

log = logging.getLogger(__name__)

#: Exit status of a process the watchdog ended (EX_SOFTWARE); faulthandler's own timer exits with 1.
EXIT_STALLED = 70
#: The C timer behind the Python one: twice the timeout plus this margin (seconds).
HARD_MARGIN_S = 5.0


def _stalled(what: str, age_s: float, timeout_s: float) -> None:
    """Default action: say why, dump every thread's stack, end the process at once."""
    log.critical("watchdog: the %s loop has not come round for %.0f s (limit %g s, STREAMLEARN_WATCHDOG_S); "
                 "dumping every thread's stack to stderr and exiting with code %d so that it is restarted "
                 "(or its standby takes over)", what, age_s, timeout_s, EXIT_STALLED)
    with contextlib.suppress(Exception):
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
    os._exit(EXIT_STALLED)


class Watchdog:
    """Ends the process (``on_stall``) when :meth:`beat` is not called for ``timeout_s`` seconds.

    ``beat()`` is one attribute write, cheap enough for every loop iteration. Time spent inside
    :meth:`waiting` is not counted. ``hard`` also arms faulthandler's C timer (see the module
    docstring); ``on_stall(what, age_s, timeout_s)`` replaces the default exit (tests).
    """

    def __init__(self, timeout_s: float, what: str, *, hard: bool = False,
                 on_stall: Callable[[str, float, float], None] | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout_s must be > 0 (got {timeout_s!r}); 0 in the settings means "
                             "no watchdog, so do not build one")
        self.timeout_s = float(timeout_s)
        self.what = what
        self.hard = hard
        self.on_stall = on_stall or _stalled
        self._last = time.monotonic()
        self._waiting = 0  # nesting depth of waiting(); the beats' clock is held while > 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gauge = metrics.LOOP_BEAT_AGE.labels(what)

    def start(self) -> Watchdog:
        """Start watching (the first beat is now). Idempotent."""
        self._last = time.monotonic()
        if self.hard:  # armed here too: the loop may take the GIL before the thread ever runs
            faulthandler.dump_traceback_later(2 * self.timeout_s + HARD_MARGIN_S, exit=True)
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name=f"watchdog-{self.what}", daemon=True)
            self._thread.start()
            log.info("watchdog: this process exits if its %s loop stalls for %g s (STREAMLEARN_WATCHDOG_S; "
                     "0 turns it off)", self.what, self.timeout_s)
        return self

    def beat(self) -> None:
        """The loop came round."""
        self._last = time.monotonic()

    @contextlib.contextmanager
    def waiting(self, why: str) -> Iterator[None]:
        """A call that may block until the broker answers: not timed; the clock restarts after it."""
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1
            self._last = time.monotonic()

    def stop(self) -> None:
        """Stop watching (a clean stop: the loop ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.hard:
            faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(period):
            if self.hard:  # re-armed from here: it fires only if this thread stops running too
                faulthandler.dump_traceback_later(2 * self.timeout_s + HARD_MARGIN_S, exit=True)
            if self._waiting:
                self._last = time.monotonic()
                self._gauge.set(0)
                continue
            age = time.monotonic() - self._last
            self._gauge.set(age)
            if age > self.timeout_s:
                self.on_stall(self.what, age, self.timeout_s)
                self._last = time.monotonic()  # a callback that returns (tests) is not called again at once


def untimed(watchdog: Watchdog | None, why: str) -> contextlib.AbstractContextManager[None]:
    """``watchdog.waiting(why)``, or nothing when the worker runs without a watchdog."""
    return watchdog.waiting(why) if watchdog is not None else contextlib.nullcontext()


def from_settings(timeout_s: float, what: str) -> Watchdog | None:
    """The watchdog of a worker's command line (``hard``; main thread only), or None when turned off."""
    if timeout_s <= 0 or threading.current_thread() is not threading.main_thread():
        return None
    return Watchdog(timeout_s, what, hard=True)
