"""One parser for every command-line flag that takes a point in time.

Why one module: ``replay --from-timestamp``, ``replay --to``, ``subscribe --from-timestamp``,
``subscribe --until-timestamp`` and ``offsets reset --to-timestamp`` used to accept slightly
different things, and README examples with a fixed date stopped working a week later. Every such
flag now accepts the same three forms and fails with the same message naming the flag:

* **ISO 8601**: ``2026-11-22T10:00:00Z``, ``2026-11-22T10:00:00+01:00``, ``2026-11-22 10:00``,
  ``2026-11-22``. A value **without a zone is UTC** (not the machine's local zone): Kafka record
  timestamps are UTC epoch milliseconds and servers rarely agree on a local zone, so the same
  command means the same instant on every host.
* **Epoch with an explicit unit**: ``1700000000s``, ``1700000000000ms``, ``1700000000000000us``.
  A bare number is refused: ``1700000000`` is a date in 2023 in seconds and in January 1970 in
  milliseconds, and guessing silently replays the wrong range.
* **Relative to now**: ``-45s``, ``-30m``, ``-2h``, ``-7d``, ``-1w`` (and ``now``), so examples work on
  any date. Evaluated once, when the command line is parsed.

This parses *command-line arguments* only; event-time fields inside records are parsed by ingest.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from streaming import clock
from streaming.eventtime import parse_iso_ms
from streaming.exceptions import EventTimeError, StreamingError

#: Accepted forms, quoted in every error and in ``--help``.
FORMS = ("ISO 8601 (2026-11-22T10:00:00Z; no zone = UTC), epoch with a unit (1700000000s, "
         "1700000000000ms) or relative to now (-45s, -30m, -2h, -7d, -1w)")
#: Short form for ``--help`` texts.
HELP = "ISO 8601 (no zone = UTC), epoch with unit (1700000000s / 1700000000000ms) or relative (-2h, -7d)"

_RELATIVE = re.compile(r"^-\s*(?P<n>\d+)\s*(?P<unit>s|m|h|d|w)$")
_EPOCH = re.compile(r"^(?P<n>\d+)\s*(?P<unit>s|ms|us|ns)$")
_RELATIVE_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_EPOCH_DIV = {"s": None, "ms": 1, "us": 1_000, "ns": 1_000_000}


class TimeArgError(StreamingError, ValueError):
    """A command-line time is in none of the accepted forms (the message names the flag)."""


#: The last millisecond of 9999-12-31, the latest time taken (ISO 8601 cannot say later).
MAX_TIME_MS = 253_402_300_799_999


def parse_time(text: str, *, flag: str = "time", now_ms: int | None = None, event_time: bool = False) -> int:
    """Epoch milliseconds (UTC) of ``text`` in one of :data:`FORMS`; ``flag`` names the argument in errors.

    For a Kafka record time (the default) a time before 1970 is 0, the start of every topic (record times
    are not negative: it used to be kafka-python's "target time cannot be negative" traceback). An
    ``event_time`` bound (``query --start/--end``) keeps it: backfilled history goes back to 1678, and
    clamping made ``--start 1962-01-01`` mean 1970 (rows of 1962-1969 left out) and any range before
    1970 an "empty range" error. One after 9999 is refused (an epoch with too many digits was a
    ``struct.error`` traceback, or a 30 s hang in ``subscribe``)."""
    ms = _parse_time(text, flag, now_ms)
    if ms > MAX_TIME_MS:
        raise TimeArgError(f"{flag}: {text.strip()!r} is after 9999-12-31; give {FORMS}")
    return ms if event_time else max(ms, 0)


def _parse_time(text: str, flag: str, now_ms: int | None) -> int:
    raw = text
    text = text.strip()
    if not text:
        raise TimeArgError(f"{flag}: empty; give {FORMS}")
    now = clock.now_ms() if now_ms is None else now_ms
    if text.lower() == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        return now - int(m["n"]) * _RELATIVE_MS[m["unit"]]
    m = _EPOCH.match(text)
    if m:
        n, div = int(m["n"]), _EPOCH_DIV[m["unit"]]
        return n * 1000 if div is None else n // div
    if re.fullmatch(r"-?\d+", text):
        hint = f"{text}ms" if len(text.lstrip("-")) >= 12 else f"{text}s"
        raise TimeArgError(f"{flag}: {raw!r} is a bare number; say its unit, e.g. {hint!r} "
                           f"(accepted: {FORMS})")
    if re.fullmatch(r"[+-]?\s*\d+\s*[A-Za-z]+", text):
        raise TimeArgError(f"{flag}: {raw!r} is not a relative time or an epoch with a unit; relative times "
                           f"look back from now with a minus sign and one of s, m, h, d, w (e.g. -2h); "
                           f"epochs use s, ms, us or ns (accepted: {FORMS})")
    try:
        # the event-time reader's ISO parse, with UTC for a time without a zone: exact integer
        # milliseconds (through a float, 2004-03-15T07:55:47.472Z was ...471)
        return parse_iso_ms(text, UTC)
    except EventTimeError as exc:
        raise TimeArgError(f"{flag}: {raw!r} is not a time; give {FORMS}") from exc


#: Every flag made by :func:`time_arg`, so :func:`attach_relative_values` knows them.
TIME_FLAGS: set[str] = set()


def time_arg(flag: str, *, event_time: bool = False) -> Callable[[str], int]:
    """An argparse ``type=`` for ``flag``: argparse then prints ``argument FLAG: <our message>``, exit 2.
    ``event_time``: a bound on event times, which may lie before 1970 (see :func:`parse_time`).

    Register the command line through :func:`attach_relative_values` too, or ``--from-timestamp -2h`` is
    taken for an unknown option ``-2h``.
    """
    TIME_FLAGS.add(flag)

    def convert(text: str) -> int:
        try:
            return parse_time(text, flag=flag, event_time=event_time)
        except TimeArgError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from exc

    convert.__name__ = "time"  # argparse names the type in some messages
    return convert


def attach_relative_values(argv: Sequence[str]) -> list[str]:
    """``[..., "--from-timestamp", "-2h"]`` -> ``[..., "--from-timestamp=-2h"]`` for every time flag.

    Why: argparse treats any word starting with ``-`` that is not a plain negative number as an option,
    so the natural ``--from-timestamp -2h`` fails with "expected one argument".
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            out += args[i:]
            break
        # "-2h", and also "-2x" or "-5" (so the parser, not argparse, explains what is wrong with them)
        if word in TIME_FLAGS and i + 1 < len(args) and re.match(r"^-\s*\d", args[i + 1]):
            out.append(f"{word}={args[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def format_ms(ms: int | None) -> str:
    """``2026-11-22T10:00:00.000Z (1795...ms)``: both forms, so a user can paste either back."""
    if ms is None:
        return "unknown"
    iso = datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{iso}.{ms % 1000:03d}Z ({ms}ms)"
