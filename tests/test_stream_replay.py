"""Replay determinism, timestamp range errors, group offset show/reset (refused while active)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from streaming.config import Settings
from streaming.exceptions import GroupActiveError, OffsetOutOfRangeError
from streaming.offsets import group_state, offsets_for_timestamp, reset, show
from streaming.replay import ReplayError, replay
from streaming.store import FeatureStore, read_batch
from streaming.topics import raw_topic
from streaming.worker import default_group
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import (
    committed,
    end_offsets,
    publish,
    running_worker,
    sensor_events,
    stored_offsets,
    topic_offsets,
)

DAY_MS = 86_400_000


def _now_ms() -> int:
    return int(time.time() * 1000)


def _next_ms(after: int) -> int:
    return wait_until(lambda: _now_ms() > after and _now_ms(), 2, interval=0.001, message="clock tick")


def test_replay_twice_gives_identical_bytes_and_leaves_live_offsets(settings: Settings) -> None:
    s = settings.with_(batch_max_records=32)
    t0 = _now_ms()
    publish(s, "sensor", sensor_events(100))
    mid = _next_ms(_now_ms())
    publish(s, "sensor", sensor_events(50, start=100))
    topic = raw_topic(s, "sensor")
    r1 = replay(s, "sensor", from_ms=t0 - 1000, namespace="r1")
    r2 = replay(s, "sensor", from_ms=t0 - 1000, namespace="r2")
    store = FeatureStore(s.feature_store)
    b1, b2 = store.batches("sensor", "r1"), store.batches("sensor", "r2")
    assert r1.records == 150 and len(r1.batches_written) == len(b1) > 3
    assert sorted(b.batch_id for b in b1) == sorted(b.batch_id for b in b2)
    by_id = {b.batch_id: b for b in b2}
    for b in b1:
        assert b.path.read_bytes() == by_id[b.batch_id].path.read_bytes()
    assert set(stored_offsets(s, "sensor", "r1")) == topic_offsets(s, topic)
    again = replay(s, "sensor", from_ms=t0 - 1000, namespace="r1")
    assert again.batches_written == [] and len(again.batches_existing) == len(b1)
    assert r2.records == 150 and committed(s, "sensor") == dict.fromkeys(range(s.partitions))
    assert group_state(s, default_group(s, "sensor"))[0] == "Dead"  # no group was ever created
    # --to bounds the range by record time: only the first 100 events
    part = replay(s, "sensor", from_ms=t0 - 1000, to_ms=mid, namespace="r3")
    assert part.records == 100 and len(stored_offsets(s, "sensor", "r3")) == 100
    with pytest.raises(ReplayError, match="live"):
        replay(s, "sensor", from_ms=t0, namespace="live")
    with pytest.raises(ReplayError, match=r"--to: \d{4}-\d\d-\d\dT.*Z \(\d+ms\) must be after --from-timestamp "):
        replay(s, "sensor", from_ms=t0, to_ms=t0 - 1, namespace="r4")  # both times readable, not bare ms


def test_timestamps_outside_the_topic_are_errors_that_say_what_exists(settings: Settings) -> None:
    publish(settings, "sensor", sensor_events(10))
    topic = raw_topic(settings, "sensor")
    # older than the 7-day retention, but nothing was deleted (every partition starts at offset 0):
    # the range simply starts at offset 0 (the old retention arithmetic refused this)
    start = offsets_for_timestamp(settings, topic, _now_ms() - 8 * DAY_MS)
    assert start == dict.fromkeys(range(settings.partitions), 0)
    with pytest.raises(OffsetOutOfRangeError, match="after the last record .*newest at"):
        offsets_for_timestamp(settings, topic, _now_ms() + 3_600_000)
    with pytest.raises(OffsetOutOfRangeError, match="after the last record"):
        replay(settings, "sensor", from_ms=_now_ms() + 3_600_000, namespace="late")
    with pytest.raises(OffsetOutOfRangeError, match="holds no records"):
        offsets_for_timestamp(settings, raw_topic(settings, "weblog"), _now_ms())


def test_reset_refuses_an_active_group_then_resets_an_empty_one(settings: Settings) -> None:
    s = settings.with_(batch_max_records=20, batch_max_seconds=0.2)
    publish(s, "sensor", sensor_events(40))
    topic = raw_topic(s, "sensor")
    group = default_group(s, "sensor")
    with running_worker(s, "sensor"):
        wait_until(lambda: len(stored_offsets(s, "sensor")) == 40, 30, message="worker caught up")
        assert group_state(s, group)[1] == 1
        with pytest.raises(GroupActiveError, match="active member"):
            reset(s, group, topic, to_earliest=True)
    assert committed(s, "sensor") == end_offsets(s, "sensor")
    wait_until(lambda: group_state(s, group)[1] == 0, 20, message="group empty after the worker stopped")
    target = reset(s, group, topic, to_earliest=True)
    assert target == dict.fromkeys(range(s.partitions), 0)
    assert [p.committed for p in show(s, group, topic)] == [0] * s.partitions
    with pytest.raises(OffsetOutOfRangeError, match="outside partition"):
        reset(s, group, topic, to_offset=10**9)


def test_cli_replay_and_offsets(settings: Settings) -> None:
    t0 = _now_ms()
    publish(settings, "sensor", sensor_events(30))
    env = subprocess_env(settings)
    out = subprocess.run(streamlearn_cmd("replay", "sensor", "--from-timestamp", f"{t0 - 1000}ms", "--into",
                                         "cli", "--batch-max-records", "16"),
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["records"] == 30
    batches = FeatureStore(settings.feature_store).batches("sensor", "cli")
    assert sum(len(read_batch(b.path)["offset"]) for b in batches) == 30
    shown = subprocess.run(streamlearn_cmd("offsets", "show", "--kind", "sensor", "--json"), env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert sum(p["latest"] for p in info["partitions"]) == 30
    late = subprocess.run(streamlearn_cmd("replay", "sensor", "--from-timestamp", "2999-01-01T00:00:00Z",
                                          "--into", "late"), env=env, capture_output=True, text=True, timeout=60)
    assert late.returncode == 1 and "--from-timestamp" in late.stderr and "after the last record" in late.stderr


def _state_of(store: FeatureStore, namespace: str) -> dict[str, object]:
    """Every file of the namespace's kind directory (the range record without its completion time)."""
    directory = store.directory("sensor", namespace)
    out: dict[str, object] = {p.name: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    if "_replay.json" in out:
        out["_replay.json"] = {k: v for k, v in json.loads(out["_replay.json"]).items()  # type: ignore[arg-type]
                               if k != "completed_at_ms"}
    return out


def test_a_namespace_holds_one_replay_and_another_start_is_refused_before_anything_is_written(
        settings: Settings) -> None:
    """Three findings of a replay probe, one cause (a namespace took any start):
    * `--from-beginning` into a namespace holding a replay from a later offset kept the old batches where the
      batch boundaries met (built from empty windows there) and recorded a full rebuild, which promote made live;
    * an earlier start that did not meet them wrote its first batches, then was refused at the overlap: the
      namespace could no longer be promoted;
    * a narrower re-run into a completed namespace rewrote its recorded range, so promote refused it."""
    s = settings.with_(batch_max_records=8)
    publish(s, "sensor", sensor_events(64, sensors=1))  # one key: every record on one partition
    (p,) = [q for q, end in end_offsets(s, "sensor").items() if end]
    store = FeatureStore(s.feature_store)
    late = replay(s, "sensor", from_offsets={p: 24}, namespace="m")
    assert late.start == {p: 24} and late.records == 40
    before = _state_of(store, "m")
    everything = ",".join(f"{q}:0" for q in range(s.partitions))
    for kwargs, says in (({"from_beginning": True}, f"holds a completed replay of .* from offsets {p}:24; this one "
                                                    f"starts at {everything}, a different replay"),
                         ({"from_offsets": {p: 16}}, f"from offsets {p}:24; this one starts at {p}:16"),
                         ({"from_offsets": {p: 32}}, f"from offsets {p}:24; this one starts at {p}:32")):
        with pytest.raises(ReplayError, match=says):
            replay(s, "sensor", namespace="m", **kwargs)  # type: ignore[arg-type]
        assert _state_of(store, "m") == before, kwargs  # nothing written, the recorded range kept
    again = replay(s, "sensor", from_offsets={p: 24}, namespace="m")  # the same replay: nothing to do
    assert again.batches_written == [] and _state_of(store, "m") == before
    directory = store.directory("sensor", "m")
    (directory / "_replay.json").rename(directory / "_kept.json")  # batches whose replay left no record
    with pytest.raises(ReplayError, match="holds batches but no record of the replay that wrote them"):
        replay(s, "sensor", from_beginning=True, namespace="m")


def test_a_relative_start_that_drifted_past_the_newest_record_completes_the_interrupted_replay(
        settings: Settings) -> None:
    """`replay --from-timestamp -Ns` killed, then run again once N seconds reach past the newest record: the
    start resolved after the last record and the documented resume was an error."""
    from streaming.replay import START_FILE

    s = settings.with_(batch_max_records=8)
    publish(s, "sensor", sensor_events(40, sensors=1))
    topic = raw_topic(s, "sensor")
    ends = end_offsets(s, "sensor")
    store = FeatureStore(s.feature_store)
    directory = store.directory("sensor", "drift")
    directory.mkdir(parents=True)  # what a run killed before its first batch leaves: its recorded start
    (directory / START_FILE).write_text(json.dumps({"topic": topic, "start": dict.fromkeys(map(str, ends), 0)}))
    done = replay(s, "sensor", from_ms=_now_ms() + 60_000, namespace="drift")
    assert done.start == dict.fromkeys(ends, 0) and done.records == 40 and not (directory / START_FILE).exists()
    with pytest.raises(OffsetOutOfRangeError, match="after the last record"):  # with no replay there: an error
        replay(s, "sensor", from_ms=_now_ms() + 60_000, namespace="elsewhere")
