"""A re-used trainer model (trainer.model_cache) trains bit-identically to a fresh build.

Determinism is a product promise (trainer/training.py): the same inputs give the same weights. The
cache resets a compiled model instead of building one, so these tests train through the cache and
fresh and compare every variable with ``np.array_equal``: after a cold start, a warm start, a cold
start again (state left by the previous run: optimizer moments, guard statistics, batch-norm
moving averages, dropout seed state) and a new seed. A tiny model on tiny data keeps it cheap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from trainer import model_io  # noqa: E402
from trainer.model_cache import ModelCache  # noqa: E402
from trainer.spec import FeatureInfo, ModelSpec  # noqa: E402
from trainer.specs import common, guard  # noqa: E402
from trainer.training import predict, train_candidate  # noqa: E402

FEATURES = FeatureInfo("tiny", "tiny-v1", 6, (6,), ("cls",), tuple(f"f{i}" for i in range(6)))


def _build(features: FeatureInfo, seed: int) -> Any:
    import keras

    x, h = guard.guarded_inputs(features)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)  # unseeded: drawn from the global seed
    h = keras.layers.BatchNormalization(name="norm")(h)  # moving statistics: non-trainable state
    h = keras.layers.Dropout(0.25, name="drop")(h)  # SeedGenerator state
    out = keras.layers.Dense(2, activation="softmax", name="outputs")(h)
    return keras.Model(x, out, name="tiny_cache")


SPEC = ModelSpec(
    name="tiny_cache", featurizer_kind="tiny", featurizer_version=None, label="cls", task="classification",
    build=_build, adapt=guard.guard_adapter(), loss=lambda: __import__("keras").losses.CategoricalCrossentropy(),
    metrics=lambda: common.classifier_metrics(2, positive_class=1), make_targets=common.one_hot_targets("cls", 2),
    score=common.balanced_accuracy, primary_metric="balanced_accuracy", direction="max",
    output_names=["p0", "p1"], class_names=["a", "b"], balance_classes=True, epochs=2, batch_size=16,
    learning_rate=0.01,
)


def _data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES.n_features)).astype(np.float32) * 3.0 + 1.0
    ids = (x[:, 1] + rng.normal(scale=0.5, size=n) > 1.5).astype(np.int64)
    y = np.zeros((n, 2), np.float32)
    y[np.arange(n), ids] = 1.0
    return x, y


def _state(model: Any) -> list[np.ndarray]:
    """Every variable of the model and of its optimizer (iterations and moments included)."""
    return [np.array(v.numpy()) for v in [*model.variables, *model.optimizer.variables]]


def _assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.shape == v.shape and np.array_equal(u, v), f"variable {i} differs"


def test_cached_runs_equal_fresh_builds(tmp_path: Path) -> None:
    x1, y1 = _data(1, 80)
    x2, y2 = _data(2, 72)
    cache = ModelCache()
    fresh1 = train_candidate(SPEC, FEATURES, x1, y1, seed=5)
    fresh1_state = _state(fresh1.model)

    run1 = train_candidate(SPEC, FEATURES, x1, y1, seed=5, cache=cache)  # miss: builds and compiles
    _assert_identical(_state(run1.model), fresh1_state)
    warm = tmp_path / "warm.npz"
    model_io.save_weights(run1.model, warm)
    first_model = run1.model

    run2 = train_candidate(SPEC, FEATURES, x2, y2, seed=5, init_weights=warm, cache=cache)  # hit, warm start
    assert run2.model is first_model and run2.warm_started and cache.hits == 1
    fresh2 = train_candidate(SPEC, FEATURES, x2, y2, seed=5, init_weights=warm)
    _assert_identical(_state(run2.model), _state(fresh2.model))
    assert run2.history == fresh2.history

    run3 = train_candidate(SPEC, FEATURES, x1, y1, seed=5, cache=cache)  # hit, cold again after a warm run
    assert not run3.warm_started and cache.hits == 2
    _assert_identical(_state(run3.model), fresh1_state)
    assert run3.history == fresh1.history

    run4 = train_candidate(SPEC, FEATURES, x2, y2, seed=9, cache=cache)  # hit with a seed not seen before
    fresh4 = train_candidate(SPEC, FEATURES, x2, y2, seed=9)
    assert cache.hits == 3 and cache.misses == 1
    _assert_identical(_state(run4.model), _state(fresh4.model))


def test_export_of_a_reused_model_serves_its_current_weights(tmp_path: Path) -> None:
    """The serving function traced for the first export is re-used, and saves the weights of the moment."""
    x1, y1 = _data(3, 48)
    x2, y2 = _data(4, 48)
    cache = ModelCache()
    run1 = train_candidate(SPEC, FEATURES, x1, y1, seed=2, epochs=1, cache=cache)
    model_io.export_saved_model(run1.model, FEATURES.n_features, tmp_path / "1")
    expected1 = predict(run1.model, x2)
    run2 = train_candidate(SPEC, FEATURES, x2, y2, seed=3, epochs=1, cache=cache)
    assert run2.model is run1.model
    model_io.export_saved_model(run2.model, FEATURES.n_features, tmp_path / "2")
    expected2 = predict(run2.model, x2)
    assert not np.array_equal(expected1, expected2)
    np.testing.assert_allclose(model_io.SavedModelPredictor(tmp_path / "1").predict(x2), expected1, atol=1e-6)
    np.testing.assert_allclose(model_io.SavedModelPredictor(tmp_path / "2").predict(x2), expected2, atol=1e-6)


def test_no_reuse_when_the_spec_opts_out_or_the_data_layout_changes() -> None:
    x1, y1 = _data(5, 32)
    cache = ModelCache()
    first = train_candidate(SPEC, FEATURES, x1, y1, seed=1, epochs=1, cache=cache).model
    unweighted = dataclasses.replace(SPEC, balance_classes=False)  # a different spec and no sample weights
    second = train_candidate(unweighted, FEATURES, x1, y1, seed=1, epochs=1, cache=cache).model
    assert second is not first and cache.misses == 2
    opted_out = dataclasses.replace(SPEC, reuse_model=False)
    a = train_candidate(opted_out, FEATURES, x1, y1, seed=1, epochs=1, cache=cache).model
    b = train_candidate(opted_out, FEATURES, x1, y1, seed=1, epochs=1, cache=cache).model
    assert a is not b and cache.hits == 0


def test_export_falls_back_to_the_whole_keras_object_for_untracked_state(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A layer whose call reads a raw tf.Variable (outside model.variables) still exports and serves."""
    import keras
    import tensorflow as tf

    class RawOffset(keras.layers.Layer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.offset = tf.Variable([0.5, -0.25], trainable=False)  # not a Keras variable

        def call(self, x: Any) -> Any:
            return x + self.offset

    x = keras.Input(shape=(2,), name="x")
    model = keras.Model(x, RawOffset()(keras.layers.Dense(2, name="d")(x)))
    assert len(model.variables) == 2  # the raw variable is not among them
    with caplog.at_level("WARNING", logger="trainer.model_io"):
        model_io.export_saved_model(model, 2, tmp_path / "1")
    assert "exporting the whole Keras object" in caplog.text
    probe = np.asarray([[1.0, 2.0], [-3.0, 0.5]], np.float32)
    np.testing.assert_allclose(model_io.SavedModelPredictor(tmp_path / "1").predict(probe),
                               predict(model, probe), atol=1e-6)
