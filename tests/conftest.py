"""Shared fixtures: one real embedded Kafka broker per test session, isolated settings per test.

The broker is the pinned noida-db binary started over TCP on a free port with a temporary
STREAMLEARN_HOME. When STREAMLEARN_KAFKA_BOOTSTRAP is set, the tests run against that broker
instead (e.g. Apache Kafka from docker-compose). Each test gets its own topic prefix, registry,
feature store and model directory, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from streaming import config  # noqa: E402
from streaming.broker import EmbeddedBroker, free_port  # noqa: E402
from streaming.topics import ensure_topics  # noqa: E402
from tests import leakguard  # noqa: E402
from tests.leakguard import pytest_runtest_setup, pytest_runtest_teardown  # noqa: E402,F401  (hooks)

#: The ack ledger stays on (its code runs in every publishing test) but confirms after 0.5 s instead
#: of 5 s: the session broker is never killed, so the window guards nothing here, and every source
#: exit and gateway shutdown waits for it (tests that kill a broker use their own settings and window).
TEST_LOSS_WINDOW_S = 0.5


@pytest.fixture(scope="session")
def broker_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[config.Settings]:
    home = tmp_path_factory.mktemp("broker-home")
    base = config.load({"home": home})
    if not base.embedded:
        yield base
        return
    settings = config.load({"home": home, "broker_port": free_port()})
    broker = EmbeddedBroker(settings)
    broker.start(timeout_s=60, detach=False)
    leakguard.adopt()  # the session broker outlives every test by design
    try:
        yield settings
    finally:
        broker.stop()


@pytest.fixture()
def settings(broker_settings: config.Settings, tmp_path: Path) -> config.Settings:
    """Per-test settings on the session broker, with all declared topics created."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    s = config.load({
        "home": tmp_path / "home",
        "kafka_bootstrap": broker_settings.bootstrap,
        "topic_prefix": prefix,
        "batch_max_seconds": 1.0,
        "metrics_port": -1,
        "broker_loss_window_s": TEST_LOSS_WINDOW_S,
    })
    ensure_topics(s)
    return s


@pytest.fixture()
def bare_settings(broker_settings: config.Settings, tmp_path: Path) -> config.Settings:
    """Like ``settings`` but no topics are created (for tests of topic management itself)."""
    return config.load({"home": tmp_path / "home", "kafka_bootstrap": broker_settings.bootstrap,
                        "topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "metrics_port": -1,
                        "broker_loss_window_s": TEST_LOSS_WINDOW_S})


from tests.s3_helpers import s3_bucket, s3_server  # noqa: E402,F401  (object-storage fixtures, tests/test_objstore*.py)
