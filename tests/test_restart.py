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
    # A small model (tests/restart_spec.py) with 40-row batches: the scenario waits on conditions (a
    # cycle of the restarted pid on the new batches, then its version), never on the retrain interval.
    result = bench_restart.train(settings, tmp_path, rows=40, model="restart_tiny",
                                 specs={"restart_tiny": "tests.restart_spec:SPEC"})
    assert result["distinct"] == 2, result  # a new version after the restart; every version verifies


def test_restarted_trainer_continues_the_retrain_interval(settings: Settings, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The retrain timer runs from the newest version's creation, not from the process start: a trainer
    restarted an hour after its last version trains the batches waiting for it at once, although its
    interval is an hour and the batch count is not reached."""
    import threading
    import time

    from streaming.model_registry import ModelRegistry
    from streaming.store import FeatureStore
    from streaming.topics import raw_topic
    from streamlearn.commands.publish import generated
    from tests.helpers import wait_until
    from tests.restart_spec import SPEC
    from trainer import cycle
    from trainer.synthetic import write_batches
    from trainer.worker import Trainer

    registry = ModelRegistry(settings.model_dir)
    assert cycle.seconds_since_last_version(registry, SPEC.name) is None
    staging = registry.staging(SPEC.name)
    (staging / "saved_model.pb").write_bytes(b"not read by this test")
    (staging / "variables").mkdir()
    (staging / "variables" / "variables.index").write_bytes(b"")
    registry.publish(SPEC.name, staging, {"created_at": int(time.time() * 1000) - 3_600_000})
    since = cycle.seconds_since_last_version(registry, SPEC.name)
    assert since is not None and since >= 3_600.0

    write_batches(FeatureStore(settings.feature_store), "sensor", list(generated("sensor", 80, seed=7)),
                  batch_size=40, topic=raw_topic(settings, "sensor"))
    monkeypatch.setattr(cycle, "prefetch_tensorflow", lambda: None)  # no TensorFlow in the test process
    triggers: list[str] = []
    stop = threading.Event()

    def run_once(trigger: str = "manual") -> None:
        triggers.append(trigger)
        stop.set()

    trainer = Trainer(settings.with_(retrain_every_seconds=3_600.0, retrain_every_batches=1_000), SPEC,
                      events=False)
    monkeypatch.setattr(trainer, "unseen_batches", trainer.batches)  # the stand-in version saw no batch
    monkeypatch.setattr(trainer, "check_drift", lambda: False)
    monkeypatch.setattr(trainer, "run_once", run_once)
    thread = threading.Thread(target=trainer.run_forever, args=(stop,), kwargs={"poll_seconds": 0.05}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: triggers, timeout=60, message="a cycle of the restarted trainer")
    finally:
        stop.set()
        thread.join(30)
    assert triggers == ["timer"]
