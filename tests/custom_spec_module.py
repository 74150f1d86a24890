"""A user's own model spec, defined outside streamlearn (loaded via config or an entry point in tests).

``tiny_linear``: a linear next-value-delta forecaster on the sensor featurizer, with a constant
anomaly column, just to prove a third-party spec goes through checks, training, export and serving.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainer.spec import FeatureInfo, ModelSpec
from trainer.specs import common, guard


def build(features: FeatureInfo, seed: int) -> Any:
    import keras

    x, h = guard.guarded_inputs(features)
    out = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="outputs")(h)
    return keras.Model(x, out, name="tiny_linear")


def _loss() -> Any:
    import keras

    return keras.losses.Huber(1.0)  # robust to the generator's anomaly spikes (MSE chases them)


def _metrics() -> list[Any]:
    import keras

    return [keras.metrics.MeanAbsoluteError(name="mae")]


SPEC = ModelSpec(
    name="tiny_linear",
    featurizer_kind="sensor",
    featurizer_version=None,  # whatever the current sensor featurizer is
    label="next_value_delta",
    task="regression",
    build=build,
    adapt=guard.guard_adapter(),
    min_holdout_rows=50,  # test-sized streams (a few hundred readings)
    baseline="zero",  # the target is a change from the last value: the baseline is persistence
    loss=_loss,
    metrics=_metrics,
    make_targets=common.column_targets("next_value_delta"),
    score=common.forecast_mae,
    primary_metric="mae",
    direction="min",
    output_names=["next_value_delta"],
    epochs=10,
    batch_size=32,
    learning_rate=1e-2,
    description="test-only linear forecaster",
)


def tiny_ep_spec() -> ModelSpec:
    """Factory form, as an entry point may name it."""
    return dataclasses.replace(SPEC, name="tiny_ep")
