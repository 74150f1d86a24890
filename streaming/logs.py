"""Log hygiene for every streamlearn process: aggregated repeats, quiet third parties.

Why: one cause repeated per record floods a terminal (the demo once printed 943 copies of "gateway
not reachable yet" in 7 s; a back-dated sensor generator 29,800 "late reading" lines) and hides
everything else. :class:`AggregatingHandler` lets the first line of a reason through and then, per
``interval_s``, one line with the count of repeats. A "reason" is the logger, the level and the
message with its numbers blanked, so "late reading for sensor 's-3' at 1700000000" and "... 's-7' at
1700000100" count as one reason. TensorFlow's C++ and absl start-up lines are silenced unless the
user asked for ``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from typing import IO

_DIGITS = re.compile(r"\d+(\.\d+)?")
NOISY_LIBRARIES = {"kafka": logging.ERROR, "httpx": logging.WARNING, "httpcore": logging.WARNING,
                   "tensorflow": logging.ERROR, "absl": logging.ERROR, "h5py": logging.WARNING,
                   "matplotlib": logging.WARNING, "PIL": logging.WARNING}
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: C0 and C1 control characters (tab excepted) as ``\\xNN``. Messages quote input (file names, rejected
#: values, a dead letter's reason): an escape sequence in one reached the operator's terminal as one
#: (retitle it, clear the screen, hide text), and a newline forged a log line of its own.
CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}


class SafeFormatter(logging.Formatter):
    """The log format with control characters in the message escaped (:data:`CONTROL_ESCAPES`); a
    traceback, appended after the message, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's API
        return super().formatMessage(record).translate(CONTROL_ESCAPES)


def reason_of(record: logging.LogRecord) -> tuple[str, int, str]:
    """The key under which repeats are counted: logger, level and the message without its numbers."""
    try:
        text = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is its own reason
        text = str(record.msg)
    return record.name, record.levelno, _DIGITS.sub("#", text)[:300]


class AggregatingHandler(logging.Handler):
    """Forwards records to ``target``; repeats (WARNING and above) of one reason are counted.

    The first record of a reason goes through at once. Further ones within ``interval_s`` are
    counted, not printed; the next record of that reason after the interval (or any record, or
    :meth:`flush` at exit, once the interval passed) prints "... (repeated N times in the last
    S s)". INFO and DEBUG pass unchanged: they are the caller's choice of verbosity.
    """

    def __init__(self, target: logging.Handler, interval_s: float = 10.0, min_level: int = logging.WARNING,
                 clock: object = None) -> None:
        super().__init__(level=target.level)
        self.target, self.interval_s, self.min_level = target, interval_s, min_level
        self._clock = clock or time.monotonic
        self._state: dict[tuple[str, int, str], tuple[float, int, logging.LogRecord]] = {}
        self._guard = threading.Lock()

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self.min_level:
            self._flush_due()
            self.target.handle(record)
            return
        key = reason_of(record)
        now = self._now()
        with self._guard:
            state = self._state.get(key)
            if state is not None and now - state[0] < self.interval_s:
                self._state[key] = (state[0], state[1] + 1, record)
                return
            repeats = state[1] if state is not None else 0
            self._state[key] = (now, 0, record)
        self._flush_due(skip=key)
        if repeats:
            record = _with_suffix(record, repeats, now - state[0] if state else 0.0)
        self.target.handle(record)

    def _flush_due(self, skip: tuple[str, int, str] | None = None, force: bool = False) -> None:
        now = self._now()
        due: list[logging.LogRecord] = []
        with self._guard:
            for key, (since, count, last) in list(self._state.items()):
                if key == skip or count == 0 or (not force and now - since < self.interval_s):
                    continue
                self._state[key] = (now, 0, last)
                due.append(_with_suffix(last, count, now - since, summary=True))
        for rec in due:
            self.target.handle(rec)

    def flush(self) -> None:
        self._flush_due(force=True)
        with contextlib.suppress(ValueError, OSError):  # a stream closed under us (exit, test capture)
            self.target.flush()

    def close(self) -> None:
        self.flush()
        self.target.close()
        super().close()

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's API
        super().setFormatter(fmt)
        self.target.setFormatter(fmt)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (tests swap it; rich redirects it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def _with_suffix(record: logging.LogRecord, count: int, seconds: float, summary: bool = False) -> logging.LogRecord:
    rec = logging.makeLogRecord(record.__dict__)
    rec.msg, rec.args = record.getMessage(), None
    what = "more like this" if summary else "like this before"
    rec.msg += f" ({count} {what} in the last {max(seconds, 0.0):.0f} s; repeats are counted, not printed)"
    return rec


def closing_noise(record: logging.LogRecord) -> bool:
    """False for kafka-python's ERROR "Metadata refresh: failed Cancelled": a refresh still in flight
    when a client closes is cancelled, and that was printed as an error at the end of commands that had
    worked (``retrain --reproduce``). Any other metadata failure still prints."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (record.msg == "Metadata refresh: failed %s" and args and type(args[0]).__name__ == "Cancelled")


def silence_tensorflow(verbose: bool = False) -> None:
    """Keep TensorFlow's C++/absl start-up lines off the terminal unless ``verbose``.

    Must run before TensorFlow is imported; ``setdefault`` keeps a value the user chose. These are
    TensorFlow's own variables, not streamlearn settings, so they bypass streaming.config; child
    processes inherit them.
    """
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")


def setup_logging(level: str = "INFO", *, quiet: bool = False, verbose: bool = False,
                  interval_s: float = 10.0, stream: IO[str] | None = None,
                  kafka_level: int = logging.ERROR) -> AggregatingHandler:
    """Configure the root logger once per process: aggregated repeats, third parties kept quiet.

    ``quiet``: only warnings and errors. ``verbose``: DEBUG for streamlearn and the libraries' own
    messages (TensorFlow included) left on. ``kafka_level``: long-running workers keep kafka-python's
    warnings (rebalances, reconnects); one-shot commands only its errors.
    """
    silence_tensorflow(verbose)
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, AggregatingHandler):
            root.removeHandler(old)
            old.close()
    target = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler = AggregatingHandler(target, interval_s=interval_s)
    handler.setFormatter(SafeFormatter(FORMAT))
    root.addHandler(handler)
    lvl = logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO)
    root.setLevel(max(lvl, logging.WARNING) if quiet else lvl)
    for name, noisy_level in NOISY_LIBRARIES.items():
        logging.getLogger(name).setLevel(logging.WARNING if verbose else noisy_level)
    logging.getLogger("kafka").setLevel(logging.WARNING if verbose else kafka_level)
    cluster = logging.getLogger("kafka.cluster")
    if not verbose and closing_noise not in cluster.filters:
        cluster.addFilter(closing_noise)
    elif verbose:
        cluster.removeFilter(closing_noise)
    return handler
