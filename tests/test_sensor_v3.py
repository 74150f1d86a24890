"""sensor-v3: robust (median) level features on known sequences, v2's features unchanged, and the
forecaster's level anchors (bounded by training, ignored when constant, saved with the weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streaming.features import get_featurizer
from streaming.features.sensor_v3 import MAD_TO_STD

T0 = 1_700_000_000_000


def _reading(value: float, i: int, sid: str = "s1") -> dict:
    return {"sensor_id": sid, "timestamp": T0 + i * 60_000, "value": value, "values": {}, "label": None}


def test_v3_is_current_and_extends_v2_with_median_features() -> None:
    v2, v3 = get_featurizer("sensor", "sensor-v2"), get_featurizer("sensor")
    assert v3.version == "sensor-v3" and v3.n_features == 22 and v3.input_shape == (22,)
    assert list(v3.feature_names[:18]) == list(v2.feature_names)
    assert list(v3.feature_names[18:]) == ["value_minus_median", "value_minus_median5", "mad", "robust_z"]
    s2, s3 = v2.new_state(), v3.new_state()
    values = [20.0, 20.3, 19.8, 20.1, 60.0, 20.2, 19.9, 20.0, 20.4, 19.7]
    for i, v in enumerate(values):
        r2, r3 = v2.featurize(_reading(v, i), s2), v3.featurize(_reading(v, i), s3)
        np.testing.assert_array_equal(r2.x, r3.x[:18])  # the first 18 are exactly v2's
        assert r2.labels == r3.labels
    # the last row describes the window ending at 20.4 (index 8): a spike of 60 sits in it
    named = dict(zip(v3.feature_names, r3.x.tolist(), strict=True))
    window = np.array(values[:9])
    median = float(np.median(window))
    mad = float(np.median(np.abs(window - median)))
    assert named["value_minus_median"] == pytest.approx(20.4 - median, abs=1e-5)
    assert named["value_minus_median5"] == pytest.approx(20.4 - float(np.median(values[4:9])), abs=1e-5)
    assert named["mad"] == pytest.approx(mad, abs=1e-5)
    assert named["robust_z"] == pytest.approx((20.4 - median) / (MAD_TO_STD * mad), abs=1e-4)
    # the mean is dragged by the spike, the median is not
    assert abs(named["value_minus_mean"]) > 3.0 and abs(named["value_minus_median"]) < 0.5


def test_v3_serving_row_equals_the_next_training_row_and_robust_z_is_clipped() -> None:
    fz = get_featurizer("sensor")
    train, serve = fz.new_state(), fz.new_state()
    values = [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 500.0, 5.0]
    served = []
    for i, v in enumerate(values):
        trained = fz.featurize(_reading(v, i), train)
        if served:
            np.testing.assert_array_equal(trained.x, served[-1].x)
        served.append(fz.featurize_for_prediction(_reading(v, i), serve))
    spike = dict(zip(fz.feature_names, served[6].x.tolist(), strict=True))
    assert spike["mad"] == 0.0 and spike["robust_z"] == 0.0  # no spread: no ratio, never inf
    assert spike["value_minus_median"] == pytest.approx(495.0)
    state = fz.new_state()
    for i, v in enumerate([5.0, 5.1, 4.9, 5.0, 5.2, 500.0]):
        row = fz.featurize_for_prediction(_reading(v, i), state)
    assert dict(zip(fz.feature_names, row.x.tolist(), strict=True))["robust_z"] == 10.0


def test_a_v2_batch_cannot_train_the_v3_forecaster(tmp_path: Path) -> None:
    from streaming.store import FeatureStore
    from trainer.data import load_batches
    from trainer.exceptions import LineageError
    from trainer.spec import load_spec
    from trainer.synthetic import write_batches

    spec = load_spec("sensor_forecaster")
    assert spec.featurizer_version == "sensor-v3"
    store = FeatureStore(tmp_path / "features")
    records = [_reading(20.0 + (i % 3) * 0.1, i) for i in range(30)]
    batches = write_batches(store, "sensor", records, batch_size=30, topic="sensor.raw", version="sensor-v2")
    with pytest.raises(LineageError, match="another featurizer version"):
        load_batches(spec, batches, spec.features().n_features)


def test_anchor_bounds_come_from_training_and_ignore_constant_columns() -> None:
    from trainer.specs.anchor import anchor_bounds

    x = np.array([[1.0, -40.0, 3.0], [0.5, 2.0, 3.0], [-2.0, 0.1, 3.0]], np.float32)
    np.testing.assert_allclose(anchor_bounds(x, [0, 1, 2]), [2.0, 40.0, 0.0])
    assert anchor_bounds(np.zeros((0, 3), np.float32), [1]).tolist() == [0.0]


def test_forecaster_anchors_are_bounded_fitted_once_and_warm_start_round_trips(tmp_path: Path) -> None:
    from trainer import model_io
    from trainer.spec import load_spec
    from trainer.specs import anchor
    from trainer.training import configure_tensorflow, predict

    configure_tensorflow()
    spec = load_spec("sensor_forecaster")
    features = spec.features()
    names = list(features.feature_names)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, features.n_features)).astype(np.float32)
    col = names.index("value_minus_median")
    x[:, names.index("value_minus_median5")] = 0.25  # constant in training: its anchor must stay off
    x[0, col] = 40.0  # a spike seen in training sets the bound
    model = spec.build(features, spec.seed)
    assert predict(model, x[:2]).shape == (2, 2)
    assert spec.adapt is not None
    spec.adapt(model, x)
    bound = model.get_layer(anchor.LAYER_NAME).get_weights()[0]
    assert bound[0] == pytest.approx(40.0) and bound[1] == 0.0
    base = predict(model, x[:1])
    probe = x[:1].copy()
    probe[0, names.index("value_minus_median5")] = 1e6  # the constant-in-training anchor at serving
    assert np.allclose(predict(model, probe), base, atol=1e-5)
    huge = x[:1].copy()
    huge[0, col] = 1e9  # far beyond training: the pull saturates at the training bound
    huge2 = x[:1].copy()
    huge2[0, col] = 1e4
    assert np.allclose(predict(model, huge), predict(model, huge2), atol=1e-4)
    model_io.save_weights(model, tmp_path / "w.npz")
    fresh = spec.build(features, spec.seed + 1)
    assert model_io.load_weights(fresh, tmp_path / "w.npz")  # a warm start keeps the fitted bounds
    np.testing.assert_array_equal(fresh.get_layer(anchor.LAYER_NAME).get_weights()[0], bound)
    np.testing.assert_allclose(predict(fresh, x[:8]), predict(model, x[:8]), atol=1e-6)
