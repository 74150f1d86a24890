"""Replay and rebuild the way the README shows, as subprocesses on the real embedded broker.

* the README's replay example (relative time) replays exactly the records of the last two hours;
* --from-beginning and --from-offset; a start before the earliest *retained* record is an error built
  from the topic's real offsets, while an old start on an untrimmed topic is not (no retention arithmetic);
* progress lines off a terminal, a bar on one, nothing with --quiet;
* rebuild-to-live: `store promote` is refused while a worker holds the group, swaps the namespace in,
  moves the group's offsets back to the rebuild's end; the restarted worker then featurizes the rest
  with nothing lost or duplicated; a promotion killed after any step is rolled forward by running the
  command again or by the next `streamlearn stream`.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, TopicPartition

from streaming.config import Settings
from streaming.exceptions import GroupActiveError
from streaming.offsets import earliest_and_end, group_state
from streaming.producer import Publisher
from streaming.promote import _exclusive, hold_live, promote
from streaming.replay import read_range
from streaming.store import FeatureStore
from streaming.topics import KINDS, raw_topic
from streaming.worker import default_group
from tests.helpers import ROOT, read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import committed, end_offsets, publish, running_worker, sensor_events, stored_offsets

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def _now_ms() -> int:
    return int(time.time() * 1000)


def publish_at(settings: Settings, records: list[dict[str, Any]], timestamps: list[int]) -> None:
    """Publish sensor records with explicit Kafka record times (CreateTime), as a producer replaying
    history would; keyed like Publisher.publish so partitions match."""
    topic = raw_topic(settings, "sensor")
    with Publisher(settings) as pub:
        for record, ts in zip(records, timestamps, strict=True):
            value = pub.encode(topic, KINDS["sensor"], record)
            pub.producer.send(topic, value=value, key=record["sensor_id"].encode(), timestamp_ms=ts)
        pub.flush()


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(streamlearn_cmd(*args), env=subprocess_env(settings), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def readme_command(prefix: str) -> list[str]:
    """The README line starting with ``prefix`` (comment stripped), as argv without 'streamlearn'."""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(prefix):
            argv = shlex.split(line.split("  #")[0])
            assert argv[0] == "streamlearn"
            return argv[1:]
    raise AssertionError(f"README has no line starting with {prefix!r}")


def result_json(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert out.returncode == 0, out.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return parsed


def offsets_where(settings: Settings, predicate: Any) -> set[tuple[int, int]]:
    items = read_topic(settings, raw_topic(settings, "sensor"), decode=False)
    return {(it.partition, it.offset) for it in items if predicate(it)}


# ---- replay starts -------------------------------------------------------------------------------

def test_readme_replay_example_with_relative_time(settings: Settings) -> None:
    now = _now_ms()
    old = sensor_events(30)
    recent = sensor_events(40, start=30)
    publish_at(settings, old, [now - 3 * HOUR_MS + i * 1000 for i in range(30)])
    publish_at(settings, recent, [now - 90 * 60_000 + i * 60_000 for i in range(40)])
    argv = readme_command("streamlearn replay ")
    assert "--from-timestamp" in argv and argv[argv.index("--from-timestamp") + 1].startswith("-")
    out = result_json(cli(settings, *argv))
    assert out["records"] == 40 and out["namespace"] == "rebuild"
    expected = offsets_where(settings, lambda it: it.timestamp >= now - 2 * HOUR_MS)
    assert len(expected) == 40
    got = stored_offsets(settings, "sensor", "rebuild")
    assert sorted(got) == sorted(expected)  # each recent record exactly once, none of the old ones
    record = read_range(FeatureStore(settings.feature_store).directory("sensor", "rebuild"))
    assert record is not None and {int(p): o for p, o in record["stop"].items()} == end_offsets(settings, "sensor")


def test_from_beginning_and_from_offset(settings: Settings) -> None:
    publish(settings, "sensor", sensor_events(60))
    everything = offsets_where(settings, lambda it: True)
    out = result_json(cli(settings, "replay", "sensor", "--from-beginning", "--into", "all", "--quiet"))
    assert out["records"] == 60 and sorted(stored_offsets(settings, "sensor", "all")) == sorted(everything)

    ends = end_offsets(settings, "sensor")
    start = {p: min(3 + p, ends[p]) for p in ends}
    argv = ["--from-offset", f"0:{start[0]}", "--from-offset", ",".join(f"{p}:{start[p]}" for p in (1, 2))]
    out = result_json(cli(settings, "replay", "sensor", *argv, "--into", "some", "--quiet"))
    wanted = {(p, o) for p, o in everything if o >= start[p]}
    assert out["records"] == len(wanted) and sorted(stored_offsets(settings, "sensor", "some")) == sorted(wanted)

    only = result_json(cli(settings, "replay", "sensor", "--from-offset", "1:0", "--into", "one", "--quiet"))
    assert only["start"] == {"1": 0} and {p for p, _ in stored_offsets(settings, "sensor", "one")} == {1}

    partial = cli(settings, "store", "promote", "sensor", "--from", "one")  # the live directory is swapped whole
    assert partial.returncode == 1 and "covers partitions [1]" in partial.stderr and "not [0, 2]" in partial.stderr
    (FeatureStore(settings.feature_store).directory("sensor", "all") / "_replay.json").unlink()  # as if interrupted
    unfinished = cli(settings, "store", "promote", "sensor", "--from", "all")
    assert unfinished.returncode == 1 and "no completed replay record" in unfinished.stderr
    assert sorted(stored_offsets(settings, "sensor", "all")) == sorted(everything)  # refusals change nothing
    assert FeatureStore(settings.feature_store).batch_ids("sensor") == []

    bad = cli(settings, "replay", "sensor", "--from-offset", "1-0", "--into", "bad")
    assert bad.returncode == 1 and "--from-offset: '1-0' is not PARTITION:OFFSET" in bad.stderr
    past = cli(settings, "replay", "sensor", "--from-offset", f"0:{ends[0] + 5}", "--into", "bad")
    assert past.returncode == 1 and f"past the end of partition 0 (next offset {ends[0]})" in past.stderr
    both = cli(settings, "replay", "sensor", "--from-beginning", "--from-offset", "0:0", "--into", "bad")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_start_before_the_earliest_record_is_checked_against_real_offsets(settings: Settings) -> None:
    now = _now_ms()
    # a start older than the topic's 7-day retention, over records that are still on the topic: the old
    # retention arithmetic refused this. The records themselves are 6 days old, inside the retention, so a
    # broker that enforces retention while the test runs (the embedded one does) keeps them.
    publish_at(settings, sensor_events(30), [now - 6 * DAY_MS + i * 1000 for i in range(30)])
    publish_at(settings, sensor_events(10, start=30), [now - 60_000 + i * 1000 for i in range(10)])
    out = result_json(cli(settings, "replay", "sensor", "--from-timestamp", "-9d", "--into", "old", "--quiet"))
    assert out["records"] == 40 and set(out["start"].values()) == {0}

    topic = raw_topic(settings, "sensor")
    ends = end_offsets(settings, "sensor")
    trim = {p: min(2, ends[p]) for p in ends}
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap)
    try:
        admin.delete_records({TopicPartition(topic, p): o for p, o in trim.items()})
    finally:
        admin.close()
    begins, _ = earliest_and_end(settings, topic)
    assert begins == trim
    p = max(trim, key=lambda q: trim[q])
    assert trim[p] > 0

    bad = cli(settings, "replay", "sensor", "--from-timestamp", "-9d", "--into", "trimmed")
    assert bad.returncode == 1, bad.stderr
    assert "--from-timestamp:" in bad.stderr and "were deleted" in bad.stderr
    assert re.search(r"earliest available record is offset \d+ at \d{4}-\d\d-\d\dT", bad.stderr), bad.stderr
    assert "--from-beginning" in bad.stderr
    assert not FeatureStore(settings.feature_store).batch_ids("sensor", "trimmed")
    hint = re.search(r"use --from-timestamp at or after (\d+ms)", bad.stderr)
    assert hint, bad.stderr  # a value valid for every partition, in a form the parser accepts
    ok = result_json(cli(settings, "replay", "sensor", "--from-timestamp", hint.group(1), "--into", "hinted",
                         "--quiet"))
    assert ok["records"] > 0 and all(ok["start"][str(q)] >= trim[q] for q in trim)

    sub = cli(settings, "subscribe", "sensor.raw", "--from-timestamp", "-9d", "--until-end", "--json")
    assert sub.returncode == 1 and "were deleted" in sub.stderr, sub.stderr
    hint = re.search(r"e\.g\. (\d+ms)\)", sub.stderr)
    assert hint, sub.stderr  # the hint is a value the time parser accepts
    later = cli(settings, "subscribe", "sensor.raw", "--from-timestamp", hint.group(1), "--until-end", "--json")
    assert later.returncode == 0, later.stderr

    gone = cli(settings, "replay", "sensor", "--from-offset", f"{p}:0", "--into", "trimmed")
    assert gone.returncode == 1 and f"use --from-offset {p}:{trim[p]} or --from-beginning" in gone.stderr

    rest = result_json(cli(settings, "replay", "sensor", "--from-beginning", "--into", "trimmed", "--quiet"))
    assert rest["records"] == 40 - sum(trim.values())
    assert {(q, o) for q, o in stored_offsets(settings, "sensor", "trimmed")} == \
        {(q, o) for q in ends for o in range(trim[q], ends[q])}


# ---- progress ------------------------------------------------------------------------------------

def test_progress_lines_off_a_terminal_and_quiet(settings: Settings) -> None:
    publish(settings, "sensor", sensor_events(300))
    out = cli(settings, "replay", "sensor", "--from-beginning", "--into", "p1", "--batch-max-records", "20",
              "--progress-interval", "0.001")
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "replay sensor -> p1:" in ln]
    assert any(re.search(r"\d+/300 \(\d+%\) [\d.,]+ records/s, \d+s elapsed, ETA ", ln) for ln in lines), out.stderr
    assert re.search(r"replay sensor -> p1: done, 300 records in", out.stderr), out.stderr
    quiet = cli(settings, "replay", "sensor", "--from-beginning", "--into", "p2", "--quiet",
                "--progress-interval", "0.001")
    assert quiet.returncode == 0 and "replay sensor ->" not in quiet.stderr
    assert json.loads(quiet.stdout.strip().splitlines()[-1])["records"] == 300


def test_progress_bar_on_a_terminal(settings: Settings) -> None:
    publish(settings, "sensor", sensor_events(200))
    master, slave = pty.openpty()
    proc = subprocess.Popen(streamlearn_cmd("replay", "sensor", "--from-beginning", "--into", "tty"),
                            env=subprocess_env(settings), stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        stdout, _ = proc.communicate(timeout=120)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert proc.returncode == 0, text[-2000:]
    assert "replay sensor -> tty" in text and "200/200" in text and "records/s" in text and "ETA" in text, text
    assert json.loads(stdout.decode().strip().splitlines()[-1])["records"] == 200


# ---- rebuild to live -----------------------------------------------------------------------------

@contextmanager
def stream_worker(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`streamlearn stream sensor` as the README starts it; stopped with SIGTERM (a clean stop)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(streamlearn_cmd("stream", "sensor"), env=subprocess_env(settings),
                                stdout=subprocess.DEVNULL, stderr=fh, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def run_worker_until_complete(settings: Settings, log: Path) -> None:
    """Run the live worker until the store holds every offset of the topic and the group committed the end."""
    expected = offsets_where(settings, lambda it: True)
    with stream_worker(settings, log) as proc:
        try:
            wait_until(lambda: set(stored_offsets(settings, "sensor")) >= expected or proc.poll() is not None, 90,
                       message="live worker persisted every offset")
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            wait_until(lambda: committed(settings, "sensor") == end_offsets(settings, "sensor"), 30,
                       message="live worker committed the end")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from exc
    wait_until(lambda: group_state(settings, default_group(settings, "sensor"))[1] == 0, 30,
               message="group empty after a clean stop")


def exactly_once(settings: Settings) -> None:
    got = stored_offsets(settings, "sensor")
    dups = [k for k, n in Counter(got).items() if n > 1]
    assert not dups, f"duplicated offsets in live: {dups[:10]}"
    assert set(got) == offsets_where(settings, lambda it: True)


def _setup_rebuild_behind_live(settings: Settings, log: Path) -> tuple[dict[int, int], list[str], list[str]]:
    """90 records rebuilt into 'rebuild' (batches of 10), then 30 more; the live worker has all 120 (batches
    of 16). Returns (the rebuild's stop offsets, its batch ids, the live batch ids)."""
    publish(settings, "sensor", sensor_events(90))
    result_json(cli(settings, "replay", "sensor", "--from-beginning", "--into", "rebuild",
                    "--batch-max-records", "10", "--quiet"))
    store = FeatureStore(settings.feature_store)
    record = read_range(store.directory("sensor", "rebuild"))
    assert record is not None
    stop = {int(p): int(o) for p, o in record["stop"].items()}
    assert stop == end_offsets(settings, "sensor")
    rebuild_ids = store.batch_ids("sensor", "rebuild")
    publish(settings, "sensor", sensor_events(30, start=90))
    run_worker_until_complete(settings, log)
    live_ids = store.batch_ids("sensor")
    assert set(live_ids).isdisjoint(rebuild_ids)  # different batch sizes: the swap is visible
    return stop, rebuild_ids, live_ids


def test_rebuild_to_live(settings: Settings, tmp_path: Path) -> None:
    s = settings.with_(batch_max_records=16, batch_max_seconds=0.3)
    log = tmp_path / "worker.log"
    stop, rebuild_ids, live_ids = _setup_rebuild_behind_live(s, log)
    store = FeatureStore(s.feature_store)
    ends = end_offsets(s, "sensor")
    assert stop != ends  # the live group is ahead of the rebuild: promotion moves it back

    with stream_worker(s, log):  # a live worker runs: refused, nothing changed
        wait_until(lambda: group_state(s, default_group(s, "sensor"))[1] == 1, 30, message="worker joined")
        refused = cli(s, *readme_command("streamlearn store promote "))
        assert refused.returncode == 1, refused.stderr
        assert "`streamlearn stream sensor` worker on this host is running" in refused.stderr
        assert "stop its workers" in refused.stderr
        assert store.batch_ids("sensor", "rebuild") == rebuild_ids and store.batch_ids("sensor") == live_ids
    wait_until(lambda: group_state(s, default_group(s, "sensor"))[1] == 0, 30, message="group empty")
    # a member of the group that holds no lock here (another host, or a worker embedded in-process): refused too
    with running_worker(s, "sensor"):
        wait_until(lambda: group_state(s, default_group(s, "sensor"))[1] == 1, 30, message="member joined")
        with pytest.raises(GroupActiveError, match="1 active member.*stop its `streamlearn stream` workers"):
            promote(s, "sensor", "rebuild")
        assert store.batch_ids("sensor", "rebuild") == rebuild_ids
        assert not (store.root / ".promote-sensor.json").exists()
    wait_until(lambda: group_state(s, default_group(s, "sensor"))[1] == 0, 30, message="group empty")
    assert committed(s, "sensor") == ends

    out = cli(s, *readme_command("streamlearn store promote "), "--json")
    info = result_json(out)
    assert info["from"] == "rebuild" and not info["rolled_forward"]
    assert {int(p): o for p, o in info["offsets"].items()} == stop
    assert store.batch_ids("sensor") == rebuild_ids and store.batch_ids("sensor", "rebuild") == []
    assert store.batch_ids("sensor", info["archived_as"]) == live_ids  # the old live batches are kept
    assert committed(s, "sensor") == stop
    again = cli(s, *readme_command("streamlearn store promote "))
    # the same command after it finished (a crash after the last step looks the same): done, nothing moved
    assert again.returncode == 0 and "already live" in again.stdout, again.stderr
    assert committed(s, "sensor") == stop and store.batch_ids("sensor") == rebuild_ids

    run_worker_until_complete(s, log)  # resumes from the promoted offsets
    exactly_once(s)
    assert set(rebuild_ids) <= set(store.batch_ids("sensor"))

    # going back: the archived live namespace is promotable like a replay, and live goes on from where it stood
    back = result_json(cli(s, "store", "promote", "sensor", "--from", info["archived_as"], "--json"))
    assert store.batch_ids("sensor") == live_ids and {int(p): o for p, o in back["offsets"].items()} == ends
    assert committed(s, "sensor") == ends and store.batch_ids("sensor", back["archived_as"])
    publish(s, "sensor", sensor_events(10, start=120))
    run_worker_until_complete(s, log)
    exactly_once(s)


def test_a_replay_that_read_nothing_is_not_promoted_over_live_batches(settings: Settings, tmp_path: Path) -> None:
    """`replay ... --to 1970-01-02 --into topast` read 0 records; promoting it moved every live batch to
    `replaced-*`, left live empty and reset the group's offsets. It is now refused, live untouched."""
    s = settings.with_(batch_max_records=16, batch_max_seconds=0.3)
    publish(s, "sensor", sensor_events(40))
    run_worker_until_complete(s, tmp_path / "worker.log")
    store = FeatureStore(s.feature_store)
    live_ids, before = store.batch_ids("sensor"), committed(s, "sensor")
    assert live_ids
    empty = result_json(cli(s, "replay", "sensor", "--from-beginning", "--to", "1970-01-02T00:00:00Z",
                            "--into", "topast", "--quiet"))
    assert empty["records"] == 0
    refused = cli(s, "store", "promote", "sensor", "--from", "topast")
    assert refused.returncode == 1 and "would replace the" in refused.stderr and "with none" in refused.stderr
    assert store.batch_ids("sensor") == live_ids and committed(s, "sensor") == before


CRASH = """
import os, sys
from streaming import config
from streaming.promote import promote
promote(config.load(), "sensor", "rebuild", on_step=lambda step: os._exit(137) if step == sys.argv[1] else None)
"""


@pytest.mark.parametrize("step", ["intent", "archived", "swapped", "committed"])
def test_promotion_killed_half_way_rolls_forward(settings: Settings, tmp_path: Path, step: str) -> None:
    s = settings.with_(batch_max_records=16, batch_max_seconds=0.3)
    log = tmp_path / "worker.log"
    stop, rebuild_ids, live_ids = _setup_rebuild_behind_live(s, log)
    ends = end_offsets(s, "sensor")
    store = FeatureStore(s.feature_store)
    killed = subprocess.run([sys.executable, "-c", CRASH, step], env=subprocess_env(s), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert (store.root / ".promote-sensor.json").exists()
    # the disk shows exactly the steps done
    swapped = step in ("swapped", "committed")
    assert store.batch_ids("sensor") == (rebuild_ids if swapped else live_ids if step == "intent" else [])
    assert store.batch_ids("sensor", "rebuild") == ([] if swapped else rebuild_ids)
    assert committed(s, "sensor") == (stop if step == "committed" else ends)

    if step == "swapped":  # the most dangerous state (new batches, old offsets): the worker's own start fixes it
        run_worker_until_complete(s, log)
        assert "was interrupted; finishing it" in log.read_text(errors="replace")
    else:  # the same command again
        out = cli(s, "store", "promote", "sensor", "--from", "rebuild")
        assert out.returncode == 0, out.stderr
        assert "finished an interrupted promotion of sensor from 'rebuild'" in out.stdout
        assert committed(s, "sensor") == stop and store.batch_ids("sensor") == rebuild_ids
        run_worker_until_complete(s, log)
    assert not (store.root / ".promote-sensor.json").exists()
    archives = [d.name for d in store.root.iterdir() if d.name.startswith("replaced-")]
    assert len(archives) == 1 and store.batch_ids("sensor", archives[0]) == live_ids
    exactly_once(s)


def test_live_workers_share_the_lock_and_keep_promotions_out(tmp_path: Path) -> None:
    from streaming import config

    s = config.load({"home": tmp_path / "home", "kafka_bootstrap": "127.0.0.1:1"})  # no broker needed: no intent
    root = FeatureStore(s.feature_store).root
    with hold_live(s, "sensor") as first, hold_live(s, "sensor") as second:  # workers of one kind run side by side
        assert first is None and second is None
        with pytest.raises(GroupActiveError, match="worker on this host is running"), _exclusive(root, "sensor"):
            pass
        with _exclusive(root, "weblog"):  # other kinds are independent
            pass
    with _exclusive(root, "sensor"):  # free again once the workers stopped
        pass
