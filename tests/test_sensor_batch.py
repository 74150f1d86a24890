"""The stream worker's batched sensor window features are bit-identical to the per-record ones.

Why bit for bit: the worker computes a batch's rows with ``window_matrix`` (numpy over the batch),
serving and ``retrain --reproduce`` one row at a time with ``window_features`` (plain Python), and
reproduction compares the two by sha256; a model must see the very features it was trained on.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from streaming.features import get_featurizer
from streaming.features.sensor import SensorBuffer, SensorFeaturizer

VERSIONS = ["sensor-v1", "sensor-v2", "sensor-v3"]


def _values(rng: random.Random, n: int) -> list[float]:
    style = rng.randrange(6)
    if style == 0:  # ties and signed zeros
        return [rng.choice([0.0, -0.0, 1.0, -1.0, 0.5]) for _ in range(n)]
    if style == 1:  # a large level with a tiny spread (cancellation)
        return [1e8 + rng.random() * 1e-3 for _ in range(n)]
    if style == 2:  # the validated extremes
        return [rng.choice([1e9, -1e9, 1e-300, 3.0]) for _ in range(n)]
    if style == 3:  # spikes
        return [20.0 + rng.gauss(0, 0.3) + (500.0 if rng.random() < 0.1 else 0.0) for _ in range(n)]
    return [rng.uniform(-1e3, 1e3) for _ in range(n)]


def _times(rng: random.Random, n: int) -> list[int]:
    t = rng.choice([-9_000_000_000_000, 0, 1_700_000_000_000])
    out = []
    for _ in range(n):
        t += rng.choice([0, 1, 7, 1000, 60_000, 86_400_000, rng.randrange(1, 10**9)])
        out.append(t)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_batched_rows_equal_the_per_record_rows_bit_for_bit(version: str) -> None:
    fz = get_featurizer("sensor", version)
    assert isinstance(fz, SensorFeaturizer)
    rng = random.Random(version)
    snaps, expected = [], []
    for _ in range(150):
        n = rng.randrange(1, 2 * fz.window + 4)
        buf = SensorBuffer()
        buf.times, buf.values = _times(rng, n), _values(rng, n)
        for end in range(n):
            expected.append(fz.window_features(buf, end))
            snaps.append(fz.window_snapshot(buf, end))
    batched = fz.window_matrix(snaps)
    assert batched.dtype == np.float32 and batched.shape == (len(snaps), fz.n_features)
    for i, (got, want) in enumerate(zip(batched, expected, strict=True)):
        assert got.tobytes() == want.tobytes(), (version, i, snaps[i], got, want)
    # any split of the batch gives the same rows (a row never depends on its neighbours)
    assert fz.window_matrix(snaps[:1]).tobytes() == expected[0].tobytes()
    assert fz.window_matrix(snaps[7:40]).tobytes() == np.stack(expected[7:40]).tobytes()
