"""The serving version watcher: an unchanged registry costs a stat, a promotion is still seen.

Uses the tiny tf.Module of tests/serving_helpers (sub-second export; TensorFlow is imported once per
test session anyway). No broker: ``follow_updates=False``, so only the registry polling can see the
promotion, which is the path the stat check changed (docs/IDLE.md).
"""

from __future__ import annotations

from serving.versions import FULL_CHECK_EVERY, VersionManager
from streaming.config import Settings
from streaming.model_registry import ModelRegistry
from tests.helpers import wait_until
from tests.serving_helpers import publish


def test_an_unchanged_registry_is_not_reread_and_a_promotion_is_still_seen(settings: Settings) -> None:
    registry = ModelRegistry(settings.model_dir)
    publish(registry, "watch", tag=1.0)
    mgr = VersionManager(settings, "watch", registry=registry, poll_interval_s=0.02, follow_updates=False).start()
    try:
        assert mgr.wait_ready(120), "version 1 never became ready"
        polls, reconciles = mgr.stats.polls, mgr.stats.reconciles
        wait_until(lambda: mgr.stats.polls >= polls + 3 * FULL_CHECK_EVERY, timeout=60, message="30 idle polls")
        done_polls, done = mgr.stats.polls - polls, mgr.stats.reconciles - reconciles
        # one forced full reconcile per FULL_CHECK_EVERY polls, the rest are a stat of state.json
        assert done <= done_polls // FULL_CHECK_EVERY + 1, (done, done_polls)
        assert done >= 1  # the bounded full check still runs
        publish(registry, "watch", tag=2.0)  # promoted in the registry, no ModelUpdate event
        wait_until(lambda: getattr(mgr.current().stable, "version", None) == 2, timeout=60,
                   message="version 2 served after its promotion")
    finally:
        mgr.stop()
