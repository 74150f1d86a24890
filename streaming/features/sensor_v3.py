"""Sensor featurizer ``sensor-v3``: ``sensor-v2`` plus robust (median-based) level features.

Why: the window *mean* and *std* of v1/v2 are dragged by a single spike for the ``window``
readings that follow it, so the forecaster saw a level that was off by a spike's 1/16 and a
spread inflated tenfold. On the generated sensor stream a plain "next value = median of the
last 16 readings" forecast scores 0.66x persistence's MAE, while the v2 network reached 0.83x.
The median is what a forecaster of a noisy level wants to anchor on; v3 gives it to the model:

=======================  ==================================================================
``value_minus_median``   value - median of the window (the move back to the robust level)
``value_minus_median5``  value - median of the last 5 readings (a level that follows trends)
``mad``                  median absolute deviation from the window median (robust spread)
``robust_z``             value_minus_median / (1.4826 * mad), 0 when mad is 0, clipped +-10
=======================  ==================================================================

The two ``value_minus_*`` features are in value units on purpose: the built-in forecaster uses
them as anchors of its delta output (``trainer/specs/sensor.py``), so a spike of any size is
answered by the move back to the level, not by a standardized input clipped at the guard's bound.

Everything else (the first 18 features, labels, one-step-back training rows, prediction rows,
event-time rules, checkpoints) is exactly v2's; v1 and v2 stay registered, so models trained on
them keep being served with them, and a v2 batch (18 features) never trains a v3 model silently:
the trainer refuses rows of another width (``LineageError``).
"""

from __future__ import annotations

import numpy as np

from streaming.features.base import register
from streaming.features.sensor import SensorBuffer
from streaming.features.sensor_v2 import FEATURE_NAMES as V2_NAMES
from streaming.features.sensor_v2 import RATIO_CLIP, SensorFeaturizerV2

VERSION = "sensor-v3"
SHORT_WINDOW = 5
#: MAD x this is the standard deviation of normally distributed readings.
MAD_TO_STD = 1.4826

FEATURE_NAMES = [*V2_NAMES, "value_minus_median", "value_minus_median5", "mad", "robust_z"]


def _median(sorted_vals: list[float]) -> float:
    n = len(sorted_vals)
    mid = n // 2
    return sorted_vals[mid] if n % 2 else 0.5 * (sorted_vals[mid - 1] + sorted_vals[mid])


def _row_medians(padded: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of the first ``counts[r]`` values of each row after a stable sort (padding is +inf):
    the middle one, or the mean of the two middle ones, as of ``sorted(values)``."""
    ordered = np.sort(padded, axis=1, kind="stable")  # stable: equal values (-0.0, 0.0) keep their order
    rows = np.arange(len(counts))
    mid = counts // 2
    upper = ordered[rows, mid]
    lower = ordered[rows, np.maximum(mid - 1, 0)]
    return np.where(counts % 2 == 1, upper, 0.5 * (lower + upper))


class SensorFeaturizerV3(SensorFeaturizerV2):
    """v2's features plus median-anchored level and spread (see the module docstring)."""

    version = VERSION
    input_shape: tuple[int, ...] = (len(FEATURE_NAMES),)
    feature_names = FEATURE_NAMES

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._n = len(FEATURE_NAMES)

    def window_features(self, buf: SensorBuffer, end: int) -> np.ndarray:
        base = super().window_features(buf, end)
        values = buf.values
        start = max(0, end - self.window + 1)
        vals = values[start : end + 1]
        value = values[end]
        median = _median(sorted(vals))
        short = _median(sorted(values[max(start, end - SHORT_WINDOW + 1) : end + 1]))
        mad = _median(sorted(abs(v - median) for v in vals))
        dev = value - median
        robust_z = dev / (MAD_TO_STD * mad) if mad > 0.0 else 0.0
        robust_z = max(-RATIO_CLIP, min(RATIO_CLIP, robust_z))
        out = np.empty(self._n, dtype=np.float32)
        out[: len(V2_NAMES)] = base[: len(V2_NAMES)]
        out[len(V2_NAMES):] = (dev, value - short, mad, robust_z)
        return out

    def _features(self, t: np.ndarray, v: np.ndarray, lens: np.ndarray) -> np.ndarray:
        base = super()._features(t, v, lens)
        w = self.window
        k = len(lens)
        n = np.minimum(lens, w)
        vw = v[:, 1:]
        value = vw[:, -1]
        valid = np.arange(w) >= (w - n)[:, None]
        median = _row_medians(np.where(valid, vw, np.inf), n)
        m5 = np.minimum(n, SHORT_WINDOW)
        short = _row_medians(np.where(np.arange(SHORT_WINDOW) >= (SHORT_WINDOW - m5)[:, None],
                                      vw[:, -SHORT_WINDOW:], np.inf), m5)
        mad = _row_medians(np.where(valid, np.abs(vw - median[:, None]), np.inf), n)
        dev = value - median
        robust_z = np.where(mad > 0.0, dev / np.where(mad > 0.0, MAD_TO_STD * mad, 1.0), 0.0)
        robust_z = np.where(robust_z < RATIO_CLIP, robust_z, RATIO_CLIP)  # min(RATIO_CLIP, z)
        robust_z = np.where(robust_z > -RATIO_CLIP, robust_z, -RATIO_CLIP)  # max(-RATIO_CLIP, z)
        out = np.empty((k, self._n), dtype=np.float32)
        out[:, : len(V2_NAMES)] = base[:, : len(V2_NAMES)]
        for c, col in enumerate((dev, value - short, mad, robust_z)):
            out[:, len(V2_NAMES) + c] = col
        return out


register("sensor", VERSION, SensorFeaturizerV3, current=True)
