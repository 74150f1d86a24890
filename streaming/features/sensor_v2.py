"""Sensor featurizer ``sensor-v2``: ``sensor-v1`` made to work for any cadence, sub-second to yearly.

What changed from v1 (v1 stays registered, so models trained on it keep being served with it):

* **history**: event times back to 1678-01-01 are accepted (v1: from 2000), so a decades-long
  weekly series or a yearly one from 1700 featurizes; the future bound and lateness rules are v1's;
* ``log_gap_s`` replaces ``log1p_gap_s``: ``ln(seconds since the previous reading)`` floored at
  1 ms. log1p squashed every sub-second cadence to ~0 (10 ms and 100 ms were 0.01 and 0.1) while a
  yearly gap is 17.3; the plain log separates 1 ms (-6.9) .. 1 year (17.3) evenly;
* ``gap_vs_typical``: ``ln(gap / median gap of the window)``, clipped to +-10: a missing week in a
  weekly series or a stall in a 100 Hz stream reads the same whatever the cadence;
* ``lag1_z``: the last change in units of the window's spread (clipped to +-10), a per-sensor
  normalised value feature, so sensors with levels in the hundreds and in the thousandths look alike;
* ``doy_sin``/``doy_cos``: the position in the (mean Gregorian) year, which carries the seasonality
  of daily/weekly/monthly series; for a yearly series they are constant and the model's input guard
  ignores them (trainer.specs.guard), as it ignores ``hour_sin``/``hour_cos`` of daily readings.

Labels, training rows one step back, prediction rows and checkpoints are exactly v1's.
"""

from __future__ import annotations

import math

import numpy as np

from streaming.features.base import HISTORICAL_MIN_EVENT_TIME_MS, register
from streaming.features.sensor import FEATURE_NAMES as V1_NAMES
from streaming.features.sensor import SensorBuffer, SensorFeaturizer, clip_like_python

VERSION = "sensor-v2"
GAP_FLOOR_S = 0.001
RATIO_CLIP = 10.0
YEAR_S = 365.2425 * 86_400.0
_GAP_INDEX = V1_NAMES.index("log1p_gap_s")

FEATURE_NAMES = [*V1_NAMES[:_GAP_INDEX], "log_gap_s", *V1_NAMES[_GAP_INDEX + 1:],
                 "gap_vs_typical", "lag1_z", "doy_sin", "doy_cos"]


def day_of_year_sin_cos(event_time_ms: int) -> tuple[float, float]:
    """Position of an event time in the mean Gregorian year on the unit circle (any sign of time)."""
    frac = (event_time_ms / 1000.0 / YEAR_S) % 1.0
    angle = 2.0 * math.pi * frac
    return math.sin(angle), math.cos(angle)


def _clip(v: float, bound: float) -> float:
    return bound if v > bound else (-bound if v < -bound else v)


class SensorFeaturizerV2(SensorFeaturizer):
    """v1's windows with cadence-free gap features, a normalised change and the day of year."""

    version = VERSION
    input_shape: tuple[int, ...] = (len(FEATURE_NAMES),)
    feature_names = FEATURE_NAMES
    min_event_time_ms = HISTORICAL_MIN_EVENT_TIME_MS

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._n = len(FEATURE_NAMES)

    def window_features(self, buf: SensorBuffer, end: int) -> np.ndarray:
        base = super().window_features(buf, end)
        times = buf.times
        t = times[end]
        start = max(0, end - self.window + 1)
        if end >= 1:
            gap_s = (t - times[end - 1]) / 1000.0
            log_gap = math.log(max(gap_s, GAP_FLOOR_S))
            gaps = sorted(times[i] - times[i - 1] for i in range(max(start, 1), end + 1))
            typical_s = gaps[len(gaps) // 2] / 1000.0
            ratio = _clip(math.log(max(gap_s, GAP_FLOOR_S) / max(typical_s, GAP_FLOOR_S)), RATIO_CLIP)
        else:
            log_gap = ratio = 0.0
        std = float(base[V1_NAMES.index("rolling_std")])
        lag1 = float(base[V1_NAMES.index("lag1_diff")])
        lag1_z = _clip(lag1 / std, RATIO_CLIP) if std > 0.0 else 0.0
        ds, dc = day_of_year_sin_cos(t)
        out = np.empty(self._n, dtype=np.float32)
        out[: len(V1_NAMES)] = base
        out[_GAP_INDEX] = log_gap
        out[len(V1_NAMES):len(FEATURE_NAMES)] = (ratio, lag1_z, ds, dc)
        return out

    def _features(self, t: np.ndarray, v: np.ndarray, lens: np.ndarray) -> np.ndarray:
        base = super()._features(t, v, lens)
        w = self.window
        k = len(lens)
        gaps = lens - 1  # gaps inside the snapshot: the window's, and the one before it when known
        diffs = t[:, 1:] - t[:, :-1]
        known = np.arange(w) >= (w - gaps)[:, None]
        ordered = np.sort(np.where(known, diffs, np.iinfo(np.int64).max), axis=1)
        typical = ordered[np.arange(k), gaps // 2].tolist()  # the upper median, as gaps[len // 2]
        rows = []  # math's log/sin/cos per value, as the scalar code
        for tt, tp, nn, typ in zip(t[:, -1].tolist(), t[:, -2].tolist(), lens.tolist(), typical, strict=True):
            if nn >= 2:
                gap_s = (tt - tp) / 1000.0
                log_gap = math.log(max(gap_s, GAP_FLOOR_S))
                ratio = _clip(math.log(max(gap_s, GAP_FLOOR_S) / max(typ / 1000.0, GAP_FLOOR_S)), RATIO_CLIP)
            else:
                log_gap = ratio = 0.0
            ds, dc = day_of_year_sin_cos(tt)
            rows.append((log_gap, ratio, ds, dc))
        extra = np.array(rows, dtype=np.float64).reshape(k, 4)
        # the change in units of spread reads the rounded (float32) std and lag, as v2 always has
        std = base[:, V1_NAMES.index("rolling_std")].astype(np.float64)
        lag1 = base[:, V1_NAMES.index("lag1_diff")].astype(np.float64)
        lag1_z = clip_like_python(np.where(std > 0.0, lag1 / np.where(std > 0.0, std, 1.0), 0.0), RATIO_CLIP)
        out = np.empty((k, self._n), dtype=np.float32)
        out[:, : len(V1_NAMES)] = base
        out[:, _GAP_INDEX] = extra[:, 0]
        out[:, len(V1_NAMES)] = extra[:, 1]
        out[:, len(V1_NAMES) + 1] = lag1_z
        out[:, len(V1_NAMES) + 2 : len(FEATURE_NAMES)] = extra[:, 2:]
        return out


register("sensor", VERSION, SensorFeaturizerV2, current=False)
