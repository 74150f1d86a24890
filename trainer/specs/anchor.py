"""Level anchors: a forecaster's delta built as a learned blend of "stay" and "go back to the level".

Why: the sensor forecaster predicts ``next_value_delta`` (next value - last value). For a noisy
level the best forecast is close to a robust level (the window median): on the generated sensor
stream "next = median of the last 16 readings" scores 0.66x persistence's MAE. A dense network can
only learn that move through the guarded inputs (trainer.specs.guard), which are standardized and
clipped at ``CLIP_BOUND`` training standard deviations, so it could not answer a spike of 40 units
with a move of -40: the spike's ``value_minus_median`` saturated at the bound. Anchors give the
model the move itself, in value units:

    delta = - sum_k gate_k(guarded x) * clip(x[anchor_k], -bound_k, bound_k)

* ``x[anchor_k]`` is a raw feature that is "value minus some level" (``value_minus_median``,
  ``value_minus_median5`` of sensor-v3); ``gate_k`` in [0, 1] (a sigmoid of the hidden layer over
  the guarded inputs) says how far to move back to that level: near 1 for noise around a level or
  a spike, near 0 for a random walk, where persistence is right. With one anchor the forecast
  ``value + delta`` is ``(1 - gate) * value + gate * level``: an ensemble of persistence and the
  level, weighted per reading;
* ``bound_k`` is the largest ``|x[anchor_k]|`` seen in training (fitted with the guard on a cold
  start, kept by warm starts like the guard's statistics), and 0 when the guard ignores that
  feature (near-constant in training), so an anchor can never move the output by more than the
  training data did, and a feature constant in training still cannot move it at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trainer.specs import guard

LAYER_NAME = "anchors"
#: initial bias of the gates' sigmoid (sigmoid(3) = 0.95): start from the level, learn when to stay.
GATE_BIAS = 3.0


@functools.cache
def _layer_class() -> Any:
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="streamlearn")
    class LevelAnchors(keras.layers.Layer):
        """``clip(x[:, columns], -bound, bound)``; bound 0 (the unfitted default) gives 0."""

        def __init__(self, columns: Sequence[int], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.columns = [int(c) for c in columns]
            self.bound = self.add_weight(shape=(len(self.columns),), initializer="zeros", trainable=False,
                                         name="bound")

        def call(self, x: Any) -> Any:
            return ops.clip(ops.take(x, self.columns, axis=1), -self.bound, self.bound)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "columns": self.columns}

    return LevelAnchors


def anchored_delta(x: Any, hidden: Any, columns: Sequence[int], seed: int, gate_bias: float = GATE_BIAS) -> Any:
    """``-sum_k gate_k(hidden) * anchor_k(x)``: the pull back to the levels, shape (None, 1).

    The gates start near ``sigmoid(gate_bias)`` (0.95 by default): a fresh model forecasts (about)
    the robust level, and training moves the gates where the data says persistence is better.
    """
    import keras
    from keras import ops

    anchors = _layer_class()(columns, name=LAYER_NAME)(x)
    gates = keras.layers.Dense(len(columns), activation="sigmoid", name="anchor_gates",
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                               bias_initializer=keras.initializers.Constant(gate_bias))(hidden)
    return keras.layers.Lambda(lambda t: -ops.sum(t[0] * t[1], axis=1, keepdims=True),
                               output_shape=(1,), name="pull_to_level")([anchors, gates])


def anchor_bounds(x: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """Per anchor: max |x[:, column]| of the training rows, 0 where the guard ignores the column."""
    cols = np.asarray(list(columns), dtype=np.int64)
    if len(x) == 0:
        return np.zeros(len(cols), np.float32)
    _, inv = guard.guard_statistics(x)
    bound = np.max(np.abs(np.asarray(x, dtype=np.float64)[:, cols]), axis=0)
    return np.where(inv[cols] > 0.0, bound, 0.0).astype(np.float32)


def anchored_adapter() -> Callable[[Any, np.ndarray], None]:
    """A ``ModelSpec.adapt``: fit the guard and the anchors' bounds (cold start only)."""
    fit_guard = guard.guard_adapter()

    def adapt(model: Any, x: np.ndarray) -> None:
        fit_guard(model, x)
        layer = model.get_layer(LAYER_NAME)
        layer.set_weights([anchor_bounds(x, layer.columns)])

    return adapt
