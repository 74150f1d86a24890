"""Sensor readings: validation, a CSV source and a deterministic many-sensor generator.

Validation runs before anything is published, so a NaN, an infinity, an absurd magnitude or
a timestamp far in the past or future never reaches the raw topic as a reading; the caller
dead-letters the original bytes with the :class:`SensorValidationError` message and reason.

Limits: ``|value| <= 1e9`` (no physical sensor we ingest reports more; 1e9 still fits pressure in
Pa and energy counters in Wh). Event times follow the one event-time policy
(:mod:`streaming.eventtime`, docs/EVENT_TIME.md): live readings within ``--max-age`` (default
20 years) and at most ``max_future_skew_s`` (default 5 minutes) ahead; ``--backfill`` accepts any
time from 1678 on and marks the readings as a backfill run.

A reading with several problems is rejected with all of them (:class:`SensorValidationError`'s
``reasons``), the value problems (nan, infinite, magnitude) first, so a NaN is never reported
as a clock problem.

CSV columns: ``sensor_id``, ``timestamp`` (epoch number in ``--timestamp-unit``, decided once per
file when ``auto``, or ISO 8601 with an offset, or a bare ISO date = 00:00 UTC), ``value``,
optional ``unit`` (default ``unit`` argument), ``label`` (true/false/1/0/empty) and ``event_id``;
every other column is a further numeric channel in ``values``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.exceptions import SensorValidationError, SourceError
from streaming.clock import now_ms
from streaming.eventtime import EventTimePolicy, TimestampReader
from streaming.exceptions import EventTimeError

if TYPE_CHECKING:
    from streaming.producer import Publisher

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
MAX_ABS_VALUE = 1e9
#: The live policy used when a caller passes none (env settings are applied by the CLI).
LIVE = EventTimePolicy()
_RESERVED = {"sensor_id", "timestamp", "value", "unit", "label", "event_id"}


def _check_number(name: str, value: Any, max_abs: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SensorValidationError(f"{name} {value!r} must be a number", "not_a_number")
    v = float(value)
    if math.isnan(v):
        raise SensorValidationError(f"{name} is NaN; send a measured number or leave the reading out", "nan")
    if math.isinf(v):
        raise SensorValidationError(f"{name} is {v}; send a finite number", "infinite")
    if abs(v) > max_abs:
        raise SensorValidationError(
            f"{name} {v!r} exceeds the plausible magnitude {max_abs:g}; check the sensor's scaling",
            "absurd_magnitude",
        )
    return v


def combine(problems: list[SensorValidationError]) -> SensorValidationError:
    """One error carrying every problem: the first one's reason, all messages, ``reasons`` in order."""
    if len(problems) == 1:
        return problems[0]
    err = SensorValidationError("; ".join(str(p) for p in problems), problems[0].reason)
    err.reasons = [p.reason for p in problems]
    return err


def reasons_of(exc: BaseException) -> list[str]:
    """Every reason of a rejection, first one first (one for errors that know only one)."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return list(reasons)
    reason = getattr(exc, "reason", None)
    return [reason] if isinstance(reason, str) else []


def _as_sensor_error(exc: EventTimeError) -> SensorValidationError:
    return SensorValidationError(str(exc), exc.reason)


def validate(
    record: dict[str, Any],
    *,
    now: int | None = None,
    max_abs: float = MAX_ABS_VALUE,
    policy: EventTimePolicy | None = None,
    problems: list[SensorValidationError] | None = None,
) -> dict[str, Any]:
    """Check one SensorReading dict; return it (values as floats) or raise SensorValidationError.

    Every problem is collected (``problems`` brings ones found while parsing, e.g. an unreadable
    timestamp cell, whose record then has no ``timestamp``); value problems go first, then the
    others in field order.
    """
    value_problems: list[SensorValidationError] = []
    other: list[SensorValidationError] = []
    value = None
    try:
        value = _check_number("value", record.get("value"), max_abs)
    except SensorValidationError as exc:
        value_problems.append(exc)
    channels = record.get("values") or {}
    checked: dict[str, float] = {}
    if not isinstance(channels, dict):
        other.append(SensorValidationError("values must be a map of channel name to number", "bad_values"))
    else:
        for k, v in channels.items():
            try:
                checked[str(k)] = _check_number(f"values[{k!r}]", v, max_abs)
            except SensorValidationError as exc:
                value_problems.append(exc)
    sensor_id = record.get("sensor_id")
    if not isinstance(sensor_id, str) or not sensor_id.strip():
        other.append(SensorValidationError(f"sensor_id {sensor_id!r} must be a non-empty string",
                                           "missing_sensor_id"))
    other.extend(problems or [])
    if "timestamp" in record or not problems:
        ts = record.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, int):
            other.append(SensorValidationError(f"timestamp {ts!r} must be an int of epoch milliseconds",
                                               "bad_timestamp"))
        else:
            other.extend(_as_sensor_error(p) for p in (policy or LIVE).problems(ts, now))
    unit = record.get("unit")
    if not isinstance(unit, str) or not unit:
        other.append(SensorValidationError(f"unit {unit!r} must be a non-empty string such as 'celsius'",
                                           "missing_unit"))
    label = record.get("label")
    if label is not None and not isinstance(label, bool):
        other.append(SensorValidationError(f"label {label!r} must be true, false or null", "bad_label"))
    if value_problems or other:
        raise combine(value_problems + other)
    out = dict(record)
    out.update(value=value, values=checked)
    out.setdefault("label", None)
    out.setdefault("event_id", None)
    return out


def parse_timestamp(text: Any, unit: str = "ms") -> int:
    """One timestamp -> epoch ms in a declared unit (ISO 8601 text is always accepted)."""
    try:
        return TimestampReader(unit)(text)
    except EventTimeError as exc:
        raise _as_sensor_error(exc) from exc


def _parse_float(text: str) -> float | str:
    """A number cell -> float; 'nan'/'inf' stay floats and anything else stays text, so that
    :func:`validate` reports it (not_a_number) together with the row's other problems."""
    try:
        return float(text)
    except ValueError:
        return text[:40]


def _parse_label(text: str) -> bool | None | str:
    """A label cell -> bool/None; other text is kept for :func:`validate` to report (bad_label)."""
    t = text.strip().lower()
    if t in ("", "null", "none"):
        return None
    if t in ("1", "true", "yes", "anomaly"):
        return True
    if t in ("0", "false", "no", "normal"):
        return False
    return text[:40]


@dataclass(frozen=True)
class CsvRow:
    """One data row of a CSV file: its line number, original bytes, and the parsed reading or error."""

    line: int
    raw: bytes
    record: dict[str, Any] | None
    error: SensorValidationError | None


def read_csv(path: Path, *, unit: str = "unit", now: int | None = None, policy: EventTimePolicy | None = None,
             timestamp_unit: str = "auto", reader: TimestampReader | None = None) -> Iterator[CsvRow]:
    """Parse and validate every data row of ``path``; bad rows come back with their error.

    Timestamps are read with one :class:`~streaming.eventtime.TimestampReader` for the whole file:
    with ``timestamp_unit="auto"`` it decides from the first rows before any row is yielded, and
    raises SourceError (nothing published yet) when it cannot.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SourceError(f"--csv {path}: cannot read ({exc})") from exc
    lines = data.splitlines(keepends=False)
    if not lines:
        return
    header = next(csv.reader([lines[0].decode("utf-8", "replace")]))
    header = [h.strip() for h in header]
    missing = {"sensor_id", "timestamp", "value"} - set(header)
    if missing:
        raise SourceError(f"--csv {path}: header lacks {sorted(missing)}; required columns: sensor_id,timestamp,value")
    ref = now_ms() if now is None else now
    try:
        reader = reader or TimestampReader(timestamp_unit, source=f"--csv {path}")
        if reader.unit == "auto":
            reader.decide(_timestamp_cells(lines, header.index("timestamp"), reader.sample))
    except EventTimeError as exc:
        raise SourceError(str(exc)) from exc
    for n, raw in enumerate(lines[1:], 2):
        if not raw.strip():
            continue
        try:
            cells = next(csv.reader(io.StringIO(raw.decode("utf-8"))))
            if len(cells) != len(header):
                raise SensorValidationError(f"row has {len(cells)} cells, header has {len(header)}", "wrong_cell_count")
            row = dict(zip(header, (c.strip() for c in cells), strict=True))
            record: dict[str, Any] = {
                "sensor_id": row["sensor_id"],
                "value": _parse_float(row["value"]),
                "values": {k: _parse_float(v) for k, v in row.items() if k not in _RESERVED and v != ""},
                "unit": row.get("unit") or unit,
                "label": _parse_label(row.get("label", "")),
                "event_id": row.get("event_id") or None,
            }
            found: list[SensorValidationError] = []
            try:
                record["timestamp"] = reader(row["timestamp"])
            except EventTimeError as exc:
                found.append(_as_sensor_error(exc))
            yield CsvRow(n, raw, validate(record, now=ref, policy=policy, problems=found), None)
        except SensorValidationError as exc:
            yield CsvRow(n, raw, None, exc)
        except UnicodeDecodeError as exc:
            yield CsvRow(n, raw, None, SensorValidationError(f"row is not UTF-8 ({exc})", "bad_encoding"))


def _timestamp_cells(lines: list[bytes], column: int, limit: int) -> Iterator[str]:
    """The timestamp cells of the first data rows (for ``auto``'s one decision per file)."""
    seen = 0
    for raw in lines[1:]:
        if seen >= limit:
            return
        try:
            cells = next(csv.reader(io.StringIO(raw.decode("utf-8"))), [])
        except (UnicodeDecodeError, csv.Error):
            continue
        if len(cells) > column:
            seen += 1
            yield cells[column]


def _sensor_params(rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    return {
        "base": rng.uniform(15.0, 25.0, k),
        "amp": rng.uniform(2.0, 6.0, k),
        "phase": rng.uniform(0, 2 * math.pi, k),
        "noise": rng.uniform(0.1, 0.5, k),
        "drift": rng.uniform(-0.5, 0.5, k),  # units per day
        "hum_base": rng.uniform(35.0, 60.0, k),
    }


def generate(
    n: int,
    n_sensors: int = 10,
    seed: int = 0,
    start_ms: int | None = None,
    *,
    interval_ms: int = 60_000,
    anomaly_rate: float = 0.01,
    unit: str = "celsius",
) -> Iterator[dict[str, Any]]:
    """``n`` SensorReading dicts from ``n_sensors`` sensors, round-robin, one reading per sensor
    every ``interval_ms``: daily sinusoidal seasonality + Gaussian noise + slow linear drift,
    with injected anomalies labelled ``True`` (spikes, dips and short stuck-at runs) and every
    other reading labelled ``False``. Deterministic given ``seed`` and ``start_ms``.

    ``start_ms`` defaults to "now minus the generated span", so the last reading is at about
    now and every reading passes :func:`validate`'s clock checks.
    """
    if n < 0 or n_sensors < 1:
        raise ValueError(f"n={n} must be >= 0 and n_sensors={n_sensors} >= 1")
    if interval_ms <= 0:
        raise ValueError(f"interval_ms={interval_ms} must be positive")
    steps = -(-n // n_sensors)
    if start_ms is None:
        start_ms = (now_ms() // interval_ms) * interval_ms - steps * interval_ms
    rng = np.random.default_rng(seed)
    p = _sensor_params(rng, n_sensors)
    width = max(3, len(str(n_sensors - 1)))
    ids = [f"sensor-{i:0{width}d}" for i in range(n_sensors)]
    stuck: dict[int, tuple[int, float]] = {}  # sensor -> (readings left, stuck value)
    last = [0.0] * n_sensors
    for i in range(n):
        s, step = i % n_sensors, i // n_sensors
        ts = start_ms + step * interval_ms
        day_frac = (ts % DAY_MS) / DAY_MS
        season = p["amp"][s] * math.sin(2 * math.pi * day_frac + p["phase"][s])
        drift = p["drift"][s] * (ts - start_ms) / DAY_MS
        value = p["base"][s] + season + drift + rng.normal(0.0, p["noise"][s])
        humidity = p["hum_base"][s] - 0.8 * season + rng.normal(0.0, 1.0)
        label = False
        u = rng.random()
        if s in stuck:
            left, held = stuck[s]
            value, label = held, True
            if left <= 1:
                del stuck[s]
            else:
                stuck[s] = (left - 1, held)
        elif u < anomaly_rate:
            kind = rng.integers(0, 3)
            label = True
            if kind == 0:
                value += rng.uniform(8.0, 20.0) * p["noise"][s] * 10
            elif kind == 1:
                value -= rng.uniform(8.0, 20.0) * p["noise"][s] * 10
            else:
                value = last[s]
                stuck[s] = (int(rng.integers(3, 8)), value)
        last[s] = value
        yield {
            "sensor_id": ids[s],
            "timestamp": int(ts),
            "value": round(float(value), 4),
            "values": {"humidity": round(float(humidity), 3)},
            "unit": unit,
            "label": label,
            "event_id": f"{ids[s]}:{ts}",
        }


def to_csv_line(record: dict[str, Any]) -> str:
    """Render a reading as a CSV row matching :data:`CSV_HEADER` (demo and test fixtures)."""
    label = "" if record.get("label") is None else ("true" if record["label"] else "false")
    hum = record.get("values", {}).get("humidity", "")
    return f"{record['sensor_id']},{record['timestamp']},{record['value']!r},{record['unit']},{label},{hum}"


CSV_HEADER = "sensor_id,timestamp,value,unit,label,humidity"


@dataclass
class SensorIngestStats:
    published: int = 0
    dead_lettered: int = 0
    reasons: dict[str, int] | None = None
    #: The unit numeric timestamps were read in (what ``auto`` decided), None when all were ISO text.
    timestamp_unit: str | None = None

    def count(self, reason: str) -> None:
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def _dead_letter_source(file: str, line: int, exc: SensorValidationError) -> dict[str, str]:
    """Dead-letter source headers: ``reason`` is the first problem, ``reasons`` all of them."""
    return {"file": file, "line": str(line), "reason": exc.reason, "reasons": ",".join(reasons_of(exc))}


def publish_csv(publisher: Publisher, path: Path, *, unit: str = "unit", policy: EventTimePolicy | None = None,
                timestamp_unit: str = "auto") -> SensorIngestStats:
    """Publish the valid rows of a CSV file; dead-letter the others (original row bytes + reasons).

    Rows of a backfill (``policy.backfill``) carry the backfill header naming the run. Waits for
    every ack before returning, so a zero exit status means everything is in Kafka.
    """
    stats = SensorIngestStats()
    futures = []
    headers = (policy or LIVE).headers()
    reader = TimestampReader(timestamp_unit, source=f"--csv {path}")
    for row in read_csv(path, unit=unit, policy=policy, reader=reader):
        if row.record is not None:
            futures.append(publisher.publish("sensor", row.record, headers=headers or None))
            stats.published += 1
        else:
            assert row.error is not None
            futures.append(
                publisher.dead_letter(
                    "sensor",
                    row.raw,
                    stage="validate",
                    error=row.error,
                    source=_dead_letter_source(str(path), row.line, row.error),
                )
            )
            stats.dead_lettered += 1
            stats.count(row.error.reason)
    publisher.flush()
    for fut in futures:
        fut.get(timeout=60)
    stats.timestamp_unit = reader.decided
    return stats


def publish_records(publisher: Publisher, records: Iterator[dict[str, Any]], *, source: str,
                    policy: EventTimePolicy | None = None) -> SensorIngestStats:
    """Validate and publish reading dicts (e.g. from :func:`generate`); dead-letter invalid ones as JSON."""
    import json

    stats = SensorIngestStats()
    futures = []
    ref = now_ms()
    headers = (policy or LIVE).headers()
    for n, record in enumerate(records, 1):
        try:
            futures.append(publisher.publish("sensor", validate(record, now=ref, policy=policy),
                                             headers=headers or None))
            stats.published += 1
        except SensorValidationError as exc:
            raw = json.dumps(record, default=str, allow_nan=True).encode()
            futures.append(
                publisher.dead_letter("sensor", raw, stage="validate", error=exc,
                                      source=_dead_letter_source(source, n, exc))
            )
            stats.dead_lettered += 1
            stats.count(exc.reason)
    publisher.flush()
    for fut in futures:
        fut.get(timeout=60)
    return stats
