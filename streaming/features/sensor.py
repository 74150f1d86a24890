"""Sensor featurizer ``sensor-v1``: per-sensor event-time windows -> 14 floats for forecasting.

Window features (one function, :meth:`SensorFeaturizer.window_features`, used by training AND
serving) describe the last ``window`` readings (default 16) of one sensor ending at some reading
``p``, in event-time order:

=====================  ====================================================================
``value``              raw value of ``p`` (kept so the model can learn level effects)
``value_minus_mean``   value - rolling mean      (relative, so one model fits many sensors)
``zscore``             (value - mean) / std, 0 when std is 0, clipped to [-10, 10]
``rolling_std``        population std of the window
``min_minus_mean``     rolling min - mean
``max_minus_mean``     rolling max - mean
``slope``              least-squares slope per reading (value units per step)
``lag1_diff``..3       value - value k readings earlier (0 when there is none yet)
``window_fill``        readings in the window / window (partial windows at a sensor's start)
``log1p_gap_s``        log1p(seconds since the previous reading)
``hour_sin/hour_cos``  UTC hour of day of ``p``'s event time
=====================  ====================================================================

Labels, and why a training row looks one step back
---------------------------------------------------
The value that follows a reading is unknown when the reading arrives, so the row emitted by
:meth:`featurize` for reading ``t`` is the *training example of the previous reading* ``t-1``:

* ``x`` = window features ending at reading ``t-1`` (the reading just before ``t`` in event time),
* ``next_value_delta`` = ``value_t - value_{t-1}``: the change from the last observed value,
* ``is_anomaly`` = the source label of reading ``t-1`` (1.0/0.0, None when unlabelled), because
  ``t-1`` is the reading whose value the features describe,
* ``event_time_ms``/``key`` are those of ``t`` (the record that produced the row).

The first reading of a sensor has no predecessor: its row has ``x`` all zeros (``window_fill``
0) and both labels None; the trainer skips rows whose label is None.

At serving time :meth:`featurize_for_prediction` inserts the reading and returns the window
features ending at *this* reading: the model's delta output forecasts the NEXT value as
``forecast = value + predicted_delta``, and its anomaly output scores this reading. Both paths
call ``window_features``, so the vectors are built identically.

Event time, lateness and bounds
-------------------------------
Readings are kept per sensor in event-time order. A reading more than ``max_future_ms`` (the
shared future-skew window, 5 minutes by default) ahead of the clock is rejected before it touches
the state. A live reading older than the sensor's latest event time (capped at the clock's now, so an
accepted reading from a clock running ahead cannot make later real readings late) minus
``allowed_lateness_ms`` raises FeatureValidationError ("late"); within lateness it is
inserted in order (a row already emitted for a later reading is not revised).

Readings of a declared backfill run (:meth:`featurize_backfill`, the ``sl.backfill`` header) are
kept apart from the live ones, per run and sensor, and have no lateness bound: a run only needs
each sensor's readings in time order as far back as the retained history reaches. So history
never makes live readings late, nor live readings history. A reading that would
land deeper than the retained ``history`` readings is also "late", because its window could no
longer be built as an uninterrupted in-order run would have. At most ``max_sensors`` sensors are
tracked (least recently seen evicted), each with at most ``history`` readings.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from operator import mul
from typing import Any, cast

import numpy as np

from streaming.exceptions import FeatureValidationError
from streaming.features.base import (
    DeferredRow,
    FeatureRow,
    FeatureStateError,
    Featurizer,
    check_finite,
    check_key,
    hour_of_day_sin_cos,
    register,
    short_repr,
)
from streaming.features.sensor_batch import (  # re-exported: sensor_v2 and older callers import them here
    WindowSnapshot,
    pack_windows,
    v1_features,
)
from streaming.features.sensor_batch import (
    clip_like_python as clip_like_python,
)
from streaming.features.sensor_state import (  # re-exported: v2/v3, tests and benchmarks import them here
    MAX_STATE_BYTES,
    READING_BYTES,
    SensorBuffer,
    SensorState,
    entry_bytes,
)
from streaming.features.sensor_state import (
    SENSOR_ENTRY_BYTES as SENSOR_ENTRY_BYTES,
)

VERSION = "sensor-v1"
RECORD = "SensorReading"
MAX_ABS_VALUE = 1e9
Z_CLIP = 10.0

FEATURE_NAMES = [
    "value",
    "value_minus_mean",
    "zscore",
    "rolling_std",
    "min_minus_mean",
    "max_minus_mean",
    "slope",
    "lag1_diff",
    "lag2_diff",
    "lag3_diff",
    "window_fill",
    "log1p_gap_s",
    "hour_sin",
    "hour_cos",
]


class SensorFeaturizer(Featurizer[SensorState]):
    """See the module docstring: window features, one-step-back training rows, lateness."""

    kind = "sensor"
    version = VERSION
    input_shape: tuple[int, ...] = (len(FEATURE_NAMES),)
    label_names = ["next_value_delta", "is_anomaly"]
    feature_names = FEATURE_NAMES

    def __init__(
        self,
        *,
        window: int = 16,
        history: int = 64,
        allowed_lateness_ms: int = 300_000,
        max_sensors: int = 10_000,
        max_state_bytes: int = MAX_STATE_BYTES,
        clock_ms: Callable[[], int] | None = None,
        max_future_ms: int | None = None,
    ) -> None:
        super().__init__(clock_ms, max_future_ms)
        if window < 4:
            raise ValueError(f"window must be >= 4 (lags 1..3 need it), got {window}")
        if history < window + 1:
            raise ValueError(f"history must be >= window + 1 = {window + 1}, got {history}")
        if allowed_lateness_ms < 0 or max_sensors <= 0:
            raise ValueError("allowed_lateness_ms must be >= 0 and max_sensors > 0")
        self.window = window
        self.history = history
        self.allowed_lateness_ms = allowed_lateness_ms
        self.max_sensors = max_sensors
        self.max_state_bytes = max_state_bytes
        self._n = len(FEATURE_NAMES)
        # Centered reading indices and their sum of squares per window length, for the slope.
        self._centered = centered = [[i - (n - 1) / 2.0 for i in range(n)] for n in range(window + 1)]
        self._sxx = [sum(c * c for c in cs) for cs in centered]
        # Per window length n: the n centered indices right-aligned in a row of ``window`` (zeros
        # before them), and their sum of squares (0 for n < 2, where the slope is 0 anyway).
        self._centered_rows = np.array([[0.0] * (window - len(cs)) + cs for cs in centered])
        self._sxx_rows = np.array(self._sxx)
        # Rows are deferred to the batched features only when ``window_features`` and ``_features``
        # come from the same class: a subclass that changes only the per-record features must not
        # get another version's batched ones.
        mro = type(self).__mro__
        self._batched_ok = (next(c for c in mro if "window_features" in vars(c))
                            is next(c for c in mro if "_features" in vars(c)))

    def new_state(self) -> SensorState:
        return SensorState()

    # -- the shared feature function ---------------------------------------------------------

    def window_features(self, buf: SensorBuffer, end: int) -> np.ndarray:
        """Features of the window of ``buf`` ending at index ``end`` (inclusive).

        Plain Python floats over at most ``window`` values, then one float32 array: for 16 values
        this beats numpy's per-call overhead (serving and reproduction featurize one record at a
        time), and the result is the row's own array. The stream worker computes a batch's rows with
        :meth:`window_matrix` instead, which gives the same bits.
        """
        values = buf.values
        start = end - self.window + 1
        if start < 0:
            start = 0
        vals = values[start : end + 1]
        n = end + 1 - start
        value = values[end]
        mean = sum(vals) / n
        # Deviations first (two-pass variance): stable for large offsets with small spread.
        devs = [v - mean for v in vals]
        std = math.sqrt(sum(map(mul, devs, devs)) / n)
        # Least squares on centered indices; sum(c) == 0, so using deviations changes nothing.
        slope = sum(map(mul, self._centered[n], devs)) / self._sxx[n] if n >= 2 else 0.0
        dev = devs[-1]  # value - mean
        z = dev / std if std > 0.0 else 0.0
        if z > Z_CLIP:
            z = Z_CLIP
        elif z < -Z_CLIP:
            z = -Z_CLIP
        times = buf.times
        t = times[end]
        if end >= 1:
            lag1 = value - values[end - 1]
            gap = math.log1p((t - times[end - 1]) / 1000.0)
        else:
            lag1 = gap = 0.0
        lag2 = value - values[end - 2] if end >= 2 else 0.0
        lag3 = value - values[end - 3] if end >= 3 else 0.0
        hs, hc = hour_of_day_sin_cos(t)
        return np.array(
            [value, dev, z, std, min(devs), max(devs), slope, lag1, lag2, lag3, n / self.window, gap, hs, hc],
            dtype=np.float32,
        )

    def window_snapshot(self, buf: SensorBuffer, end: int) -> WindowSnapshot:
        """Copies of what the features of the window ending at ``end`` read: the window's readings
        and the one before it (its gap). Later readings may change ``buf``; a snapshot does not."""
        s0 = end - self.window
        if s0 < 0:
            s0 = 0
        return buf.times[s0 : end + 1], buf.values[s0 : end + 1]

    def window_matrix(self, snapshots: Sequence[WindowSnapshot]) -> np.ndarray:
        """Features of many windows at once, float32 ``(len(snapshots), n_features)``.

        Why numpy over a whole batch: per-record Python arithmetic was most of the stream worker's
        time. The arithmetic lives in :mod:`streaming.features.sensor_batch`, bit-identical to
        :meth:`window_features` (``tests/test_sensor_batch.py``).
        """
        t, v, lens = pack_windows(snapshots, self.window + 1)
        return self._features(t, v, lens)

    def _features(self, t: np.ndarray, v: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """v1's 14 features of windows packed right-aligned in ``t``/``v`` (``lens`` readings each,
        the window plus the reading before it when there is one); see :mod:`.sensor_batch`."""
        return v1_features(t, v, lens, window=self.window, n_features=len(FEATURE_NAMES), z_clip=Z_CLIP,
                           centered_rows=self._centered_rows, sxx_rows=self._sxx_rows)

    # -- training and serving entry points ---------------------------------------------------

    def featurize(self, record: dict[str, Any], state: SensorState) -> FeatureRow:
        """Training row for this reading: features of the previous reading's window (see module doc)."""
        return cast(FeatureRow, self._training_row(record, state, None))

    def featurize_backfill(self, record: dict[str, Any], state: SensorState, run: str) -> FeatureRow:
        """Training row of a backfill run's reading: the run's own per-sensor window, no lateness."""
        return cast(FeatureRow, self._training_row(record, state, run))

    def featurize_event_deferred(self, record: dict[str, Any], state: SensorState,
                                 backfill_run: str | None = None) -> FeatureRow | DeferredRow:
        """The training row of :meth:`featurize_event` with its window snapshotted, for
        :meth:`finish_rows` (when this class's batched features match its ``window_features``)."""
        if not self._batched_ok:
            return self.featurize_event(record, state, backfill_run)
        return self._training_row(record, state, backfill_run, defer=True)

    def finish_rows(self, rows: Sequence[DeferredRow]) -> np.ndarray:
        return self.window_matrix([r.inputs for r in rows])

    def _training_row(self, record: dict[str, Any], state: SensorState, run: str | None,
                      defer: bool = False) -> FeatureRow | DeferredRow:
        sid, t, value, anomaly = self._validate(record)
        buf, i = self._add(state, sid, t, value, anomaly, run)
        if i == 0:
            return FeatureRow(
                np.zeros(self._n, dtype=np.float32), {"next_value_delta": None, "is_anomaly": None}, t, sid
            )
        labels: dict[str, float | None] = {
            "next_value_delta": value - buf.values[i - 1],
            "is_anomaly": buf.anomalies[i - 1],
        }
        if defer:
            return DeferredRow(self.window_snapshot(buf, i - 1), labels, t, sid)
        return FeatureRow(self.window_features(buf, i - 1), labels, t, sid)

    def featurize_for_prediction(self, record: dict[str, Any], state: SensorState) -> FeatureRow:
        """Serving input for this reading: features of the window ending here (predicts the next value).

        ``next_value_delta`` is None (unknown yet); ``is_anomaly`` is this reading's own label.
        """
        sid, t, value, anomaly = self._validate(record)
        buf, i = self._add(state, sid, t, value, anomaly)
        return FeatureRow(
            self.window_features(buf, i), {"next_value_delta": None, "is_anomaly": anomaly}, t, sid
        )

    @staticmethod
    def forecast(last_value: float, predicted_delta: float) -> float:
        """The next-value forecast from a model output: last observed value + predicted change."""
        return last_value + predicted_delta

    # -- internals ---------------------------------------------------------------------------

    def _validate(self, record: dict[str, Any]) -> tuple[str, int, float, float | None]:
        sid = check_key(record, RECORD, "sensor_id")
        t = self.check_event_time(record, RECORD)
        value = record.get("value")
        # The common case inline (a float within the bound: neither NaN nor infinite, since those fail
        # the comparison); anything else goes through check_finite for its value and precise error.
        if type(value) is not float or not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
            value = check_finite(value, RECORD, "value", MAX_ABS_VALUE)
        channels = record.get("values") or {}
        if not isinstance(channels, dict):
            raise FeatureValidationError(f"{RECORD}.values: expected a map of channel -> number")
        for name, v in channels.items():
            if type(v) is not float or not -MAX_ABS_VALUE <= v <= MAX_ABS_VALUE:
                check_finite(v, RECORD, f"values.{name}", MAX_ABS_VALUE)
        label = record.get("label")
        if label is not None and not isinstance(label, bool):
            raise FeatureValidationError(f"{RECORD}.label: expected true, false or null, got {short_repr(label)}")
        return sid, t, value, (None if label is None else float(label))

    @staticmethod
    def state_key(sid: str, run: str | None) -> str:
        """Key of a sensor's buffer: the sensor id live, the run and the id for a backfill run
        (NUL-separated, which no sensor id from a CSV or JSON source contains in practice)."""
        return sid if run is None else f"\x00backfill\x00{run}\x00{sid}"

    def _add(
        self, state: SensorState, sid: str, t: int, value: float, anomaly: float | None, run: str | None = None
    ) -> tuple[SensorBuffer, int]:
        """Insert the reading into its sensor's buffer (LRU-touched only once accepted).

        Returns the buffer and the reading's index in it. A "late" rejection leaves the state
        exactly as it was, so a dead-lettered reading cannot change later features.
        """
        sensors = state.sensors
        key = self.state_key(sid, run)
        buf = sensors.get(key)
        if buf is None:
            buf = SensorBuffer()
            i = self._insert(buf, sid, t, value, anomaly, run)
            sensors[key] = buf
            state.nbytes += entry_bytes(key, len(buf.times))
        else:
            before = len(buf.times)
            i = self._insert(buf, sid, t, value, anomaly, run)
            sensors.move_to_end(key)
            state.nbytes += (len(buf.times) - before) * READING_BYTES
        self._evict(state)
        return buf, i

    def _evict(self, state: SensorState) -> None:
        """Forget least recently seen sensors beyond ``max_sensors`` or ``max_state_bytes`` (never the
        newest one, which one reading can never push over the byte bound: ids are capped)."""
        sensors = state.sensors
        while len(sensors) > 1 and (len(sensors) > self.max_sensors or state.nbytes > self.max_state_bytes):
            old_sid, old = sensors.popitem(last=False)
            state.nbytes -= entry_bytes(old_sid, len(old.times))

    def _insert(self, buf: SensorBuffer, sid: str, t: int, value: float, anomaly: float | None,
                run: str | None = None) -> int:
        """Insert a reading in event-time order; return its index after trimming. Raises "late"."""
        times = buf.times
        n = len(times)
        if n == 0 or t >= times[-1]:
            i = n
        else:
            # Lateness counts from the latest reading, but never from beyond the clock: an accepted
            # reading up to max_future_ms ahead cannot make later real readings late.
            latest = min(times[-1], self._clock_ms())
            if run is None and t < latest - self.allowed_lateness_ms:
                raise FeatureValidationError(
                    f"{RECORD}.timestamp: late reading for sensor {sid!r}: {t} is older than the "
                    f"sensor's latest event time {latest} minus the allowed lateness "
                    f"{self.allowed_lateness_ms} ms; to load history publish it with --backfill"
                )
            i = bisect_right(times, t)
            removed = max(0, n + 1 - self.history)
            if (buf.trimmed or removed) and i - removed < self.window:
                hint = ("sort the backfill by time per sensor" if run is not None
                        else "raise the featurizer's history")
                raise FeatureValidationError(
                    f"{RECORD}.timestamp: late reading for sensor {sid!r}: {t} falls before the "
                    f"{self.history} retained readings' window; {hint}"
                )
        times.insert(i, t)
        buf.values.insert(i, value)
        buf.anomalies.insert(i, anomaly)
        excess = len(times) - self.history
        if excess > 0:
            del times[:excess], buf.values[:excess], buf.anomalies[:excess]
            buf.trimmed = True
            i -= excess
        return i

    # -- checkpointing -----------------------------------------------------------------------

    def state_settings(self) -> dict[str, Any]:
        return {"window": self.window, "history": self.history}

    def state_to_json(self, state: SensorState) -> str:
        return self.dump_state({"sensors": [[sid, buf.as_json()] for sid, buf in state.sensors.items()]})

    def state_from_json(self, text: str) -> SensorState:
        return self.load_state(text, self._restore)

    def _restore(self, doc: dict[str, Any]) -> SensorState:
        state = SensorState()
        for sid, b in doc["sensors"][-self.max_sensors :]:
            buf = SensorBuffer()
            buf.times = [int(v) for v in b["t"]]
            buf.values = [float(v) for v in b["v"]]
            buf.anomalies = [None if v is None else float(v) for v in b["a"]]
            buf.trimmed = bool(b["trimmed"])
            if not (len(buf.times) == len(buf.values) == len(buf.anomalies)) or buf.times != sorted(buf.times):
                raise FeatureStateError(f"state: inconsistent buffer for sensor {sid!r}")
            state.sensors[str(sid)] = buf
            state.nbytes += entry_bytes(str(sid), len(buf.times))
        self._evict(state)
        return state


register("sensor", VERSION, SensorFeaturizer, current=True)
