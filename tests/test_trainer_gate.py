"""The evaluation gate on small arrays: worse, NaN and degenerate candidates are rejected."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trainer.gate import decide
from trainer.spec import load_spec

CLS = load_spec("digits_cnn")
REG = load_spec("sensor_forecaster")


def onehot(ids: list[int], k: int = 10) -> np.ndarray:
    out = np.zeros((len(ids), k), dtype=np.float32)
    out[np.arange(len(ids)), ids] = 1.0
    return out


Y = onehot([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)


def test_first_version_is_promoted_with_reason() -> None:
    d = decide(CLS, y_eval=Y, candidate_outputs=Y * 0.9 + 0.01, candidate_score=1.0, current_score=None)
    assert d.promote and d.action == "PROMOTED" and "first version" in d.reason


def test_worse_candidate_is_rejected_and_equal_within_tolerance_promoted() -> None:
    worse = decide(CLS, y_eval=Y, candidate_outputs=Y, candidate_score=0.80, current_score=0.90)
    assert not worse.promote and "worse than current" in worse.reason
    assert worse.to_dict()["candidate_score"] == 0.80 and worse.to_dict()["current_score"] == 0.90
    # 2% relative tolerance: 0.885 >= 0.90 - 0.018
    near = decide(CLS, y_eval=Y, candidate_outputs=Y, candidate_score=0.885, current_score=0.90)
    assert near.promote
    strict = dataclasses.replace(CLS, gate_tolerance=0.0)
    assert not decide(strict, y_eval=Y, candidate_outputs=Y, candidate_score=0.885, current_score=0.90).promote


def test_direction_min_for_the_forecaster() -> None:
    y = np.stack([np.linspace(-1, 1, 20), np.zeros(20)], axis=1).astype(np.float32)
    out = y + 0.1
    assert decide(REG, y_eval=y, candidate_outputs=out, candidate_score=0.5, current_score=0.6).promote
    rejected = decide(REG, y_eval=y, candidate_outputs=out, candidate_score=0.7, current_score=0.6)
    assert not rejected.promote and "lower is better" in rejected.reason


@pytest.mark.parametrize("kwargs,expected", [
    ({"weights_finite": False}, "NaN or infinite weights"),
    ({"train_loss": float("nan")}, "training loss is nan"),
    ({"candidate_score": float("nan")}, "candidate accuracy is nan"),
])
def test_nan_training_is_rejected(kwargs: dict, expected: str) -> None:
    args = {"y_eval": Y, "candidate_outputs": Y, "candidate_score": 0.99, "current_score": 0.5}
    args.update(kwargs)
    d = decide(CLS, **args)
    assert not d.promote and expected in d.reason
    assert d.to_dict()["candidate_score"] in (None, 0.99)  # NaN never reaches JSON/Avro


def test_nan_outputs_are_rejected() -> None:
    out = Y.copy()
    out[3, 2] = np.nan
    d = decide(CLS, y_eval=Y, candidate_outputs=out, candidate_score=0.99, current_score=0.5)
    assert not d.promote and "NaN or infinity" in d.reason


def test_one_class_for_every_row_is_degenerate() -> None:
    out = np.tile(onehot([7]), (len(Y), 1))
    d = decide(CLS, y_eval=Y, candidate_outputs=out, candidate_score=0.99, current_score=None)
    assert not d.promote and "class '7' predicted for all 30" in d.reason
    # a holdout with a single true class cannot show degeneracy: one predicted class is fine there
    y_one = onehot([7] * 10)
    assert decide(CLS, y_eval=y_one, candidate_outputs=np.tile(onehot([7]), (10, 1)),
                  candidate_score=1.0, current_score=None).promote


def test_constant_forecast_is_degenerate() -> None:
    y = np.stack([np.sin(np.arange(40.0)), np.zeros(40)], axis=1).astype(np.float32)
    out = np.stack([np.full(40, 0.25), np.linspace(0, 1, 40)], axis=1).astype(np.float32)
    d = decide(REG, y_eval=y, candidate_outputs=out, candidate_score=0.5, current_score=None)
    assert not d.promote and "constant forecast 0.25" in d.reason


def test_no_labelled_evaluation_rows_is_rejected() -> None:
    d = decide(CLS, y_eval=np.zeros((0, 10)), candidate_outputs=np.zeros((0, 10)), candidate_score=float("nan"),
               current_score=None)
    assert not d.promote and "no labelled evaluation rows" in d.reason
