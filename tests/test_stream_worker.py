"""Stream worker on the real embedded broker: batches cover every offset once, window state
survives a restart, poison records are dead-lettered, a broken store pauses and resumes."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from schemas.serde import frame
from streaming.config import Settings
from streaming.features import get_featurizer
from streaming.producer import Publisher, header_dict
from streaming.store import FeatureStore, read_batch
from streaming.topics import dead_letter_topic, raw_topic
from streaming.worker import StreamWorker, default_group
from tests.helpers import read_topic, wait_until

BASE_MS = 1_763_000_000_000


def sensor_events(n: int, start: int = 0, sensors: int = 7) -> list[dict[str, Any]]:
    """Deterministic sensor readings: ``sensors`` sensors, one reading per second each."""
    return [{"sensor_id": f"s{i % sensors}", "timestamp": BASE_MS + i * 1000, "value": float((i * 37) % 101) / 7,
             "values": {}, "unit": "celsius", "label": (i % 11 == 0) if i % 3 else None, "event_id": None}
            for i in range(start, start + n)]


def publish(settings: Settings, kind: str, records: list[dict[str, Any]]) -> None:
    with Publisher(settings) as pub:
        for r in records:
            pub.publish(kind, r)


def topic_offsets(settings: Settings, topic: str) -> set[tuple[int, int]]:
    """Every (partition, offset) the topic holds, read with a plain consumer."""
    return {(it.partition, it.offset) for it in read_topic(settings, topic, decode=False)}


def stored_offsets(settings: Settings, kind: str, namespace: str = "live") -> list[tuple[int, int]]:
    """(partition, offset) of every row and dead letter in the store, duplicates kept."""
    out: list[tuple[int, int]] = []
    for b in FeatureStore(settings.feature_store).batches(kind, namespace):
        arrays = read_batch(b.path)
        out += list(zip(arrays["partition"].tolist(), arrays["offset"].tolist(), strict=True))
        rng = b.manifest["ranges"][0]
        out += [(rng["partition"], o) for o in rng["dead_letter_offsets"]]
    return out


def committed(settings: Settings, kind: str) -> dict[int, int | None]:
    topic = raw_topic(settings, kind)
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=default_group(settings, kind),
                      enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(settings.partitions)}
    finally:
        c.close()


def end_offsets(settings: Settings, kind: str) -> dict[int, int]:
    topic = raw_topic(settings, kind)
    c = KafkaConsumer(bootstrap_servers=settings.bootstrap)
    try:
        ends = c.end_offsets([TopicPartition(topic, p) for p in range(settings.partitions)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        c.close()


@contextmanager
def running_worker(settings: Settings, kind: str, **kwargs: Any) -> Iterator[StreamWorker]:
    worker = StreamWorker(settings, kind, **kwargs)
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "worker did not stop within 30 s"
        if errors:
            raise errors[0]


def all_stored(settings: Settings, kind: str, expected: set[tuple[int, int]]) -> bool:
    return set(stored_offsets(settings, kind)) >= expected


def test_worker_persists_every_offset_once_and_state_survives_restart(settings: Settings) -> None:
    s = settings.with_(batch_max_records=40, batch_max_seconds=0.3)
    first, second = sensor_events(150), sensor_events(150, start=150)
    publish(s, "sensor", first)
    topic = raw_topic(s, "sensor")
    with running_worker(s, "sensor"):
        expected = topic_offsets(s, topic)
        wait_until(lambda: all_stored(s, "sensor", expected), 40, message="first half persisted")
    assert committed(s, "sensor") == end_offsets(s, "sensor")
    publish(s, "sensor", second)
    with running_worker(s, "sensor"):  # a new process-equivalent: state only from the manifests
        expected = topic_offsets(s, topic)
        wait_until(lambda: all_stored(s, "sensor", expected), 40, message="second half persisted")
    got = stored_offsets(s, "sensor")
    assert len(got) == len(set(got)) == 300
    # Reference: featurize every partition's records in offset order with one uninterrupted state.
    fz = get_featurizer("sensor")
    states: dict[int, Any] = {}
    reference: dict[tuple[int, int], np.ndarray] = {}
    for item in sorted(read_topic(s, topic), key=lambda r: (r.partition, r.offset)):
        state = states.setdefault(item.partition, fz.new_state())
        reference[(item.partition, item.offset)] = fz.featurize(item.value, state).x
    store = FeatureStore(s.feature_store)
    for b in store.batches("sensor"):
        arrays = read_batch(b.path)
        for x, p, o in zip(arrays["x"], arrays["partition"], arrays["offset"], strict=True):
            np.testing.assert_array_equal(x, reference[(int(p), int(o))])
        assert store.featurizer_state("sensor", b.manifest)  # inline or in its state file (docs/STORE.md)


def test_store_ahead_of_commit_resumes_after_the_store(settings: Settings) -> None:
    """The state a crash between the batch rename and the offset commit leaves: batches on disk
    beyond the committed offsets (made here by rewinding the idle group's commits to 0). The
    restarted worker must resume after the store, never writing an overlapping batch."""
    from streaming.offsets import reset

    s = settings.with_(batch_max_records=25, batch_max_seconds=0.2)
    publish(s, "sensor", sensor_events(90))
    topic = raw_topic(s, "sensor")
    with running_worker(s, "sensor"):
        expected = topic_offsets(s, topic)
        wait_until(lambda: all_stored(s, "sensor", expected), 40, message="first run persisted")
    wait_until(lambda: reset(s, default_group(s, "sensor"), topic, to_earliest=True), 20,
               message="group empty for the reset")
    assert set(committed(s, "sensor").values()) == {0}
    publish(s, "sensor", sensor_events(30, start=90))
    with running_worker(s, "sensor") as worker:
        expected = topic_offsets(s, topic)
        wait_until(lambda: all_stored(s, "sensor", expected), 40, message="second run persisted")
    got = stored_offsets(s, "sensor")
    assert len(got) == len(set(got)) == 120
    assert worker.stats.rows == 30 and worker.stats.batches_skipped == 0
    assert committed(s, "sensor") == end_offsets(s, "sensor")


POISON = {
    "BadMagicByteError": b"\x07\x00\x00\x00\x01hello",
    "ShortPayloadError": b"\x00\x00",
    "UnknownSchemaIdError": frame(987654, b"\x02a"),
}


def test_poison_records_are_dead_lettered_and_the_worker_keeps_going(settings: Settings) -> None:
    s = settings.with_(batch_max_records=50, batch_max_seconds=0.3)
    topic = raw_topic(s, "sensor")
    good = sensor_events(30)
    with Publisher(s) as pub:
        valid = pub.encode(topic, "SensorReading", good[0])
        poison = dict(POISON)
        poison["TruncatedRecordError"] = valid[:-3]
        # a map block count that would allocate gigabytes: schema id of a real record, absurd count
        poison["huge_block"] = valid[:5] + b"\x04s1" + b"\x80\x80\x80\x80\x80\x80\x80\x80\x01"
        bad_nan = dict(good[1], value=float("nan"))
        bad_time = dict(good[2], timestamp=12)
        poison["FeatureValidationError_nan"] = pub.encode(topic, "SensorReading", bad_nan)
        poison["FeatureValidationError_time"] = pub.encode(topic, "SensorReading", bad_time)
        for i, r in enumerate(good):
            pub.publish("sensor", r)
            if i < len(poison):
                name = list(poison)[i]
                pub.send_bytes(topic, poison[name], key=r["sensor_id"], headers=[("case", name.encode())])
    expected = topic_offsets(s, topic)
    with running_worker(s, "sensor") as worker:
        wait_until(lambda: all_stored(s, "sensor", expected), 40, message="all offsets processed")
    assert worker.stats.dead_letters == len(poison) and worker.stats.rows == len(good)
    dls = read_topic(s, dead_letter_topic(s, "sensor"), decode=False, expect=len(poison))
    assert len(dls) == len(poison)
    originals = {bytes(v) for v in poison.values()}
    for d in dls:
        h = header_dict(d.headers)
        assert bytes(d.raw) in originals
        assert h["dl.source_topic"] == topic and h["dl.stage"] in ("decode", "featurize")
        assert int(h["dl.source_offset"]) >= 0 and h["dl.source_partition"].isdigit()
        assert h["dl.error_class"] and h["dl.message"]
    classes = {header_dict(d.headers)["dl.error_class"] for d in dls}
    assert {"BadMagicByteError", "ShortPayloadError", "UnknownSchemaIdError", "FeatureValidationError"} <= classes
    assert classes & {"TruncatedRecordError", "MalformedRecordError"}
    got = stored_offsets(s, "sensor")
    assert len(got) == len(set(got)) and set(got) == expected
    assert committed(s, "sensor") == end_offsets(s, "sensor")


def test_a_tombstone_on_a_raw_topic_is_dead_lettered_as_one(settings: Settings) -> None:
    """A null value (a producer "deleting" a key, or a compaction habit) is not an event: it is
    dead-lettered with a reason that names it a tombstone (it read "0 bytes is shorter than the 5-byte
    Confluent header", which sent people looking for a truncation), and the partition goes on."""
    from kafka import KafkaProducer

    s = settings.with_(batch_max_records=50, batch_max_seconds=0.3)
    topic = raw_topic(s, "sensor")
    raw = KafkaProducer(bootstrap_servers=s.bootstrap)
    try:
        raw.send(topic, value=None, key=b"s0", partition=0).get(timeout=30)
    finally:
        raw.close()
    with Publisher(s) as pub:
        for r in sensor_events(5):
            pub.publish("sensor", r)
    expected = topic_offsets(s, topic)
    with running_worker(s, "sensor") as worker:
        wait_until(lambda: all_stored(s, "sensor", expected), 40, message="all offsets processed")
    assert worker.stats.dead_letters == 1 and worker.stats.rows == 5
    (letter,) = read_topic(s, dead_letter_topic(s, "sensor"), decode=False, expect=1)
    h = header_dict(letter.headers)
    assert h["dl.error_class"] == "ShortPayloadError" and "a Kafka tombstone" in h["dl.message"], h
    assert h["dl.source_partition"] == "0"


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_bad_images_are_dead_lettered_with_metrics(settings: Settings) -> None:
    """Undecodable and decompression-bomb images: FeatureValidationError -> dead letter; the good
    image next to them is featurized; /metrics counts the reasons with a bounded label."""
    from prometheus_client import REGISTRY

    from streamlearn.commands.publish import generated

    s = settings.with_(batch_max_records=10, batch_max_seconds=0.2)
    topic = raw_topic(s, "image")
    good = next(iter(generated("image", 1, seed=3)))
    bomb = dict(good, image_id="bomb", data=_png_header(100_000, 100_000), width=100_000, height=100_000)
    garbage = dict(good, image_id="garbage", data=_png_header(28, 28) + b"not zlib data at all" * 3)
    reason = {"kind": "image", "reason": "FeatureValidationError"}
    before = REGISTRY.get_sample_value("streamlearn_stream_dead_letters_total", reason) or 0.0
    with Publisher(s) as pub:
        pub.publish("image", good)
        for bad in (bomb, garbage):
            pub.send_bytes(topic, pub.encode(topic, "ImageEvent", bad), key=bad["image_id"])
    expected = topic_offsets(s, topic)
    with running_worker(s, "image") as worker:
        wait_until(lambda: all_stored(s, "image", expected), 40, message="images processed")
    assert worker.stats.rows == 1 and worker.stats.dead_letters == 2
    dls = read_topic(s, dead_letter_topic(s, "image"), decode=False, expect=2)
    assert sorted(header_dict(d.headers)["dl.error_class"] for d in dls) == ["FeatureValidationError"] * 2
    assert {header_dict(d.headers)["dl.stage"] for d in dls} == {"featurize"}
    after = REGISTRY.get_sample_value("streamlearn_stream_dead_letters_total", reason) or 0.0
    assert after - before == 2
    lags = {smp.labels["partition"]: smp.value for m in REGISTRY.collect() if m.name == "streamlearn_stream_lag_records"
            for smp in m.samples if smp.labels.get("kind") == "image"}
    assert lags and set(lags) <= {str(p) for p in range(s.partitions)} and set(lags.values()) == {0.0}


def test_unwritable_store_pauses_then_resumes_without_loss(settings: Settings) -> None:
    """Root ignores chmod, so the store's kind directory is replaced by a regular file: every
    mkdir/open below it fails with EEXIST/ENOTDIR for root too. Removing the file = space is back."""
    s = settings.with_(batch_max_records=25, batch_max_seconds=0.2)
    kind_dir = FeatureStore(s.feature_store).directory("sensor")
    kind_dir.parent.mkdir(parents=True, exist_ok=True)
    kind_dir.write_text("in the way")
    publish(s, "sensor", sensor_events(300))
    expected = topic_offsets(s, raw_topic(s, "sensor"))
    with running_worker(s, "sensor") as worker:
        wait_until(lambda: worker.paused_for_backpressure and worker.held, 30, message="backpressure")
        assert committed(s, "sensor") == dict.fromkeys(range(s.partitions))  # nothing committed
        kind_dir.unlink()
        wait_until(lambda: all_stored(s, "sensor", expected), 40, message="resumed and persisted")
        wait_until(lambda: not worker.paused_for_backpressure, 10, message="partitions resumed")
    assert worker.stats.backpressure_events >= 1
    got = stored_offsets(s, "sensor")
    assert len(got) == len(set(got)) and set(got) == expected
    assert committed(s, "sensor") == end_offsets(s, "sensor")
    # the rest of the poll the refusal came in was fetched again, not taken into one batch of ~75
    sizes = [sum(r["last_offset"] - r["first_offset"] + 1 for r in b.manifest["ranges"])
             for b in FeatureStore(s.feature_store).batches("sensor")]
    assert max(sizes) <= 25, sizes
    shutil.rmtree(s.feature_store)


def _through_a_registry_outage(settings: Settings, events: list[dict[str, Any]], retries: int) -> None:
    """Run a worker against an HTTP registry whose port has no server yet (connection refused =
    RegistryUnavailableError) until it retried ``retries`` times; the server then comes up on that port,
    and every offset must be stored once, none dead-lettered."""
    from schemas.http_client import HttpRegistryClient
    from schemas.registry import open_registry
    from schemas.server import start_in_thread
    from streaming.broker import free_port

    s = settings.with_(batch_max_records=20, batch_max_seconds=0.2)
    publish(s, "sensor", events)
    expected = topic_offsets(s, raw_topic(s, "sensor"))
    port = free_port()
    http = HttpRegistryClient(f"http://127.0.0.1:{port}", timeout=2.0)
    server = None
    try:
        with running_worker(s, "sensor", registry=http) as worker:
            wait_until(lambda: worker.stats.registry_retries >= retries, 30, message=f"{retries} registry retries")
            assert stored_offsets(s, "sensor") == [] and worker.stats.dead_letters == 0
            server = start_in_thread(open_registry(None, s.registry_dir), port=port)
            wait_until(lambda: all_stored(s, "sensor", expected), 60, message="persisted after outage")
        assert worker.stats.dead_letters == 0
        got = stored_offsets(s, "sensor")
        assert len(got) == len(set(got)) and set(got) == expected
    finally:
        if server is not None:
            server.stop()


def test_registry_outage_is_retried_not_dead_lettered(settings: Settings) -> None:
    _through_a_registry_outage(settings, sensor_events(60), retries=2)


def test_a_registry_outage_on_the_one_busy_partition_does_not_wedge_it(settings: Settings) -> None:
    """Every record on one partition, the others idle: the outage pauses that partition with a fetch answer
    in hand, and kafka-python never fetched it again after the resume (streaming/kafka_compat.py, fix 3):
    the worker stalled for good after its first retry."""
    _through_a_registry_outage(settings, sensor_events(3000, sensors=1), retries=3)  # one key: one partition

if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
