"""Input-scaling guards: the guard's statistics, the shared check catching an unguarded spec, and the
serving counter of inputs outside the training range."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from serving.input_range import FEATURES_OUT_OF_RANGE, OUT_OF_RANGE, InputRange
from trainer.checks import check_spec
from trainer.exceptions import SpecCheckError
from trainer.spec import load_spec
from trainer.specs import common, guard


def test_guard_statistics_ignore_constant_and_excluded_features() -> None:
    x = np.array([[1.0, 5.0, 0.0, 371.5], [3.0, 5.0, 1.0, 371.5 + 1e-7], [5.0, 5.0, 2.0, 371.5]], np.float32)
    mean, inv = guard.guard_statistics(x, exclude=[2])
    assert mean[0] == pytest.approx(3.0) and inv[0] == pytest.approx(1 / np.std([1.0, 3.0, 5.0]))
    assert inv[1] == 0.0 and inv[2] == 0.0 and mean[2] == 0.0 and inv[3] == 0.0  # constant, excluded, ~constant


def _unguarded_build(features: Any, seed: int) -> Any:
    import keras

    x, h = common.inputs(features)
    h = keras.layers.Normalization(name="normalize")(h)
    out = keras.layers.Dense(2, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), name="out")(h)
    return keras.Model(x, out)


def test_the_shared_check_rejects_a_spec_that_scales_by_a_zero_spread() -> None:
    spec = dataclasses.replace(load_spec("sensor_forecaster"), build=_unguarded_build,
                               adapt=lambda model, x: model.get_layer("normalize").adapt(x))
    with pytest.raises(SpecCheckError, match="constant in training .* moved the outputs"):
        check_spec(spec)


def test_out_of_range_inputs_are_counted_with_bounded_labels() -> None:
    meta = {"input_range": {"min": [0.0, -1.0, 0.0], "max": [1.0, 1.0, 0.0]},
            "featurizer": {"feature_names": ["a", "hour_sin", "c"]}}
    rng = InputRange.from_metadata(meta, 3)
    assert rng is not None and InputRange.from_metadata({}, 3) is None
    assert InputRange.from_metadata({"input_range": {"min": [0.0], "max": [1.0]}}, 3) is None
    before = OUT_OF_RANGE.labels("probe_model")._value.get()
    hour_before = FEATURES_OUT_OF_RANGE.labels("probe_model", "c")._value.get()
    x = np.array([[0.5, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 0.26], [2.0, 0.0, 0.5]], np.float32)
    assert rng.observe("probe_model", x) == 2
    assert OUT_OF_RANGE.labels("probe_model")._value.get() == before + 2
    assert FEATURES_OUT_OF_RANGE.labels("probe_model", "c")._value.get() == hour_before + 2
