"""Batched (numpy) sensor-v1 window features: the stream worker's fast path for a batch's rows.

Why a module of its own: :mod:`streaming.features.sensor` holds the featurizer's semantics (the
per-record ``window_features``, lateness, state and checkpoints); this module holds only the
whole-batch numpy version of the same arithmetic, which is long and exists purely for speed.
Every operation keeps the exact floating-point result of the scalar formulas (sums added left to
right, stable sorts, ``math`` for the transcendental functions, Python's ``min``/``max`` tie rules),
so the rows do not depend on how many are computed together (``tests/test_sensor_batch.py`` checks
them bit for bit against the scalar code).

The featurizer keeps thin ``window_matrix``/``_features`` methods that call these functions, so
subclasses (sensor-v2, v3) still extend ``_features`` with ``super()`` as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from streaming.features.base import hour_of_day_sin_cos

WindowSnapshot = tuple[list[int], list[float]]
"""``(times, values)`` of a window and the reading before it (see ``SensorFeaturizer.window_snapshot``)."""


def clip_like_python(a: np.ndarray, bound: float) -> np.ndarray:
    """``bound if a > bound else (-bound if a < -bound else a)`` per element (keeps -0.0 as it is)."""
    return np.where(a > bound, bound, np.where(a < -bound, -bound, a))


def pack_windows(snapshots: Sequence[WindowSnapshot], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snapshots packed right-aligned and zero-padded into ``(t, v, lens)`` arrays of ``width`` columns."""
    k = len(snapshots)
    flat_t: list[int] = []
    flat_v: list[float] = []
    lens: list[int] = []
    zt, zv = [0] * width, [0.0] * width
    for times, values in snapshots:
        pad = width - len(values)
        if pad:
            flat_t += zt[:pad]
            flat_v += zv[:pad]
        flat_t += times
        flat_v += values
        lens.append(len(values))
    t = np.array(flat_t, dtype=np.int64).reshape(k, width)
    v = np.array(flat_v, dtype=np.float64).reshape(k, width)
    return t, v, np.array(lens, dtype=np.int64)


def v1_features(t: np.ndarray, v: np.ndarray, lens: np.ndarray, *, window: int, n_features: int,
                z_clip: float, centered_rows: np.ndarray, sxx_rows: np.ndarray) -> np.ndarray:
    """v1's features of windows packed right-aligned in ``t``/``v`` (``lens`` readings each,
    the window plus the reading before it when there is one), float32 ``(k, n_features)``."""
    w = window
    k = len(lens)
    n = np.minimum(lens, w)  # readings in each window
    vw = v[:, 1:]  # the windows, zero-padded on the left
    valid = np.arange(w) >= (w - n)[:, None]
    nf = n.astype(np.float64)
    total = np.zeros(k)
    for j in range(w):  # left to right like sum(): padding adds 0.0 before the first reading
        total += vw[:, j]
    mean = total / nf
    devs = np.where(valid, vw - mean[:, None], 0.0)
    sq = np.zeros(k)
    for j in range(w):
        sq += devs[:, j] * devs[:, j]
    std = np.sqrt(sq / nf)
    centered = centered_rows[n]
    sc = np.zeros(k)
    for j in range(w):
        sc += centered[:, j] * devs[:, j]
    two = n >= 2
    slope = np.where(two, sc / np.where(two, sxx_rows[n], 1.0), 0.0)
    value = vw[:, -1]
    dev = devs[:, -1]
    z = clip_like_python(np.where(std > 0.0, dev / np.where(std > 0.0, std, 1.0), 0.0), z_clip)
    lo, hi = np.full(k, np.inf), np.full(k, -np.inf)
    for j in range(w):  # min()/max() keep the first of equal values (-0.0 vs 0.0)
        col = devs[:, j]
        lo = np.where(valid[:, j] & (col < lo), col, lo)
        hi = np.where(valid[:, j] & (col > hi), col, hi)
    lag1 = np.where(two, value - vw[:, -2], 0.0)
    lag2 = np.where(n >= 3, value - vw[:, -3], 0.0)
    lag3 = np.where(n >= 4, value - vw[:, -4], 0.0)
    extra = []  # the transcendental functions through math, one call per value as the scalar code
    for tt, tp, nn in zip(t[:, -1].tolist(), t[:, -2].tolist(), n.tolist(), strict=True):
        hs, hc = hour_of_day_sin_cos(tt)
        extra.append((math.log1p((tt - tp) / 1000.0) if nn >= 2 else 0.0, hs, hc))
    out = np.empty((k, n_features), dtype=np.float32)
    for c, col in enumerate((value, dev, z, std, lo, hi, slope, lag1, lag2, lag3, nf / w)):
        out[:, c] = col
    out[:, 11:14] = np.array(extra, dtype=np.float64).reshape(k, 3)
    return out
