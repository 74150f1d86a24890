"""Broker kill -9 under a running stream worker, then new records: offset reuse is detected.

The embedded broker loses its last ~1 s of acked writes on SIGKILL and gives those offsets to new
records. The records here are published *without* the publisher's ack ledger (loss window 0), so
what the broker lost stays lost and the restarted broker re-uses the offsets: the worker's store
then holds batches for records that no longer exist. The worker (``streamlearn stream sensor``, a
subprocess that lives through every kill) must quarantine those batches and featurize every
record the topic holds now exactly once.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from streaming import config
from streaming.divergence import _read_chain, quarantined
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.store import FeatureStore, StoreError
from streaming.topics import raw_topic
from tests.broker_crash_helpers import crash_broker_fixture  # noqa: F401 (the crash_broker fixture)
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import stored_offsets

pytestmark = pytest.mark.slow
MAX_KILLS = 8


def _ends(settings: config.Settings) -> dict[int, int]:
    topic = raw_topic(settings, "sensor")
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap, request_timeout_ms=10_000)
    try:
        ends = c.end_offsets([TopicPartition(topic, p) for p in range(settings.partitions)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        c.close()


def _covered(settings: config.Settings) -> bool:
    """The store holds exactly the offsets the topic holds now: each once, nothing beyond (stale batches
    of lost records count against it, so this waits for the worker's re-check too)."""
    try:
        ends = _ends(settings)
    except Exception:  # broker restarting
        return False
    want = {(p, o) for p, end in ends.items() for o in range(end)}
    try:
        return sorted(stored_offsets(settings, "sensor")) == sorted(want)
    except (FileNotFoundError, StoreError):  # a batch was quarantined while we listed them
        return False


def _all_batches_match(settings: config.Settings) -> list[str]:
    """Ids of the batches whose fingerprint chain differs from the records the topic holds now."""
    topic = raw_topic(settings, "sensor")
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    bad = []
    try:
        for b in FeatureStore(settings.feature_store).batches("sensor"):
            r = b.manifest["ranges"][0]
            chain, _ = _read_chain(c, TopicPartition(topic, r["partition"]), r["first_offset"], r["last_offset"])
            if chain != b.manifest["fingerprints"]["chain"]:
                bad.append(b.batch_id)
    except (FileNotFoundError, StoreError):  # a batch was quarantined while we listed them
        return ["(store changing)"]
    finally:
        c.close()
    return bad


def _stored_count(settings: config.Settings) -> int:
    """Offsets the store covers (from the batch file names: cheap enough to poll)."""
    store, topic = FeatureStore(settings.feature_store), raw_topic(settings, "sensor")
    return sum(last - first + 1 for p in range(settings.partitions)
               for first, last in store.ranges("sensor", topic, p))


def _publish(settings: config.Settings, start: int, n: int) -> None:
    with Publisher(settings.with_(broker_loss_window_s=0.0)) as pub:  # no re-send: losses stay lost
        for i in range(start, start + n):
            pub.publish("sensor", {"sensor_id": f"s{i % 6}", "timestamp": 1_700_000_000_000 + i * 1000,
                                   "value": float(i % 97), "unit": "c"})


def test_broker_kill9_under_stream_worker_quarantines_and_featurizes_each_record_once(crash_broker) -> None:  # type: ignore[no-untyped-def]
    settings, kill9_restart = crash_broker
    settings = settings.with_(batch_max_records=20)
    proc = subprocess.Popen(streamlearn_cmd("stream", "sensor"), env=subprocess_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sent = 0
    out = ""
    try:
        for _ in range(MAX_KILLS):
            _publish(settings, sent, 300)
            sent += 300
            # kill as soon as the worker persisted the burst's full batches: the broker rewrites its state
            # file about once a second, so it has likely not persisted all of them yet
            on_topic = sum(_ends(settings).values())
            wait_until(lambda n=on_topic: _stored_count(settings) >= n - 60, 60, interval=0.01,
                       message="worker persisted the burst")
            kill9_restart()
            if quarantined(settings.feature_store):
                break
        wait_until(lambda: quarantined(settings.feature_store), 60, message="divergent batches quarantined")
        _publish(settings, sent, 300)  # new records after the restart take the re-used offsets
        sent += 300
        # equal offsets are not enough (a stale batch of lost records has the same offsets as the new ones):
        # wait until every batch also matches the topic's records
        wait_until(lambda: _covered(settings) and _all_batches_match(settings) == [], 90, interval=0.5,
                   message="worker caught up after the restarts")
    except AssertionError as exc:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        raise AssertionError(f"{exc}; worker output:\n{out[-4000:]}") from exc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]

    # every record on the topic now: featurized exactly once ...
    ends = _ends(settings)
    got = stored_offsets(settings, "sensor")
    want = sorted((p, o) for p, end in ends.items() for o in range(end))
    assert sorted(got) == want, f"offsets stored != topic; worker output:\n{out[-5000:]}"
    # ... from the record that sits at that offset now (every batch's fingerprint chain matches the topic)
    assert _all_batches_match(settings) == [], f"batches differ from the topic; worker output:\n{out[-5000:]}"
    # the divergent batches were moved aside, named in a WARNING and in `streamlearn status`
    notes = quarantined(settings.feature_store)
    assert notes and all(Path(n["path"], f"{n['batch_id']}.avro").exists() for n in notes)
    # repeated warnings are de-duplicated by the log ("N more like this"), so not every batch is named in it
    assert "diverged from the topic" in out and any(n["batch_id"] in out for n in notes), out[-3000:]
    status = subprocess.run(streamlearn_cmd("status"), env=subprocess_env(settings), capture_output=True,
                            text=True, timeout=60)
    assert "quarantined feature batches" in status.stdout and notes[0]["batch_id"] in status.stdout


def _dl_end(settings: config.Settings) -> int:
    from streaming.topics import dead_letter_topic

    c = KafkaConsumer(bootstrap_servers=settings.bootstrap, request_timeout_ms=10_000)
    try:
        topic = dead_letter_topic(settings, "sensor")
        return sum(c.end_offsets([TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]).values())
    finally:
        c.close()


def test_worker_and_broker_killed_together_lose_no_dead_letter(crash_broker) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of `streamlearn stream sensor` while it dead-letters, and at once of the broker. The broker
    loses the dead letters of its last seconds; their records are in stored batches, so the restarted worker
    resumes after them and would never write them again. The worker's journal (streaming/ackjournal.py)
    keeps them: the same command sends the missing ones again before it resumes."""
    from streaming.deadletters import source_key
    from streaming.topics import dead_letter_topic
    from tests.helpers import read_topic

    settings, kill9_restart = crash_broker
    topic, n = raw_topic(settings, "sensor"), 10_000
    with Publisher(settings) as pub:
        for i in range(n):
            pub.send_bytes(topic, b"not an avro record %d" % i, key=f"s{i % 7}")
        assert pub.settle(timeout=120)  # the bad records themselves are kept by the broker
    cmd, env = streamlearn_cmd("stream", "sensor"), subprocess_env(settings)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _dl_end(settings) >= 2_500, 120, interval=0.05, message="2,500 dead letters")
        proc.kill()
        kill9_restart()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert _dl_end(settings) < n, "the worker had dead-lettered everything before the kill; use more records"

    def covered() -> set[int]:
        letters = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, timeout=60)
        return {k[2] + 1_000_000 * k[1] for k in (source_key(r.headers) for r in letters) if k is not None}

    ends = _ends(settings)
    want = {o + 1_000_000 * p for p, end in ends.items() for o in range(end)}
    again = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        poll_until(lambda: covered() >= want or again.poll() is not None, 180, interval_s=1.0)
    finally:
        again.send_signal(signal.SIGTERM)
        out, _ = again.communicate(timeout=120)
    missing = want - covered()
    assert not missing, f"{len(missing)} of {n} bad records have no dead letter, e.g. {sorted(missing)[:5]}; " \
                        f"worker: {out[-3000:]}"
    assert "dead letters of the last run were lost by the broker" in out, out[-3000:]
