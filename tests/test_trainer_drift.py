"""Page-Hinkley on synthetic streams: a mean shift is found quickly, a stationary stream stays quiet."""

from __future__ import annotations

import random

import pytest

from trainer.drift import PageHinkley


def test_detects_a_mean_shift_soon_after_it_happens() -> None:
    rng = random.Random(1)
    ph = PageHinkley(delta=0.05, threshold=20.0, min_instances=30)
    detected_at = None
    for i in range(3000):
        x = rng.gauss(1.0 if i < 1000 else 2.0, 0.3)
        if ph.update(x):
            detected_at = i
            break
    assert detected_at is not None and 1000 <= detected_at < 1060, detected_at


def test_stationary_noise_does_not_alarm() -> None:
    rng = random.Random(2)
    ph = PageHinkley(delta=0.05, threshold=20.0, min_instances=30)
    assert not any(ph.update(rng.gauss(1.0, 0.3)) for _ in range(20000))


def test_decrease_of_error_is_not_drift_and_nan_is_ignored() -> None:
    ph = PageHinkley(delta=0.01, threshold=5.0, min_instances=10)
    assert not ph.update_many([1.0] * 200 + [0.0] * 500)
    n = ph.n
    assert not ph.update(float("nan")) and ph.n == n


def test_binary_errors_of_a_classifier_drifting_from_5_to_30_percent() -> None:
    rng = random.Random(3)
    ph = PageHinkley(delta=0.05, threshold=20.0, min_instances=50)
    errors = [1.0 if rng.random() < 0.05 else 0.0 for _ in range(2000)]
    assert not ph.update_many(errors)
    errors = [1.0 if rng.random() < 0.30 else 0.0 for _ in range(400)]
    assert ph.update_many(errors)
    ph.reset()
    assert ph.n == 0 and ph.statistic == 0.0 and not ph.drift_detected


@pytest.mark.parametrize("kwargs", [{"threshold": 0.0}, {"alpha": 0.0}, {"alpha": 1.5}])
def test_bad_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PageHinkley(**kwargs)
