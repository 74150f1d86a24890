"""The stream worker writing its feature store to ``s3://`` (moto's server) on the real embedded
broker: every offset lands in exactly one published batch, and a restarted worker resumes from
the store on object storage (its newest manifest and state object), not from a local directory.

One test on purpose (two worker runs with a group join each, every batch four S3 requests): 9 to
31 s on the shared 2-core box (load average 19-40); the unit-level guarantees are in test_objstore*.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from streaming.config import Settings
from streaming.producer import Publisher
from streaming.store import FeatureStore, read_batch
from streaming.topics import raw_topic
from streaming.worker import StreamWorker
from tests.helpers import read_topic, wait_until
from tests.s3_helpers import S3Server

BASE_MS = 1_763_000_000_000


def _events(start: int, n: int) -> list[dict[str, Any]]:
    return [{"sensor_id": f"s{i % 5}", "timestamp": BASE_MS + i * 1000, "value": float((i * 37) % 101) / 7,
             "values": {}, "unit": "celsius", "label": None, "event_id": None} for i in range(start, start + n)]


def _stored(s: Settings) -> list[tuple[int, int]]:
    """(partition, offset) of every stored row, read from the batch objects (duplicates kept)."""
    out: list[tuple[int, int]] = []
    for b in FeatureStore(s.feature_store).batches("sensor"):
        arrays = read_batch(b.path)
        out += list(zip(arrays["partition"].tolist(), arrays["offset"].tolist(), strict=True))
    return out


def _covered(store: FeatureStore) -> set[tuple[int, int]]:
    """Offsets the published manifests cover (cheap to poll: manifests are parsed once per store)."""
    out: set[tuple[int, int]] = set()
    for b in store.batches("sensor"):
        r = b.manifest["ranges"][0]
        out |= {(int(r["partition"]), o) for o in range(int(r["first_offset"]), int(r["last_offset"]) + 1)}
    return out


def _run_until_stored(s: Settings, expected: set[tuple[int, int]]) -> None:
    worker = StreamWorker(s, "sensor")
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run(stop)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    store = FeatureStore(s.feature_store)
    try:
        wait_until(lambda: bool(errors) or _covered(store) >= expected, 60, message="offsets persisted to s3://")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "worker did not stop within 30 s"
    if errors:
        raise errors[0]


def test_stream_worker_persists_to_s3_and_resumes_from_it(settings: Settings, s3_server: S3Server,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.options())  # the endpoint, as a deployment sets it
    url = f"s3://{s3_server.new_bucket()}/features"
    s = settings.with_(feature_store=url, batch_max_records=25, batch_max_seconds=0.3)
    topic = raw_topic(s, "sensor")
    with Publisher(s) as pub:
        for r in _events(0, 50):
            pub.publish("sensor", r)
    _run_until_stored(s, {(it.partition, it.offset) for it in read_topic(s, topic, decode=False)})
    with Publisher(s) as pub:
        for r in _events(50, 25):
            pub.publish("sensor", r)
    _run_until_stored(s, {(it.partition, it.offset) for it in read_topic(s, topic, decode=False)})
    got = _stored(s)
    assert len(got) == len(set(got)) == 75  # every offset once, across the restart
    store = FeatureStore(url)
    for b in store.batches("sensor"):
        assert isinstance(b.path, str) and b.path.startswith(url + "/live/sensor/")
        store.verify(b)
        assert store.featurizer_state("sensor", b.manifest)
