"""The trainer leader lease and the registry fence (streaming/lease.py, docs/LEADER.md), without TensorFlow.

A fake clock drives expiry, so these tests are instant and decide nothing by timing. The kill -9
failover of two real trainer processes is tests/test_trainer_leader.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from streaming.config import Settings
from streaming.exceptions import FencedError, LeaseError
from streaming.lease import FileLeaseStore, Lease, LeaseKeeper, LeaseRecord, lease_store
from streaming.model_registry import ModelRegistry


class Clock:
    """Wall (ms) and monotonic (s) clocks that move only when the test says so."""

    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def wall(self) -> int:
        return self.ms

    def mono(self) -> float:
        return self.ms / 1000.0

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


def _lease(store: Any, clock: Clock, owner: str, ttl: float = 10.0) -> Lease:
    return Lease(store, "m", ttl_s=ttl, owner=owner, clock=clock.wall, monotonic=clock.mono)


def _fake_version(reg: ModelRegistry, name: str = "m") -> Path:
    staging = reg.staging(name)
    (staging / "saved_model.pb").write_bytes(b"not loaded by this test")
    (staging / "variables").mkdir()
    (staging / "variables" / "variables.index").write_bytes(b"")
    return staging


def test_file_store_create_and_replace_are_conditional(tmp_path: Path) -> None:
    store = FileLeaseStore(tmp_path / "m" / "leader.json")
    assert store.read() == (None, None)
    assert store.create(b"one")
    assert not store.create(b"two")  # exists: atomic create-if-absent refuses
    data, token = store.read()
    assert data == b"one" and token is not None
    assert store.replace(b"three", token)
    assert not store.replace(b"four", token)  # the token is stale now: someone else wrote first
    assert store.read()[0] == b"three"
    assert [p.name for p in store.path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_one_holder_until_expiry_then_takeover_with_a_new_epoch(tmp_path: Path) -> None:
    clock = Clock()
    store = FileLeaseStore(tmp_path / "leader.json")
    a, b = _lease(store, clock, "a"), _lease(store, clock, "b")
    assert a.try_acquire() == 1
    assert b.try_acquire() is None  # held and not expired
    clock.advance(6)
    assert a.renew() and a.valid()
    clock.advance(9)  # 15 s after the first write, 9 s after the renewal: still held
    assert b.try_acquire() is None
    clock.advance(1.5)  # the renewal's expiry passed: a died or paused
    assert not a.valid()  # the holder stops trusting itself before others may take over
    assert b.try_acquire() == 2
    assert not a.renew() and a.epoch is None  # a wakes up: the lease is gone, it knows it
    rec = b.current()
    assert rec is not None and (rec.owner, rec.epoch) == ("b", 2)


def test_two_candidates_racing_for_an_expired_lease_get_one_epoch(tmp_path: Path) -> None:
    clock = Clock()
    store = FileLeaseStore(tmp_path / "leader.json")
    assert _lease(store, clock, "old").try_acquire() == 1
    clock.advance(11)
    start = threading.Barrier(8)
    won: list[tuple[str, int | None]] = []

    def race(owner: str) -> None:
        lease = _lease(store, clock, owner)
        start.wait()
        won.append((owner, lease.try_acquire()))

    threads = [threading.Thread(target=race, args=(f"c{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [(o, e) for o, e in won if e is not None]
    assert len(won) == 8 and len(winners) == 1 and winners[0][1] == 2, won
    rec = LeaseRecord.decode(store.read()[0] or b"", "test")
    assert rec.owner == winners[0][0]


def test_release_hands_over_at_once(tmp_path: Path) -> None:
    clock = Clock()
    store = FileLeaseStore(tmp_path / "leader.json")
    a, b = _lease(store, clock, "a"), _lease(store, clock, "b")
    assert a.try_acquire() == 1
    a.release()
    assert a.epoch is None
    assert b.try_acquire() == 2  # no waiting for the ttl after a clean stop


def test_keeper_floor_keeps_epochs_above_the_registry_after_the_lease_file_is_lost(tmp_path: Path) -> None:
    clock = Clock()
    store = FileLeaseStore(tmp_path / "leader.json")
    keeper = LeaseKeeper(_lease(store, clock, "a"), floor=lambda: 7)
    assert keeper.step() == 8 and keeper.epoch() == 8
    assert keeper.step() == 8  # a renewal keeps the epoch


def test_damaged_lease_record_is_a_clear_error(tmp_path: Path) -> None:
    store = FileLeaseStore(tmp_path / "leader.json")
    store.create(b"{not json")
    with pytest.raises(LeaseError, match="delete the file"):
        _lease(store, Clock(), "a").try_acquire()
    assert LeaseKeeper(_lease(store, Clock(), "a")).step() is None  # the keeper logs and stands by


def test_stale_leader_cannot_publish_promote_or_reject(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    assert reg.claim_leadership("m", 1) == 0
    v1 = reg.publish("m", _fake_version(reg), {"reason": "first"}, fence=1)
    assert v1 == 1
    staged = _fake_version(reg)  # the old leader exported a candidate, then paused
    assert reg.claim_leadership("m", 2) == 1  # a standby took over the lease and claimed epoch 2
    with pytest.raises(FencedError, match=r"epoch 1 is not the leader epoch 2.*another trainer took over"):
        reg.publish("m", staged, {"reason": "stale"}, fence=1)
    assert reg.versions("m") == [1] and reg.state("m")["last_version"] == 1  # nothing allocated
    with pytest.raises(FencedError):
        reg.record("m", 1, "REJECTED", "stale", fence=1)
    with pytest.raises(FencedError):
        reg.apply_retention("m", 1, fence=1)
    with pytest.raises(FencedError, match="older than the leader epoch 2"):
        reg.claim_leadership("m", 1)
    assert reg.publish("m", staged, {"reason": "new leader"}, fence=2) == 2
    created = [(e["version"], e.get("epoch")) for e in reg.history("m") if e["action"] == "CREATED"]
    assert created == [(1, 1), (2, 2)]
    assert reg.publish("m", _fake_version(reg), {}) == 3  # unfenced library writes keep working


def test_stale_leader_cannot_promote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = ModelRegistry(tmp_path / "models")
    reg.claim_leadership("m", 1)
    reg.publish("m", _fake_version(reg), {}, fence=1)
    monkeypatch.setattr(reg, "verify", lambda name, version: {})  # the fake SavedModel is not the point here
    reg.claim_leadership("m", 2)
    with pytest.raises(FencedError):
        reg.set_promoted("m", 1, "stale", fence=1)
    assert reg.promoted("m") is None
    assert reg.set_promoted("m", 1, "leader", fence=2) is None and reg.promoted("m") == 1


def test_trainer_stands_by_and_its_publish_is_refused_after_a_takeover(settings: Settings) -> None:
    """Trainer.lead(): the holder claims its epoch; after a takeover it is a standby and its writes fail."""
    from tests.restart_spec import SPEC
    from trainer.worker import Trainer

    clock = Clock()
    store = lease_store(ModelRegistry(settings.model_dir), SPEC.name)
    a = LeaseKeeper(_lease(store, clock, "a", ttl=3))
    b = LeaseKeeper(_lease(store, clock, "b", ttl=3))
    ta = Trainer(settings, SPEC, events=False, lease=a)
    tb = Trainer(settings, SPEC, events=False, lease=b)
    assert a.step() == 1 and b.step() is None
    assert ta.lead() and not tb.lead() and ta.fence == 1
    reg = ta.registry
    assert reg.state(SPEC.name)["leader_epoch"] == 1
    staged = _fake_version(reg, SPEC.name)
    clock.advance(5)  # a is paused past its expiry
    assert b.step() == 2 and tb.lead() and tb.fence == 2
    with pytest.raises(FencedError):
        reg.publish(SPEC.name, staged, {}, fence=ta.fence)
    assert not ta.lead() and ta.fence is None  # a notices at its next step and stands by
    with pytest.raises(FencedError, match="does not hold the model's lease"):
        ta.run_once("test")
    assert json.loads(store.read()[0] or b"{}")["owner"] == "b"


def test_a_dead_holder_on_this_host_is_taken_over_before_expiry(tmp_path: Path) -> None:
    """kill -9 and restart with the same command: the new process leads at once, not after the ttl."""
    import subprocess
    import sys

    from streaming.lease import host_id

    clock = Clock()
    store = FileLeaseStore(tmp_path / "leader.json")
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        held = LeaseRecord("m", "other", 3, clock.wall() + 60_000, clock.wall(), 60.0, host_id(), live.pid)
        assert store.create(held.encode())
        assert _lease(store, clock, "b").try_acquire() is None  # alive: wait for the expiry
    finally:
        live.communicate(b"")
    data, token = store.read()
    assert data is not None and token is not None
    assert _lease(store, clock, "b").try_acquire() == 4  # the holder's process is gone: take over now
    elsewhere = LeaseRecord("m", "remote", 5, clock.wall() + 60_000, clock.wall(), 60.0, "otherhost:1", live.pid)
    data, token = store.read()
    assert token is not None and store.replace(elsewhere.encode(), token)
    assert _lease(store, clock, "c").try_acquire() is None  # another host's pid says nothing here


class MemoryObjects:
    """An object store with conditional puts (the three calls ObjectLeaseStore needs), in memory.

    Stands in for S3/GCS semantics (create-if-absent, replace-if-generation) to show the lease needs
    nothing else; the fsspec store itself is tested with the registry on object storage.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, tuple[bytes, int]] = {}

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        with self.lock:
            cur = self.data.get(key)
            return None if cur is None else (cur[0], str(cur[1]))

    def create(self, key: str, data: bytes) -> bool:
        with self.lock:
            if key in self.data:
                return False
            self.data[key] = (data, 1)
            return True

    def replace_if(self, key: str, data: bytes, token: str | None) -> bool:
        with self.lock:
            cur = self.data.get(key)
            if cur is None or str(cur[1]) != token:
                return False
            self.data[key] = (data, cur[1] + 1)
            return True


def test_lease_over_an_object_store_with_conditional_puts() -> None:
    from streaming.lease import ObjectLeaseStore

    class Registry:  # what lease_store() looks at: a registry on object storage has ``objects``
        objects = MemoryObjects()

    store = lease_store(Registry(), "m")
    assert isinstance(store, ObjectLeaseStore) and store.key == "m/leader.json"
    clock = Clock()
    a, b = _lease(store, clock, "a"), _lease(store, clock, "b")
    assert a.try_acquire() == 1 and b.try_acquire() is None
    assert a.renew()
    clock.advance(11)
    assert b.try_acquire() == 2 and not a.renew()
    data, token = store.read()
    assert data is not None and not store.replace(b"x", "stale") and store.replace(data, token or "")


def test_train_once_refuses_while_another_trainer_leads(settings: Settings, tmp_path: Path) -> None:
    """`streamlearn train M --once` beside a leading trainer: exit 4 and a message naming the holder."""
    import os
    import subprocess

    from streaming.lease import host_id
    from tests.helpers import ROOT, streamlearn_cmd, subprocess_env

    reg = ModelRegistry(settings.model_dir)
    store = lease_store(reg, "restart_tiny")
    now = int(time.time() * 1000)
    held = LeaseRecord("restart_tiny", "leader-elsewhere", 3, now + 600_000, now, 600.0, host_id(), os.getpid())
    assert store.create(held.encode())  # held by this (live) test process
    config = tmp_path / "config.toml"
    config.write_text('[models]\nrestart_tiny = "tests.restart_spec:SPEC"\n')
    env = subprocess_env(settings, STREAMLEARN_CONFIG=str(config), PYTHONPATH=str(ROOT))
    proc = subprocess.run(streamlearn_cmd("train", "restart_tiny", "--once", "--no-events"), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "leader-elsewhere" in proc.stderr and "only the leader trains" in proc.stderr
    assert reg.versions("restart_tiny") == []
    rec = LeaseRecord.decode(store.read()[0] or b"", "test")
    assert (rec.owner, rec.epoch) == ("leader-elsewhere", 3)  # the refused trainer did not touch the lease


def test_a_distributed_chief_without_the_lease_applies_no_pending_decision(settings: Settings) -> None:
    """The chief reconciled (promoted a version whose gate passed but whose decision was not recorded)
    before it checked the lease: a run that never led, and then failed, changed what serving answers with."""
    from tests.restart_spec import SPEC
    from trainer.distributed import Cluster
    from trainer.multiworker import run_distributed

    clock = Clock()
    reg = ModelRegistry(settings.model_dir)
    store = lease_store(reg, SPEC.name)
    leader, chief = LeaseKeeper(_lease(store, clock, "leader")), LeaseKeeper(_lease(store, clock, "chief"))
    assert leader.step() == 1 and chief.step() is None
    reg.claim_leadership(SPEC.name, 1)
    reg.publish(SPEC.name, _fake_version(reg, SPEC.name), {}, fence=1)
    reg.set_promoted(SPEC.name, 1, "first", fence=1)
    reg.publish(SPEC.name, _fake_version(reg, SPEC.name), {"gate": {"promote": True, "reason": "better"}}, fence=1)
    cluster = Cluster(("127.0.0.1:1", "127.0.0.1:2"), 0)
    with pytest.raises(FencedError, match="does not hold the model's lease"):
        # a short rendezvous: without the check the chief waits for workers that never come
        run_distributed(settings.with_(distributed_timeout_s=3.0), SPEC, cluster, events=False, lease=chief)
    assert reg.promoted(SPEC.name) == 1  # the pending version 2 waits for the leader
