"""The retrain timer's cadence (trainer.worker.timer_due): start to start, with a rest after long runs."""

from __future__ import annotations

from trainer.worker import timer_due


def test_cadence_runs_from_the_start_of_the_last_run() -> None:
    # a 4 s run started at 100: the next is due 10 s after its start, not 10 s after its end
    assert not timer_due(109.9, last_start=100.0, last_end=104.0, interval_s=10.0)
    assert timer_due(110.0, last_start=100.0, last_end=104.0, interval_s=10.0)


def test_a_run_longer_than_the_interval_is_followed_by_a_rest() -> None:
    # a 12 s run (longer than the 10 s interval): half an interval of rest before the next one
    assert not timer_due(112.0, last_start=100.0, last_end=112.0, interval_s=10.0)
    assert not timer_due(116.9, last_start=100.0, last_end=112.0, interval_s=10.0)
    assert timer_due(117.0, last_start=100.0, last_end=112.0, interval_s=10.0)
