"""The event-time policy: how record timestamps are read, which are accepted, and backfill runs.

One module owns it so every entry (sensor CSV, ``publish --file``/``--stdin``, the HTTP gateway,
web-log ingest) and every featurizer apply the same window; docs/EVENT_TIME.md is the user's view.

* **Units are never guessed per row.** :class:`TimestampReader` converts one file's or stream's
  timestamps with one unit: ``s``, ``ms``, ``us``, ``ns`` or ``iso`` as declared, or ``auto``,
  which decides *once* from the first values it sees (a vote of their orders of magnitude, see
  :func:`magnitude_unit`), logs the decision, and rejects every later value that only makes sense
  in another unit (``timestamp_unit_mismatch``) instead of silently reinterpreting it. ISO 8601
  strings are read whatever the unit, because they carry their own; one written without an offset
  (``2024-01-01 00:04:00``, as spreadsheets and loggers export it) is refused, since which zone it
  meant cannot be known, unless the source names that zone (``--timezone``, :attr:`EventTimePolicy.timezone`).
* **The acceptance window** of :class:`EventTimePolicy`: live records must lie within
  ``max_age`` before now (default 20 years, ``--max-age``) and at most ``max_future_skew_s``
  ahead (default 5 minutes, the same everywhere, featurizers included). ``--backfill`` lifts the
  age limit down to :data:`MIN_EVENT_TIME_MS` (1678-01-01, the first year whose every instant fits
  int64 nanoseconds, so any tool downstream can hold it) and marks every record it publishes with
  the :data:`BACKFILL_HEADER` naming the run.
* **Backfill runs and the featurizers.** A featurizer sees the header and keeps that run's
  per-key state apart from the live state: lateness rules (the live stream's allowed lateness)
  do not apply; within a run each key only needs its records in time order (inserted in order as
  far back as the retained history reaches). History therefore never makes live readings "late",
  and live state never makes history "late".
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any

from streaming.clock import now_ms
from streaming.exceptions import EventTimeError

log = logging.getLogger(__name__)

#: 1678-01-01T00:00:00Z: the earliest accepted event time, in epoch ms (backfill included).
MIN_EVENT_TIME_MS = -9_214_560_000_000
#: 2262-04-11T00:00:00Z: the latest instant int64 nanoseconds can hold (never reached in practice:
#: the future-skew check rejects far earlier).
MAX_EVENT_TIME_MS = 9_223_286_400_000
DEFAULT_MAX_FUTURE_MS = 5 * 60 * 1000
DEFAULT_MAX_AGE = "20y"
#: Kafka header on every record a declared backfill publishes; its value names the run.
BACKFILL_HEADER = "sl.backfill"
UNITS = ("auto", "s", "ms", "us", "ns", "iso")
#: How many values ``auto`` looks at before deciding (files: the first rows).
AUTO_SAMPLE = 100

_MS_PER = {"s": 1000, "ms": 1}
_PER_MS = {"us": 1000, "ns": 1_000_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w|y)?\s*$")
_YEAR_MS = 365 * 86_400_000
_DURATION_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000,
                "y": 365 * 86_400_000 + 6 * 3_600_000}  # Julian year: 20y spans 5 leap days


def iso(ms: int) -> str:
    """Readable UTC form of an epoch-ms time for messages (works before 1970 and after 9999 too)."""
    try:
        return (_EPOCH + timedelta(milliseconds=ms)).strftime("%Y-%m-%dT%H:%M:%SZ")
    except OverflowError:
        return f"{ms} ms"


def parse_duration_ms(text: str | None, flag: str = "--max-age") -> int | None:
    """``90s``, ``15m``, ``12h``, ``30d``, ``52w``, ``20y`` or plain seconds -> ms; ``none`` -> None."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("none", "off", "unlimited", "inf"):
        return None
    m = _DURATION.match(t)
    if m is None:
        raise EventTimeError(f"{flag} {text!r} is not a duration; use e.g. 90s, 15m, 12h, 30d, 52w, 20y or none",
                             "bad_setting")
    value = float(m.group(1)) * _DURATION_MS[m.group(2) or "s"]
    if not value <= _MAX_DURATION_MS:  # also inf: a 300-digit number was an OverflowError traceback
        raise EventTimeError(f"{flag} {text!r:.40} is longer than any event time can be old (1678 is the "
                             "oldest accepted); use none for no limit", "bad_setting")
    return int(value)


#: Longer than 1678..2262 in either direction: no age limit past it can matter.
_MAX_DURATION_MS = 10_000 * _DURATION_MS["y"]


def format_duration(ms: int | None) -> str:
    """``20y``, ``90s``; a length that is no whole number of a unit in the largest unit it reaches,
    with one decimal (``3.1y``, not ``9.71387e+07s``). Every form parses back with --max-age."""
    if ms is None:
        return "none"
    for unit in ("y", "w", "d", "h", "m"):
        if ms >= _DURATION_MS[unit] and ms % _DURATION_MS[unit] == 0:
            return f"{ms // _DURATION_MS[unit]}{unit}"
    for unit in ("y", "d", "h", "m"):
        if ms >= 2 * _DURATION_MS[unit]:
            return f"{ms / _DURATION_MS[unit]:.1f}{unit}"
    return f"{ms / 1000:g}s"


# -- reading timestamps ----------------------------------------------------------------------------
def parse_iso_ms(text: str, zone: tzinfo | None = None) -> int:
    """ISO 8601 with a UTC offset (``Z`` too) -> epoch ms; a bare date means 00:00 UTC that day.

    A date and time without an offset is in ``zone`` when given (an hour repeated by a daylight-saving
    change is taken at its first occurrence, an hour skipped by one at the offset before it), and is
    refused when not: which zone it meant cannot be known.
    Exact integer arithmetic (no float seconds), so 1700-01-01 converts without rounding.
    """
    t = text.strip()
    try:
        if len(t) == 10 and t[4] == "-" and t[7] == "-":
            d = date.fromisoformat(t)
            dt = datetime(d.year, d.month, d.day, tzinfo=UTC)
        else:
            dt = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)
    except ValueError as exc:
        raise EventTimeError(f"timestamp {t[:40]!r} is not ISO 8601 (e.g. 1962-01-07T00:00:00Z) nor a number",
                             "bad_timestamp") from exc
    if dt.tzinfo is None:
        if zone is None:
            raise EventTimeError(f"timestamp {t[:40]!r} has no UTC offset; append Z or +hh:mm, or name the zone "
                                 "such times are in with --timezone (env STREAMLEARN_TIMESTAMP_TIMEZONE), e.g. UTC",
                                 "bad_timestamp")
        dt = dt.replace(tzinfo=zone)
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def parse_zone(name: str, flag: str = "--timezone") -> tzinfo | None:
    """An IANA zone name (``UTC``, ``Europe/Berlin``) -> tzinfo; "" -> None (naive times refused)."""
    if not name:
        return None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise EventTimeError(f"{flag} {name!r:.60} is not a time zone; use an IANA name such as UTC, "
                             "Europe/Berlin or America/New_York", "bad_setting") from exc


def numeric_to_ms(value: int | float, unit: str) -> int:
    """An epoch number in ``unit`` -> epoch ms (exact for ints; floats rounded to the ms)."""
    if isinstance(value, int):
        return value * _MS_PER[unit] if unit in _MS_PER else value // _PER_MS[unit]
    if unit in _MS_PER:
        return int(round(value * _MS_PER[unit]))
    return int(round(value / _PER_MS[unit]))


def magnitude_unit(value: float) -> str | None:
    """The unit an epoch number's size implies, or None when its size fits several.

    Each unit owns two decades: 1e8..1e10 s, 1e11..1e13 ms, 1e14..1e16 us, 1e17..1e19 ns, i.e.
    dates from 1653 to 1966 and from 1973 to 2286 in each (the ranges do not overlap, so a value
    in one is unambiguous). Values nearer to 1970 (``|value| < 1e8`` seconds, or inside the gaps)
    fit more than one unit; ``auto`` cannot decide from them and asks for ``--timestamp-unit``.
    """
    a = abs(value)
    for low, unit in ((1e8, "s"), (1e11, "ms"), (1e14, "us"), (1e17, "ns")):
        if low <= a < low * 100:
            return unit
    return None


def _as_number(value: Any) -> int | float | None:
    """The epoch number in ``value`` (an int, float or numeric string), or None for a date string."""
    if isinstance(value, bool):
        raise EventTimeError(f"timestamp {value!r} must be a number or an ISO 8601 string", "bad_timestamp")
    if isinstance(value, int | float):
        num: int | float = value
    elif isinstance(value, str):
        t = value.strip()
        try:
            num = int(t)
        except ValueError:
            try:
                num = float(t)
            except ValueError:
                return None
    else:
        raise EventTimeError(f"timestamp {value!r:.60} must be a number or an ISO 8601 string", "bad_timestamp")
    if isinstance(num, float) and not math.isfinite(num):
        raise EventTimeError(f"timestamp {value!r} is not finite", "bad_timestamp")
    return num


class TimestampReader:
    """Converts the timestamps of one file or stream to epoch ms with ONE unit (see module doc).

    ``flag`` is the option users change (``--timestamp-unit``) and ``source`` what is read (for
    the log line of an ``auto`` decision). :meth:`decide` takes the first values when the caller
    can look ahead (files); otherwise the first numeric values converted decide.
    """

    def __init__(self, unit: str = "auto", *, source: str = "input", flag: str = "--timestamp-unit",
                 sample: int = AUTO_SAMPLE, zone: tzinfo | None = None) -> None:
        if unit not in UNITS:
            raise EventTimeError(f"{flag} {unit!r} is not one of {'|'.join(UNITS)}", "bad_setting")
        self.unit = unit
        self.zone = zone  # of ISO times written without an offset (None: refused)
        self.source = source
        self.flag = flag
        self.sample = sample
        self.decided: str | None = None if unit == "auto" else unit
        self.decided_from = 0
        self._ref = 0  # a recent accepted time (ms), for auto's agreement check

    def decide(self, values: Iterable[Any]) -> str | None:
        """``auto``: pick the unit from these values (the first ``sample`` numbers) and log it.

        Each value whose magnitude names one unit votes (values near 1970 are small in every unit,
        so they do not); the unit with most votes wins. Raises EventTimeError when no value votes,
        or when two units tie. Returns the unit (None when the values held no number: every one was
        ISO text). A vote and not the largest value: one nanosecond row among millisecond ones made
        "the largest" pick ns, read every millisecond row as January 1970, and left the one real
        outlier as the only row that agreed.
        """
        if self.decided is not None:
            return self.decided
        nums: list[int | float] = []
        for v in values:
            try:
                num = _as_number(v)
            except EventTimeError:
                continue  # that row is rejected on its own; it does not vote
            if num is not None:
                nums.append(num)
                if len(nums) >= self.sample:
                    break
        if not nums:
            return None
        units = [magnitude_unit(n) for n in nums]
        ranked = Counter(u for u in units if u is not None).most_common()  # ties in order of appearance
        if not ranked:
            top = max(nums, key=abs)
            raise EventTimeError(
                f"{self.source}: {self.flag} auto cannot tell the unit of the first {len(nums)} numeric "
                f"timestamps (the largest, {top!r}, fits several units: values near 1970 or between the "
                f"units' ranges); pass {self.flag} s|ms|us|ns", "timestamp_unit_ambiguous")
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            counts = ", ".join(f"{v} like {k}" for k, v in ranked)
            raise EventTimeError(
                f"{self.source}: {self.flag} auto cannot tell the unit of the first {len(nums)} numeric "
                f"timestamps: as many look like one unit as like another ({counts}); pass "
                f"{self.flag} s|ms|us|ns", "timestamp_unit_ambiguous")
        unit = ranked[0][0]
        self.decided = unit
        self.decided_from = len(nums)
        times = sorted(numeric_to_ms(n, unit) for n, u in zip(nums, units, strict=True) if u in (unit, None))
        self._ref = times[len(times) // 2]
        log.info("%s: %s auto decided '%s' from the first %d numeric timestamps (%s .. %s)", self.source,
                 self.flag, unit, len(nums), iso(times[0]), iso(times[-1]))
        return unit

    def __call__(self, value: Any) -> int:
        """One timestamp -> epoch ms. Raises EventTimeError (reason bad_timestamp / *_unit_*)."""
        num = _as_number(value)
        if num is None:
            return parse_iso_ms(str(value), self.zone)
        if self.unit == "iso":
            raise EventTimeError(f"timestamp {value!r:.40} is a number but {self.flag} is iso; pass the unit "
                                 f"of the numbers ({self.flag} s|ms|us|ns)", "bad_timestamp")
        if self.decided is None:
            self.decide([num])
        assert self.decided is not None
        ts = numeric_to_ms(num, self.decided)
        if self.unit == "auto":
            self._check_agrees(value, num, ts)
        return ts

    def _check_agrees(self, value: Any, num: int | float, ts: int) -> None:
        """``auto``: reject a value whose own magnitude says another unit AND that unit puts it near
        the input's recent times while the decided unit puts it years away (a seconds value in a
        millisecond file would otherwise land in January 1970). Accepted values move the reference."""
        seen = magnitude_unit(num)
        if seen is not None and seen != self.decided:
            own = numeric_to_ms(num, seen)
            far, near = abs(ts - self._ref), abs(own - self._ref)
            if far > _YEAR_MS and near * 10 < far:
                raise EventTimeError(
                    f"timestamp {value!r:.40} looks like {seen} ({iso(own)}) but {self.flag} auto decided "
                    f"{self.decided!r} for {self.source} from its first {self.decided_from} values (it would "
                    f"be {iso(ts)}); units are never mixed in one input: pass {self.flag} or split the input",
                    "timestamp_unit_mismatch")
        self._ref = ts


# -- the acceptance window ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EventTimePolicy:
    """Which event times a source accepts; ``backfill`` marks its records as one backfill run."""

    max_age_ms: int | None = parse_duration_ms(DEFAULT_MAX_AGE)
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS
    backfill: bool = False
    run_id: str = ""
    #: IANA zone of ISO times written without an offset ("": such times are refused)
    timezone: str = ""

    def zone(self) -> tzinfo | None:
        return parse_zone(self.timezone)

    def reader(self, unit: str, **kwargs: Any) -> TimestampReader:
        """A :class:`TimestampReader` of ``unit`` that reads naive ISO times in this policy's zone."""
        return TimestampReader(unit, zone=self.zone(), **kwargs)

    def problems(self, ts: int, now: int | None = None) -> list[EventTimeError]:
        """Every reason ``ts`` (epoch ms) is outside the window; empty when it is accepted."""
        ref = now_ms() if now is None else now
        if ts < MIN_EVENT_TIME_MS or ts > MAX_EVENT_TIME_MS:
            return [EventTimeError(
                f"timestamp {ts} ms ({iso(ts)}) is outside 1678..2262, the range any tool can hold; "
                "check --timestamp-unit", "timestamp_out_of_range")]
        out: list[EventTimeError] = []
        if self.max_age_ms is not None and ts < ref - self.max_age_ms:
            hint = "raise --max-age" if self.backfill else "load history on purpose with --backfill"
            out.append(EventTimeError(
                f"timestamp {iso(ts)} is older than the window of {format_duration(self.max_age_ms)} "
                f"(--max-age, env STREAMLEARN_EVENT_MAX_AGE); {hint}", "timestamp_too_old"))
        if ts > ref + self.max_future_ms:
            out.append(EventTimeError(
                f"timestamp {iso(ts)} is {format_duration(ts - ref)} ahead of now, more than the allowed clock "
                f"skew of {format_duration(self.max_future_ms)} (env STREAMLEARN_MAX_FUTURE_SKEW_S); fix the "
                "producer's clock or --timestamp-unit", "timestamp_in_future"))
        return out

    def check(self, ts: int, now: int | None = None) -> int:
        problems = self.problems(ts, now)
        if problems:
            raise problems[0]
        return ts

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers for a record of this source (the backfill marker, or none)."""
        return [(BACKFILL_HEADER, self.run_id.encode())] if self.backfill else []

    def describe(self) -> str:
        if self.backfill:
            return f"backfill run {self.run_id} (1678-01-01 .. now+{format_duration(self.max_future_ms)})"
        return f"live (now-{format_duration(self.max_age_ms)} .. now+{format_duration(self.max_future_ms)})"


def new_run_id(source: str) -> str:
    """A backfill run id: the source and the start time, short and readable in headers."""
    digest = hashlib.sha1(source.encode("utf-8", "backslashreplace")).hexdigest()[:8]
    return f"{digest}-{now_ms()}"


def max_future_ms(settings: Any = None) -> int:
    """The future-skew allowance in ms from ``settings`` (``config.load()`` when None)."""
    if settings is None:
        from streaming import config

        try:
            settings = config.load()
        except Exception:  # noqa: BLE001 - a broken config file is reported by the command that loads it
            return DEFAULT_MAX_FUTURE_MS
    return int(float(settings.max_future_skew_s) * 1000)


def policy(settings: Any, *, backfill: bool | None = None, max_age: str | None = None,
           source: str = "input", run_id: str | None = None, timezone: str | None = None) -> EventTimePolicy:
    """The policy of one source: flags (``backfill``/``max_age``/``timezone``) win over the settings (env)."""
    bf = settings.backfill if backfill is None else backfill
    age_text = max_age if max_age is not None else (None if bf else settings.event_max_age)
    zone = str(settings.timestamp_timezone if timezone is None else timezone).strip()
    parse_zone(zone, "--timezone" if timezone is not None else "setting 'timestamp_timezone' (env "
               "STREAMLEARN_TIMESTAMP_TIMEZONE)")  # refused here, before any record is read
    return EventTimePolicy(max_age_ms=None if bf and max_age is None else parse_duration_ms(age_text),
                           max_future_ms=max_future_ms(settings), backfill=bool(bf),
                           run_id=(run_id or new_run_id(source)) if bf else "", timezone=zone)


def backfill_run(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The backfill run a consumed record belongs to (its :data:`BACKFILL_HEADER`), else None (live)."""
    for name, value in headers or ():
        if name == BACKFILL_HEADER:
            return (value or b"").decode("utf-8", "replace") or "backfill"
    return None
