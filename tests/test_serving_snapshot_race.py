"""The served snapshot has one writer at a time: a canary rollback during a swap holds (no broker, no TF)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serving import versions
from serving.policy import Policy
from serving.versions import CANARY_ROLLED_BACK, CANARY_ROUTING, VersionManager
from streaming import config


@dataclass
class FakeVersion:
    version: int


class FakeRegistry:
    def __init__(self) -> None:
        self.promoted_version = 1

    def promoted(self, model: str) -> int:
        return self.promoted_version


def test_rollback_during_a_swap_is_not_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loading = threading.Event()
    gate = threading.Event()

    def fake_load(registry: Any, model: str, version: int, recent: Any) -> FakeVersion:
        if version == 3:  # the slow swap: held until the rollback happened
            loading.set()
            assert gate.wait(10)
        return FakeVersion(version)

    monkeypatch.setattr(versions, "load_version", fake_load)
    registry = FakeRegistry()
    settings = config.load({"home": tmp_path}, environ={})
    mgr = VersionManager(settings, "race", Policy.parse("canary:2:0.5"), registry=registry,  # type: ignore[arg-type]
                         follow_updates=False)
    mgr._reconcile()
    snap = mgr.current()
    assert snap.canary_state == CANARY_ROUTING and snap.stable.version == 1  # type: ignore[union-attr]

    registry.promoted_version = 3
    swapper = threading.Thread(target=mgr._reconcile)
    swapper.start()
    assert loading.wait(10)
    mgr._rollback(mgr.current(), "worse live error (test)")  # the label thread rolls back mid-swap
    assert mgr.current().canary_state == CANARY_ROLLED_BACK
    gate.set()
    swapper.join(10)
    assert not swapper.is_alive()

    final = mgr.current()
    assert final.stable is not None and final.stable.version == 3  # the swap happened...
    assert final.canary_state == CANARY_ROLLED_BACK  # ...and the rollback held
    assert final.route("any-request").version == 3
    mgr._reconcile()  # later reconciles keep it rolled back
    assert mgr.current().canary_state == CANARY_ROLLED_BACK


def test_a_second_rollback_of_the_same_candidate_changes_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(versions, "load_version", lambda r, m, v, x: FakeVersion(v))
    settings = config.load({"home": tmp_path}, environ={})
    mgr = VersionManager(settings, "race2", Policy.parse("canary:2:0.5"), registry=FakeRegistry(),  # type: ignore[arg-type]
                         follow_updates=False)
    mgr._reconcile()
    routing = mgr.current()
    mgr._rollback(routing, "first")
    rolled = mgr.current()
    mgr._rollback(routing, "stale second")  # computed from the old snapshot: ignored
    assert mgr.current() is rolled
