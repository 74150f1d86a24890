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

import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.exceptions import SensorValidationError
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


def reasons_of(exc: BaseException) -> list[str]:
    """Every reason of a rejection, first one first (one for errors that know only one)."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return list(reasons)
    reason = getattr(exc, "reason", None)
    return [reason] if isinstance(reason, str) else []


def as_sensor_error(exc: EventTimeError) -> SensorValidationError:
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
            if v is None:  # JSON null: this channel has no reading (the Avro map holds numbers only)
                continue
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
            other.extend(as_sensor_error(p) for p in (policy or LIVE).problems(ts, now))
    unit = record.get("unit")
    if not isinstance(unit, str) or not unit:
        other.append(SensorValidationError(f"unit {unit!r} must be a non-empty string such as 'celsius'",
                                           "missing_unit"))
    label = record.get("label")
    if label is not None and not isinstance(label, bool):
        other.append(SensorValidationError(f"label {label!r} must be true, false or null", "bad_label"))
    if value_problems or other:
        raise SensorValidationError.combine(value_problems + other)
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
        raise as_sensor_error(exc) from exc


def __getattr__(name: str) -> Any:
    """``read_csv``, ``CsvReader`` and ``CsvRow`` live in :mod:`ingest.sensor_csv` (which imports this
    module's validation); they are still importable from here, as before."""
    if name in ("read_csv", "CsvReader", "CsvRow"):
        from ingest import sensor_csv

        return getattr(sensor_csv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    #: CSV: rows found on the topics after a crash (acked by the killed run, not sent again).
    skipped_duplicates: int = 0
    #: CSV: the first line this run read (> 2 when it resumed) and its checkpoint file.
    from_line: int | None = None
    checkpoint: str | None = None
    #: Wide CSV: sensor columns without a single reading in the rows this run read.
    empty_columns: list[str] | None = None
    #: CSV backfill: the run id its records carry (a resumed run keeps the interrupted run's).
    backfill_run: str | None = None

    def count(self, reason: str) -> None:
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def dead_letter_source(file: str, line: int, exc: SensorValidationError) -> dict[str, str]:
    """Dead-letter source headers: ``reason`` is the first problem, ``reasons`` all of them."""
    return {"file": file, "line": str(line), "reason": exc.reason, "reasons": ",".join(reasons_of(exc))}


def publish_records(publisher: Publisher, records: Iterator[dict[str, Any]], *, source: str,
                    policy: EventTimePolicy | None = None, stop: threading.Event | None = None) -> SensorIngestStats:
    """Validate and publish reading dicts (e.g. from :func:`generate`); dead-letter invalid ones as JSON.

    A generator source (:class:`ingest.source.IterSource`) run by the one runner without a
    checkpoint: a generated run is published whole each time. Waits for every ack before returning.
    """
    from ingest.runner import SourceRunner
    from ingest.source import IterSource

    ref = now_ms()
    headers = (policy or LIVE).headers()

    def build(state: dict[str, Any] | None) -> IterSource:
        return IterSource("sensor", records, name=source, check=lambda r: validate(r, now=ref, policy=policy),
                          errors=(SensorValidationError,), headers=headers, resume_state=state)

    stats = SourceRunner(publisher.settings, publisher, build, kind="sensor", checkpoint_path=None).run(stop)
    return SensorIngestStats(stats.published, stats.dead_lettered, dict(stats.reasons) or None)
