"""sensor-v1: rolling stats of known sequences, the one-step-back training row, lateness, checkpoints."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.exceptions import FeatureValidationError
from streaming.features import FeatureStateError, get_featurizer
from streaming.features.sensor import SensorFeaturizer

T0 = 1_700_000_000_000  # 80 000 s into the UTC day
NOW = T0 + 3_600_000


def fz(**kw: Any) -> SensorFeaturizer:
    return SensorFeaturizer(clock_ms=lambda: NOW, **kw)


def reading(
    value: float, dt_ms: int, sid: str = "s1", label: bool | None = None, **over: Any
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "sensor_id": sid,
        "timestamp": T0 + dt_ms,
        "value": value,
        "values": {},
        "unit": "celsius",
        "label": label,
        "event_id": None,
    }
    r.update(over)
    return r


def named(f: SensorFeaturizer, x: np.ndarray) -> dict[str, float]:
    return dict(zip(f.feature_names, x.tolist(), strict=True))


def test_rolling_stats_of_a_known_sequence() -> None:
    f = fz()
    s = f.new_state()
    rows = [f.featurize(reading(v, i * 1000), s) for i, v in enumerate([1.0, 2.0, 4.0, 7.0, 11.0])]
    # The row of reading 11.0 describes the window [1, 2, 4, 7] ending at 7.0 and labels the change 7 -> 11.
    last = rows[-1]
    assert last.labels == {"next_value_delta": 4.0, "is_anomaly": None}
    assert last.event_time_ms == T0 + 4000 and last.key == "s1"
    std = math.sqrt(21 / 4)  # deviations from the mean 3.5: -2.5 -1.5 0.5 3.5
    expected = {
        "value": 7.0,
        "value_minus_mean": 3.5,
        "zscore": 3.5 / std,
        "rolling_std": std,
        "min_minus_mean": -2.5,
        "max_minus_mean": 3.5,
        "slope": 2.0,  # sum((i - 1.5) * v) / sum((i - 1.5)^2) = 10 / 5
        "lag1_diff": 3.0,
        "lag2_diff": 5.0,
        "lag3_diff": 6.0,
        "window_fill": 4 / 16,
        "log1p_gap_s": math.log1p(1.0),
        "hour_sin": math.sin(2 * math.pi * 80_003 / 86_400),
        "hour_cos": math.cos(2 * math.pi * 80_003 / 86_400),
    }
    np.testing.assert_array_equal(last.x, np.array([expected[n] for n in f.feature_names], dtype=np.float32))
    assert [r.labels["next_value_delta"] for r in rows] == [None, 1.0, 2.0, 3.0, 4.0]


def test_first_reading_has_no_example() -> None:
    f = fz()
    row = f.featurize(reading(5.0, 0), f.new_state())
    assert row.x.shape == (14,) and not row.x.any()
    assert row.labels == {"next_value_delta": None, "is_anomaly": None}


def test_window_slides_over_the_last_w_readings() -> None:
    f = fz(window=4, history=6)
    s = f.new_state()
    for i, v in enumerate([100.0, 100.0, 1.0, 2.0, 3.0, 4.0, 5.0]):
        row = f.featurize(reading(v, i * 1000), s)
    v = named(f, row.x)  # window [1, 2, 3, 4] ending at 4.0; the two 100s have slid out
    assert v["value"] == 4.0 and v["value_minus_mean"] == 1.5 and v["slope"] == 1.0
    assert v["window_fill"] == 1.0
    assert len(s.sensors["s1"].times) == 6


def test_training_row_equals_the_previous_prediction_row() -> None:
    """Both paths use the same feature function: train x(t) == serve x(t-1)."""
    f = fz(window=4, history=6)
    train, serve = f.new_state(), f.new_state()
    values = [3.0, -1.5, 2.25, 8.0, 8.0, 0.5, 9.75, -4.0, 1.0, 2.0]
    served = []
    for i, val in enumerate(values):
        trained = f.featurize(reading(val, i * 1500, label=(i % 3 == 0)), train)
        if served:
            np.testing.assert_array_equal(trained.x, served[-1].x)
            assert trained.labels["is_anomaly"] == served[-1].labels["is_anomaly"]
            assert f.forecast(values[i - 1], trained.labels["next_value_delta"] or 0.0) == val
        served.append(f.featurize_for_prediction(reading(val, i * 1500, label=(i % 3 == 0)), serve))
    assert served[-1].labels == {"next_value_delta": None, "is_anomaly": 1.0}  # i = 9: its own label
    assert named(f, served[-1].x)["value"] == 2.0


def test_anomaly_label_belongs_to_the_window_end() -> None:
    f = fz()
    s = f.new_state()
    f.featurize(reading(1.0, 0, label=True), s)
    row = f.featurize(reading(2.0, 1000, label=False), s)
    assert row.labels["is_anomaly"] == 1.0
    assert f.featurize(reading(3.0, 2000), s).labels["is_anomaly"] == 0.0
    assert f.featurize(reading(4.0, 3000), s).labels["is_anomaly"] is None


def test_out_of_order_within_lateness_is_inserted_in_event_time_order() -> None:
    f = fz(allowed_lateness_ms=10_000)
    s = f.new_state()
    f.featurize(reading(1.0, 0), s)
    f.featurize(reading(5.0, 4000), s)
    row = f.featurize(reading(2.0, 2000), s)  # late by 2 s: lands between 0 s and 4 s
    assert s.sensors["s1"].values == [1.0, 2.0, 5.0]
    assert row.labels["next_value_delta"] == 1.0  # 2.0 - its predecessor 1.0
    assert named(f, row.x)["value"] == 1.0
    nxt = f.featurize(reading(6.0, 5000), s)
    assert named(f, nxt.x)["lag1_diff"] == 3.0 and named(f, nxt.x)["lag2_diff"] == 4.0


def test_reading_older_than_lateness_is_rejected_as_late() -> None:
    f = fz(allowed_lateness_ms=10_000)
    s = f.new_state()
    f.featurize(reading(1.0, 20_000), s)
    f.featurize(reading(1.0, 0, sid="other"), s)
    before = f.state_to_json(s)
    with pytest.raises(FeatureValidationError, match=r"SensorReading\.timestamp: late reading"):
        f.featurize(reading(1.0, 9_999), s)
    assert f.state_to_json(s) == before  # not even the LRU order moved
    f.featurize(reading(1.0, 10_000), s)  # exactly at the allowance is still accepted
    assert list(s.sensors) == ["other", "s1"]


def test_reading_deeper_than_retained_history_is_late() -> None:
    f = fz(window=4, history=6, allowed_lateness_ms=3_600_000)
    s = f.new_state()
    for i in range(8):
        f.featurize(reading(float(i), i * 1000), s)
    with pytest.raises(FeatureValidationError, match="late reading.*retained"):
        f.featurize(reading(0.5, 3_500), s)  # only 2000 and 3000 ms retained before it
    row = f.featurize(reading(0.5, 6_500), s)  # 4 retained readings before it: window complete
    assert row.labels["next_value_delta"] == 0.5 - 6.0 and named(f, row.x)["window_fill"] == 1.0


@pytest.mark.parametrize(
    ("over", "pattern"),
    [
        ({"value": float("nan")}, r"SensorReading\.value: NaN"),
        ({"value": float("inf")}, r"SensorReading\.value: inf"),
        ({"value": float("-inf")}, r"SensorReading\.value: -inf"),
        ({"value": 2e9}, r"SensorReading\.value: absurd magnitude"),
        ({"value": "3"}, r"SensorReading\.value: expected a number"),
        ({"values": {"humidity": float("nan")}}, r"SensorReading\.values\.humidity: NaN"),
        ({"timestamp": -9_300_000_000_000}, r"SensorReading\.timestamp: .*before 1678-01-01"),
        ({"timestamp": NOW + 86_400_001}, r"SensorReading\.timestamp: .*future"),
        ({"timestamp": float(T0)}, r"SensorReading\.timestamp: expected int"),
        ({"label": "yes"}, r"SensorReading\.label"),
        ({"sensor_id": ""}, r"SensorReading\.sensor_id"),
    ],
)
def test_validation_errors(over: dict[str, Any], pattern: str) -> None:
    f = fz()
    s = f.new_state()
    bad = reading(1.0, 0) | over
    with pytest.raises(FeatureValidationError, match=pattern):
        f.featurize(bad, s)
    with pytest.raises(FeatureValidationError, match=pattern):
        f.featurize_for_prediction(bad, s)
    assert s == f.new_state()


def test_sensors_tracked_are_bounded_lru() -> None:
    f = fz(max_sensors=2)
    s = f.new_state()
    for sid in ("a", "b", "a", "c"):
        f.featurize(reading(1.0, 0, sid=sid), s)
    assert list(s.sensors) == ["a", "c"]


def test_json_round_trip_continues_identically() -> None:
    f = fz(window=4, history=6, max_sensors=2, allowed_lateness_ms=5_000)
    events = []
    for i in range(30):
        dt = i * 1000 - (2500 if i % 7 == 3 else 0)  # some readings arrive late, within lateness
        label = (i % 4 == 0) if i % 2 else None
        events.append(reading(math.sin(i) * 10 + i, dt, sid=f"s{i % 3}", label=label))
    s1 = f.new_state()
    straight = [f.featurize(e, s1) for e in events]
    s2 = f.new_state()
    resumed = [f.featurize(e, s2) for e in events[:13]]
    text = f.state_to_json(s2)
    s3 = fz(window=4, history=6, max_sensors=2, allowed_lateness_ms=5_000).state_from_json(text)
    assert s3 == s2 and f.state_to_json(s3) == text
    resumed += [f.featurize(e, s3) for e in events[13:]]
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        assert a.labels == b.labels
    assert f.state_to_json(s3) == f.state_to_json(s1)


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=40),
    cut=st.integers(min_value=0, max_value=40),
)
def test_round_trip_property(values: list[float], cut: int) -> None:
    f = fz(window=4, history=5)
    s1, s2 = f.new_state(), f.new_state()
    a = [f.featurize(reading(v, i * 10), s1).x for i, v in enumerate(values)]
    b = []
    for i, v in enumerate(values):
        if i == cut:
            s2 = f.state_from_json(f.state_to_json(s2))
        b.append(f.featurize(reading(v, i * 10), s2).x)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_state_from_json_rejects_other_settings_and_garbage() -> None:
    f = fz()
    with pytest.raises(FeatureStateError, match="window="):
        fz(window=8).state_from_json(f.state_to_json(f.new_state()))
    with pytest.raises(FeatureStateError, match="state"):
        f.state_from_json('{"featurizer": "sensor-v1"}')
    with pytest.raises(FeatureStateError, match="weblog-v"):
        f.state_from_json(get_featurizer("weblog").state_to_json(get_featurizer("weblog").new_state()))
