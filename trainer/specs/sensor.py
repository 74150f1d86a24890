"""``sensor_forecaster``: next-value forecaster with an anomaly head (sensor featurizer ``sensor-v3``).

Outputs ``float32[None, 2]``:

* column 0, ``next_value_delta``: the forecast change from the last reading (serving reports
  ``forecast = value + outputs[:, 0]``), trained with the Huber loss (delta 1.0). Why not MSE:
  injected anomalies are spikes of tens of units, MSE chases them and its MAE ended *worse* than
  persistence in the learning benchmark (1.25x); Huber is quadratic for ordinary noise and linear
  for spikes, and reached 0.71x on the same data;
* column 1, ``anomaly_score``: P(this reading is an anomaly), a sigmoid head trained on the
  featurizer's ``is_anomaly`` label with binary cross-entropy. Rows whose ``is_anomaly`` is
  unknown (NaN) contribute nothing to that head (masked), while still training the forecast.

The delta is anchored (:mod:`trainer.specs.anchor`): ``correction - sum_k gate_k * anchor_k``
where the anchors are sensor-v3's raw ``value_minus_median`` and ``value_minus_median5`` (clipped
to the largest magnitude seen in training), the gates in [0, 1] come from the hidden layer and
start near 0.95, and the correction (a dense output of the hidden layer) starts at 0. So a fresh
model forecasts the robust level; training learns per reading when persistence is better (gates
toward 0) and what the levels miss (trend, season). A spike of any size is answered by the move
back to the level, which a standardized input clipped at the guard's bound cannot express.

Why a trained head rather than a |residual| z-score: the residual needs the *next* reading,
which serving does not have when it answers; the head scores the reading at hand.
The inputs go through the guarded standardization of :mod:`trainer.specs.guard`, fitted on the
first training data (cold start only; warm starts keep its statistics), because raw sensor levels
can be in the hundreds, while features constant in training (the hour of a daily series) are
ignored and every standardized input is clipped. Primary metric: MAE of column 0 (lower is
better); the gate's baseline is persistence (a delta of 0: the last value) on the same rows.
"""

from __future__ import annotations

from typing import Any

from trainer.exceptions import SpecError
from trainer.spec import FeatureInfo, ModelSpec
from trainer.specs import anchor, common, guard

ANOMALY_WEIGHT = 0.5
HUBER_DELTA = 1.0
FEATURIZER_VERSION = "sensor-v3"
#: raw "value minus a level" features the delta may pull back by (see trainer.specs.anchor).
ANCHORS = ("value_minus_median", "value_minus_median5")


def _anchor_columns(features: FeatureInfo) -> list[int]:
    names = list(features.feature_names)
    missing = [n for n in ANCHORS if n not in names]
    if missing:
        raise SpecError(f"featurizer_version: sensor_forecaster anchors on {missing}, which featurizer "
                        f"{features.version} does not emit; use {FEATURIZER_VERSION} or later")
    return [names.index(n) for n in ANCHORS]


def build(features: FeatureInfo, seed: int) -> Any:
    import keras

    def init(k: int) -> Any:
        return keras.initializers.GlorotUniform(seed=seed + k)

    x, h = guard.guarded_inputs(features)
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init(0), name="hidden1")(h)
    h = keras.layers.Dense(32, activation="relu", kernel_initializer=init(1), name="hidden2")(h)
    # The correction starts at 0 (zero kernel): a fresh model is the anchored level forecast, and
    # training adds what the levels miss (trend, season: a weekly CO2-like series needs it).
    correction = keras.layers.Dense(1, kernel_initializer="zeros", name="delta")(h)
    pull = anchor.anchored_delta(x, h, _anchor_columns(features), seed + 4)
    delta = keras.layers.Add(name="anchored_delta")([correction, pull])
    anomaly = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init(3), name="anomaly")(h)
    out = keras.layers.Concatenate(name="outputs")([delta, anomaly])
    return keras.Model(x, out, name="sensor_forecaster")


def _loss() -> Any:
    from keras import ops

    def forecast_and_anomaly_loss(y_true: Any, y_pred: Any) -> Any:
        delta_known = ops.logical_not(ops.isnan(y_true[:, 0]))
        delta_t = ops.where(delta_known, y_true[:, 0], 0.0)
        err = ops.abs(delta_t - y_pred[:, 0])
        huber = ops.where(err <= HUBER_DELTA, 0.5 * ops.square(err), HUBER_DELTA * (err - 0.5 * HUBER_DELTA))
        huber = ops.where(delta_known, huber, 0.0)
        known = ops.logical_not(ops.isnan(y_true[:, 1]))
        target = ops.where(known, y_true[:, 1], 0.0)
        p = ops.clip(y_pred[:, 1], 1e-6, 1.0 - 1e-6)
        bce = -(target * ops.log(p) + (1.0 - target) * ops.log(1.0 - p))
        bce = ops.where(known, bce, 0.0)
        return huber + ANOMALY_WEIGHT * bce

    return forecast_and_anomaly_loss


def _metrics() -> list[Any]:
    from keras import ops

    def mae(y_true: Any, y_pred: Any) -> Any:
        known = ops.logical_not(ops.isnan(y_true[:, 0]))
        err = ops.where(known, ops.abs(y_true[:, 0] - y_pred[:, 0]), 0.0)
        return ops.sum(err) / ops.maximum(ops.sum(ops.cast(known, "float32")), 1.0)

    return [mae]


SPEC = ModelSpec(
    name="sensor_forecaster",
    featurizer_kind="sensor",
    featurizer_version=FEATURIZER_VERSION,
    label="next_value_delta",
    aux_labels=("is_anomaly",),
    task="regression",
    build=build,
    adapt=anchor.anchored_adapter(),
    baseline="zero",
    loss=_loss,
    metrics=_metrics,
    make_targets=common.column_targets("next_value_delta", "is_anomaly"),
    score=common.forecast_mae,
    primary_metric="mae",
    direction="min",
    output_names=["next_value_delta", "anomaly_score"],
    epochs=5,
    min_train_steps=300,
    batch_size=64,
    learning_rate=3e-3,
    description="next-value forecast (delta) of a sensor plus P(anomaly) of the current reading",
)
