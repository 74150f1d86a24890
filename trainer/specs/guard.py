"""Guarded input standardization, shared by every built-in spec (and offered to user specs).

Why not ``keras.layers.Normalization``: it divides by the training spread of each feature. A
feature that was constant in training (``hour_sin`` of a series read every day at 00:00) has a
spread of ~0, so one request at another hour was multiplied by ~1e5 and moved a forecast by
32,192 units. :class:`GuardedStandardize` (built by :func:`guarded_inputs`) computes

    z = clip((x - mean) / std, -CLIP_BOUND, CLIP_BOUND)   for features that varied in training
    z = 0                                                  for near-constant or excluded features

* **near-constant** means ``std <= SPREAD_FLOOR_ABS + SPREAD_FLOOR_REL * |mean|``: such a feature
  carried no information the model could have learnt from, so it is ignored rather than scaled by a
  made-up spread; the shared check (``trainer.checks``) asserts that varying it at serving moves
  the output by at most ``CONSTANT_FEATURE_BOUND``;
* **clipping** bounds what any single feature can contribute, whatever a request sends (a value
  far outside the training range saturates at ``CLIP_BOUND`` standard deviations);
* **excluded** features (``exclude`` of :func:`guard_adapter`) are ignored on purpose, e.g. the
  web-log status and response size, which would leak the answer of "will this request fail?".

The statistics are fitted on the first training data (cold start, ``ModelSpec.adapt``) and are
weights of the model: warm starts keep them, the SavedModel carries them, serving needs nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trainer.spec import FeatureInfo

LAYER_NAME = "guard"
#: standardized inputs are clipped to +-this many training standard deviations.
CLIP_BOUND = 6.0
#: a feature whose training std is <= SPREAD_FLOOR_ABS + SPREAD_FLOOR_REL * |mean| is ignored.
SPREAD_FLOOR_ABS = 1e-6
SPREAD_FLOOR_REL = 1e-5


@functools.cache
def _layer_class() -> Any:
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="streamlearn")
    class GuardedStandardize(keras.layers.Layer):
        """``clip((x - mean) * inv_scale, -bound, bound)``; features with ``inv_scale == 0`` give 0."""

        def __init__(self, n_features: int, bound: float = CLIP_BOUND, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.n_features = int(n_features)
            self.bound = float(bound)
            # Until adapted every feature is ignored: an unfitted guard can never amplify anything.
            self.mean = self.add_weight(shape=(self.n_features,), initializer="zeros", trainable=False,
                                        name="mean")
            self.inv_scale = self.add_weight(shape=(self.n_features,), initializer="zeros", trainable=False,
                                             name="inv_scale")

        def call(self, x: Any) -> Any:
            used = ops.greater(self.inv_scale, 0.0)
            z = ops.clip((x - self.mean) * self.inv_scale, -self.bound, self.bound)
            return ops.where(used, z, ops.zeros_like(z))

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "n_features": self.n_features, "bound": self.bound}

    return GuardedStandardize


def guarded_inputs(features: FeatureInfo) -> tuple[Any, Any]:
    """``(Input "x" of (n_features,), guarded + reshaped to features.input_shape)``."""
    import keras

    x = keras.Input(shape=(features.n_features,), name="x", dtype="float32")
    h = _layer_class()(features.n_features, name=LAYER_NAME)(x)
    if tuple(features.input_shape) != (features.n_features,):
        h = keras.layers.Reshape(tuple(features.input_shape), name="to_input_shape")(h)
    return x, h


def guard_statistics(x: np.ndarray, exclude: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, inv_scale)`` of training rows ``x``; inv_scale 0 for near-constant/excluded features."""
    x64 = np.asarray(x, dtype=np.float64)
    n = x64.shape[1]
    if len(x64) == 0:
        return np.zeros(n, np.float32), np.zeros(n, np.float32)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)
    floor = SPREAD_FLOOR_ABS + SPREAD_FLOOR_REL * np.abs(mean)
    inv = np.where(std > floor, 1.0 / np.where(std > floor, std, 1.0), 0.0)
    if len(exclude):
        inv[np.asarray(list(exclude), dtype=np.int64)] = 0.0
        mean[np.asarray(list(exclude), dtype=np.int64)] = 0.0
    return mean.astype(np.float32), inv.astype(np.float32)


def guard_adapter(exclude: Sequence[int] = ()) -> Callable[[Any, np.ndarray], None]:
    """A ``ModelSpec.adapt``: fit the guard of a model built with :func:`guarded_inputs`."""
    excluded = tuple(int(i) for i in exclude)

    def adapt(model: Any, x: np.ndarray) -> None:
        mean, inv = guard_statistics(x, excluded)
        model.get_layer(LAYER_NAME).set_weights([mean, inv])

    return adapt


def ignored_features(model: Any) -> list[int]:
    """Indices of the inputs the guard ignores (near-constant in training or excluded)."""
    inv = np.asarray(model.get_layer(LAYER_NAME).get_weights()[1])
    return [int(i) for i in np.flatnonzero(inv == 0.0)]
