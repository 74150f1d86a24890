"""kill -9 and restart with exactly the same command, for every long-running worker kind.

Each test runs one scenario of :mod:`benchmarks.bench_restart` (the benchmark measures the same
runs): the worker is started as a subprocess the way the README shows, killed with SIGKILL after it
made progress, given new input, and started again with the same command. The scenario fails unless
progress comes back before a generous deadline (no timing goal here: that is the benchmark's job);
the tests assert that nothing was lost or duplicated.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_restart
from streaming.config import Settings


def _exactly_once(result: dict[str, object]) -> None:
    assert result["distinct"] == result["expected"], result
    assert result["duplicates"] == 0, result


def test_stream_worker_restarts_after_kill_9(settings: Settings, tmp_path: Path) -> None:
    _exactly_once(bench_restart.stream(settings, tmp_path))


def test_tailer_follow_restarts_after_kill_9(settings: Settings, tmp_path: Path) -> None:
    _exactly_once(bench_restart.ingest_follow(settings, tmp_path))


def test_gateway_restarts_after_kill_9(settings: Settings, tmp_path: Path) -> None:
    _exactly_once(bench_restart.gateway(settings, tmp_path))


def test_group_subscriber_restarts_after_kill_9(settings: Settings, tmp_path: Path) -> None:
    result = bench_restart.subscribe(settings, tmp_path)
    assert result["distinct"] == result["expected"], result  # at least once: nothing skipped


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serving_worker_restarts_after_kill_9(settings: Settings, tmp_path: Path) -> None:
    _exactly_once(bench_restart.serve(settings, tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_periodic_trainer_restarts_after_kill_9(settings: Settings, tmp_path: Path) -> None:
    result = bench_restart.train(settings, tmp_path)
    assert result["distinct"] == 2, result  # a new version after the restart; every version verifies
