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


def test_worse_candidate_and_a_tie_are_rejected() -> None:
    worse = decide(CLS, y_eval=Y, candidate_outputs=Y, candidate_score=0.80, current_score=0.90)
    assert not worse.promote and "not better than current" in worse.reason
    assert worse.to_dict()["candidate_score"] == 0.80 and worse.to_dict()["current_score"] == 0.90
    tie = decide(CLS, y_eval=Y, candidate_outputs=Y, candidate_score=0.90, current_score=0.90)
    assert not tie.promote and "a tie is no promotion" in tie.reason
    # without the current model's outputs only the relative floor (0.5% of 0.90) applies
    assert decide(CLS, y_eval=Y, candidate_outputs=Y, candidate_score=0.91, current_score=0.90).promote
    assert not decide(CLS, y_eval=Y, candidate_outputs=Y, candidate_score=0.904, current_score=0.90).promote


def test_a_gain_within_the_bootstrap_noise_is_no_promotion() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 10, size=300)
    y = onehot(truth.tolist())

    def answers(acc: float, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        pred = np.where(r.random(300) < acc, truth, (truth + 1) % 10)
        return onehot(pred.tolist())

    current, near, far = answers(0.80, 1), answers(0.81, 2), answers(0.95, 4)
    cur_score = CLS.score(y, current)
    d_near = decide(CLS, y_eval=y, candidate_outputs=near, candidate_score=CLS.score(y, near),
                    current_score=cur_score, current_outputs=current)
    assert not d_near.promote and d_near.margin_vs_current is not None and d_near.margin_vs_current > 0.01
    d_far = decide(CLS, y_eval=y, candidate_outputs=far, candidate_score=CLS.score(y, far),
                   current_score=cur_score, current_outputs=current)
    assert d_far.promote and d_far.eval_rows == 300


def test_the_baseline_must_be_beaten_and_is_recorded() -> None:
    from trainer.gate import baseline_outputs

    truth = [0] * 270 + [1] * 30
    y = onehot(truth, 2)
    spec = dataclasses.replace(load_spec("weblog_classifier"))
    prior = baseline_outputs(spec, y, len(y), 2)
    assert np.allclose(prior[0], [0.9, 0.1])  # the class prior; its argmax is the majority class
    majority_like = onehot([0] * 299 + [1], 2)
    d = decide(spec, y_eval=y, candidate_outputs=majority_like,
               candidate_score=spec.score(y, majority_like), current_score=None, baseline_outputs=prior)
    assert not d.promote and "does not beat the baseline (class prior" in d.reason
    assert d.baseline_score == 0.5 and d.to_dict()["better"] == "higher"
    good = onehot([0] * 260 + [1] * 10 + [1] * 25 + [0] * 5, 2)
    ok = decide(spec, y_eval=y, candidate_outputs=good, candidate_score=spec.score(y, good), current_score=None,
                baseline_outputs=prior)
    assert ok.promote and "baseline 0.5" in ok.reason and ok.margin_vs_baseline is not None


def test_persistence_is_the_forecasters_baseline() -> None:
    from trainer.gate import baseline_outputs

    y = np.stack([np.sin(np.arange(300.0)), np.zeros(300)], axis=1).astype(np.float32)
    zero = baseline_outputs(REG, y, 300, 2)
    assert REG.baseline_kind() == "zero" and not zero.any()
    noisy = y.copy()
    noisy[:, 0] += np.random.default_rng(0).normal(0, 1.0, 300)  # worse than predicting "no change"
    d = decide(REG, y_eval=y, candidate_outputs=noisy, candidate_score=REG.score(y, noisy), current_score=None,
               baseline_outputs=zero)
    assert not d.promote and "persistence" in d.reason and d.to_dict()["better"] == "lower"


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


def test_a_held_out_set_of_one_class_says_so_when_the_baseline_is_not_beaten() -> None:
    """A small site's log with no failed request: 'balanced_accuracy 1 vs baseline 1' said neither that the
    rows hold one class nor what to do (docs/MODELS.md gives that baseline as 0.5)."""
    from trainer.gate import baseline_outputs

    spec = dataclasses.replace(load_spec("weblog_classifier"))
    y = onehot([0] * 300, 2)
    prior = baseline_outputs(spec, y, len(y), 2)
    d = decide(spec, y_eval=y, candidate_outputs=y, candidate_score=spec.score(y, y), current_score=None,
               baseline_outputs=prior)
    assert not d.promote and "Every held-out row is of one class" in d.reason, d.reason
    mixed = onehot([0] * 270 + [1] * 30, 2)
    prior = baseline_outputs(spec, mixed, len(mixed), 2)
    d = decide(spec, y_eval=mixed, candidate_outputs=prior, candidate_score=spec.score(mixed, prior),
               current_score=None, baseline_outputs=prior)
    assert not d.promote and "one class" not in d.reason
