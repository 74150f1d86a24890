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


def _drop_topics(s: config.Settings) -> None:
    """Delete the test's topics (its unique prefix) from the session broker.

    Why: every test made ~10 topics there and none went away. Past a few thousand topics each metadata
    listing costs seconds (ensure_topics: 0.03 s on a fresh broker, 1.4 s after 300 tests' topics), and
    the suite grew from ~14 to ~22 minutes as it gained tests. A failure here only leaves topics behind.
    """
    from streaming.topics import admin_client

    try:
        admin = admin_client(s)
        try:
            mine = [t for t in admin.list_topics() if t.startswith(s.topic_prefix)]
            if mine:
                admin.delete_topics(mine)
        finally:
            admin.close()
    except Exception as exc:  # noqa: BLE001 - housekeeping: the test's result stands
        print(f"conftest: could not delete the topics of {s.topic_prefix}: {exc}")


@pytest.fixture()
def settings(broker_settings: config.Settings, tmp_path: Path) -> Iterator[config.Settings]:
    """Per-test settings on the session broker, with all declared topics created (deleted afterwards)."""
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
    yield s
    _drop_topics(s)


@pytest.fixture()
def bare_settings(broker_settings: config.Settings, tmp_path: Path) -> Iterator[config.Settings]:
    """Like ``settings`` but no topics are created (for tests of topic management itself)."""
    s = config.load({"home": tmp_path / "home", "kafka_bootstrap": broker_settings.bootstrap,
                     "topic_prefix": f"t{uuid.uuid4().hex[:10]}.", "metrics_port": -1,
                     "broker_loss_window_s": TEST_LOSS_WINDOW_S})
    yield s
    _drop_topics(s)


from tests.s3_helpers import s3_bucket, s3_server  # noqa: E402,F401  (object-storage fixtures, tests/test_objstore*.py)
