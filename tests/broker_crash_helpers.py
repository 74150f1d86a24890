"""A private embedded broker that tests may kill with SIGKILL (the session broker must never be)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streaming import config
from streaming.broker import EmbeddedBroker, free_port
from streaming.topics import ensure_topics

Kill9Restart = Callable[..., None]


@pytest.fixture(name="crash_broker")
def crash_broker_fixture(tmp_path: Path) -> Iterator[tuple[config.Settings, Kill9Restart]]:
    """Settings on a private embedded broker, and ``kill9_restart(while_down=None)``: SIGKILL, run
    ``while_down()`` if given, start again on the same data dir."""
    bs = config.load({"home": tmp_path / "broker-home", "broker_port": free_port()}, environ={})
    holder = [EmbeddedBroker(bs)]
    holder[0].start(timeout_s=60, detach=False)
    s = config.load({"home": tmp_path / "home", "kafka_bootstrap": bs.bootstrap,
                     "topic_prefix": f"c{uuid.uuid4().hex[:8]}.", "metrics_port": -1,
                     "batch_max_seconds": 1.0}, environ={})
    ensure_topics(s)

    def kill9_restart(while_down: Callable[[], object] | None = None) -> None:
        holder[0].kill()
        if while_down is not None:
            while_down()
        holder[0] = EmbeddedBroker(bs)
        holder[0].start(timeout_s=60, detach=False)

    try:
        yield s, kill9_restart
    finally:
        holder[0].stop()
