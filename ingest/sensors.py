"""Sensor readings: validation, a CSV source and a deterministic many-sensor generator.

Validation runs before anything is published, so a NaN, an infinity, an absurd magnitude or
a timestamp far in the past or future never reaches the raw topic as a reading; the caller
dead-letters the original bytes with the :class:`SensorValidationError` message and reason.

Limits (keyword arguments of :func:`validate`, defaults chosen where the issue was silent):
``|value| <= 1e9`` (no physical sensor we ingest reports more; 1e9 still fits pressure in Pa
and energy counters in Wh), timestamps not older than 20 years and not more than one day ahead
of ``now_ms`` (clock skew of a field device, not a typo'd year).

CSV columns: ``sensor_id``, ``timestamp`` (epoch ms, epoch seconds when below 1e11, or ISO
8601 with offset), ``value``, optional ``unit`` (default ``unit`` argument), ``label``
(true/false/1/0/empty) and ``event_id``; every other column is a further numeric channel in
``values``.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.exceptions import SensorValidationError, SourceError

if TYPE_CHECKING:
    from streaming.producer import Publisher

DAY_MS = 86_400_000
MAX_ABS_VALUE = 1e9
MAX_AGE_MS = 20 * 365 * DAY_MS
MAX_AHEAD_MS = DAY_MS
_RESERVED = {"sensor_id", "timestamp", "value", "unit", "label", "event_id"}


def now_ms() -> int:
    return int(time.time() * 1000)


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


def validate(
    record: dict[str, Any],
    *,
    now: int | None = None,
    max_abs: float = MAX_ABS_VALUE,
    max_age_ms: int = MAX_AGE_MS,
    max_ahead_ms: int = MAX_AHEAD_MS,
) -> dict[str, Any]:
    """Check one SensorReading dict; return it (values as floats) or raise SensorValidationError."""
    sensor_id = record.get("sensor_id")
    if not isinstance(sensor_id, str) or not sensor_id.strip():
        raise SensorValidationError(f"sensor_id {sensor_id!r} must be a non-empty string", "missing_sensor_id")
    ts = record.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise SensorValidationError(f"timestamp {ts!r} must be an int of epoch milliseconds", "bad_timestamp")
    ref = now_ms() if now is None else now
    if ts < ref - max_age_ms:
        raise SensorValidationError(
            f"timestamp {ts} is more than {max_age_ms // DAY_MS} days in the past; check the sensor clock",
            "timestamp_too_old",
        )
    if ts > ref + max_ahead_ms:
        raise SensorValidationError(
            f"timestamp {ts} is more than {max_ahead_ms / 3_600_000:g} h ahead; check the sensor clock",
            "timestamp_in_future",
        )
    value = _check_number("value", record.get("value"), max_abs)
    channels = record.get("values") or {}
    if not isinstance(channels, dict):
        raise SensorValidationError("values must be a map of channel name to number", "bad_values")
    checked = {str(k): _check_number(f"values[{k!r}]", v, max_abs) for k, v in channels.items()}
    unit = record.get("unit")
    if not isinstance(unit, str) or not unit:
        raise SensorValidationError(f"unit {unit!r} must be a non-empty string such as 'celsius'", "missing_unit")
    label = record.get("label")
    if label is not None and not isinstance(label, bool):
        raise SensorValidationError(f"label {label!r} must be true, false or null", "bad_label")
    out = dict(record)
    out.update(value=value, values=checked)
    out.setdefault("label", None)
    out.setdefault("event_id", None)
    return out


def parse_timestamp(text: str) -> int:
    """CSV timestamp -> epoch ms (ms int, seconds below 1e11, or ISO 8601 with offset)."""
    t = text.strip()
    try:
        num = float(t)
    except ValueError:
        try:
            dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError as exc:
            raise SensorValidationError(
                f"timestamp {t[:40]!r} is neither epoch ms/s nor ISO 8601", "bad_timestamp"
            ) from exc
        if dt.tzinfo is None:
            raise SensorValidationError(f"timestamp {t[:40]!r} needs a UTC offset (e.g. Z)", "bad_timestamp") from None
        return int(round(dt.timestamp() * 1000))
    if not math.isfinite(num):
        raise SensorValidationError(f"timestamp {t!r} is not finite", "bad_timestamp")
    return int(round(num * 1000)) if abs(num) < 1e11 else int(num)


def _parse_float(name: str, text: str) -> float:
    try:
        return float(text)  # accepts 'nan', 'inf': validate() rejects them with the right reason
    except ValueError as exc:
        raise SensorValidationError(f"{name} {text[:40]!r} is not a number", "not_a_number") from exc


def _parse_label(text: str) -> bool | None:
    t = text.strip().lower()
    if t in ("", "null", "none"):
        return None
    if t in ("1", "true", "yes", "anomaly"):
        return True
    if t in ("0", "false", "no", "normal"):
        return False
    raise SensorValidationError(f"label {text!r} must be true/false/1/0 or empty", "bad_label")


@dataclass(frozen=True)
class CsvRow:
    """One data row of a CSV file: its line number, original bytes, and the parsed reading or error."""

    line: int
    raw: bytes
    record: dict[str, Any] | None
    error: SensorValidationError | None


def read_csv(path: Path, *, unit: str = "unit", now: int | None = None) -> Iterator[CsvRow]:
    """Parse and validate every data row of ``path``; bad rows come back with their error."""
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
                "timestamp": parse_timestamp(row["timestamp"]),
                "value": _parse_float("value", row["value"]),
                "values": {k: _parse_float(k, v) for k, v in row.items() if k not in _RESERVED and v != ""},
                "unit": row.get("unit") or unit,
                "label": _parse_label(row.get("label", "")),
                "event_id": row.get("event_id") or None,
            }
            yield CsvRow(n, raw, validate(record, now=ref), None)
        except SensorValidationError as exc:
            yield CsvRow(n, raw, None, exc)
        except UnicodeDecodeError as exc:
            yield CsvRow(n, raw, None, SensorValidationError(f"row is not UTF-8 ({exc})", "bad_encoding"))


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

    def count(self, reason: str) -> None:
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def publish_csv(publisher: Publisher, path: Path, *, unit: str = "unit") -> SensorIngestStats:
    """Publish the valid rows of a CSV file; dead-letter the others (original row bytes + reason).

    Waits for every ack before returning, so a zero exit status means everything is in Kafka.
    """
    stats = SensorIngestStats()
    futures = []
    for row in read_csv(path, unit=unit):
        if row.record is not None:
            futures.append(publisher.publish("sensor", row.record))
            stats.published += 1
        else:
            assert row.error is not None
            futures.append(
                publisher.dead_letter(
                    "sensor",
                    row.raw,
                    stage="validate",
                    error=row.error,
                    source={"file": str(path), "line": str(row.line), "reason": row.error.reason},
                )
            )
            stats.dead_lettered += 1
            stats.count(row.error.reason)
    publisher.flush()
    for fut in futures:
        fut.get(timeout=60)
    return stats


def publish_records(publisher: Publisher, records: Iterator[dict[str, Any]], *, source: str) -> SensorIngestStats:
    """Validate and publish reading dicts (e.g. from :func:`generate`); dead-letter invalid ones as JSON."""
    import json

    stats = SensorIngestStats()
    futures = []
    ref = now_ms()
    for n, record in enumerate(records, 1):
        try:
            futures.append(publisher.publish("sensor", validate(record, now=ref)))
            stats.published += 1
        except SensorValidationError as exc:
            raw = json.dumps(record, default=str, allow_nan=True).encode()
            futures.append(
                publisher.dead_letter(
                    "sensor",
                    raw,
                    stage="validate",
                    error=exc,
                    source={"file": source, "line": str(n), "reason": exc.reason},
                )
            )
            stats.dead_lettered += 1
            stats.count(exc.reason)
    publisher.flush()
    for fut in futures:
        fut.get(timeout=60)
    return stats
