"""Object storage (issue 16, step 6): the storage layer and the feature store over ``s3://`` (moto's
S3 server, tests/s3_helpers.py) and ``file://``, with the local guarantees: atomic publication
(manifest last / conditional puts), sha256 checks, store-relative keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streaming import config
from streaming.exceptions import ObjectNotFoundError, ObjectStoreError, StoreError
from streaming.objstore import FsspecObjectStore, LocalObjectStore, ObjectStore, open_store, relative_key
from streaming.store import BatchSpec, FeatureStore, StoredRow, read_batch
from tests.s3_helpers import S3Server


def _rows(first: int, n: int, partition: int = 0) -> list[StoredRow]:
    return [StoredRow(x=np.arange(3, dtype=np.float32) + i, labels={"y": float(i)}, event_time_ms=1_700_000_000_000 + i,
                      key=f"k{i}", topic="t.sensor.raw", partition=partition, offset=first + i) for i in range(n)]


def _spec(first: int, last: int, state: str = '{"w": 1}', partition: int = 0) -> BatchSpec:
    return BatchSpec(kind="sensor", topic="t.sensor.raw", partition=partition, first_offset=first, last_offset=last,
                     featurizer_version="1", n_features=3, label_names=["y"], schema_ids=[7], featurizer_state=state)


@pytest.fixture(params=["s3", "file"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """The same tests over ``s3://`` (moto) and ``file://`` (the local backend)."""
    if request.param == "file":
        return f"file://{tmp_path / 'fs'}", {}
    server: S3Server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/features", server.options()


def _objects(url: str, options: dict[str, Any]) -> ObjectStore:
    return open_store(url, options)


# ---- the storage layer ---------------------------------------------------------------------------
def test_put_get_list_exists_delete(store_url: tuple[str, dict[str, Any]]) -> None:
    objects = _objects(*store_url)
    objects.put("a/b/one.bin", b"1")
    objects.put("a/two.bin", b"22")
    assert objects.get("a/b/one.bin") == b"1" and objects.size("a/two.bin") == 2
    assert objects.list_keys("a") == ["a/b/one.bin", "a/two.bin"]
    assert objects.names("a") == ["b", "two.bin"]
    assert objects.exists("a/two.bin") and not objects.exists("a/three.bin")
    assert objects.delete("a/two.bin") and not objects.delete("a/two.bin")
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        objects.get("a/two.bin")
    with pytest.raises(ObjectStoreError, match="relative"):
        objects.put("../escape", b"x")


def test_create_if_absent_and_compare_and_swap(store_url: tuple[str, dict[str, Any]]) -> None:
    """The two verbs an atomic publication and a trainer lease need (conditional PUTs on S3)."""
    objects = _objects(*store_url)
    assert objects.create("lease", b"owner-a")
    assert not objects.create("lease", b"owner-b")  # taken: nothing written
    assert objects.get("lease") == b"owner-a"
    current = objects.get_versioned("lease")
    assert current is not None and current[0] == b"owner-a"
    assert objects.replace_if("lease", b"owner-b", current[1])
    assert not objects.replace_if("lease", b"owner-c", current[1])  # stale token: refused
    assert objects.get("lease") == b"owner-b"
    assert not objects.replace_if("lease", b"owner-d", None)  # None = only if absent
    assert objects.replace_if("fresh", b"x", None)
    assert objects.get_versioned("missing") is None


def test_registry_exposes_atomic_small_objects_for_a_lease(tmp_path: Path) -> None:
    """What a trainer lease needs from the (default, local) registry: create-if-absent and CAS."""
    from streaming.model_registry import ModelRegistry

    reg = ModelRegistry(tmp_path / "models")
    assert reg.objects.create("m/lease.json", b'{"owner": "a"}')
    assert not reg.objects.create("m/lease.json", b'{"owner": "b"}')
    current = reg.objects.get_versioned("m/lease.json")
    assert current is not None and reg.objects.replace_if("m/lease.json", b'{"owner": "b"}', current[1])
    assert reg.versions("m") == [] and reg.names() == ["m"]  # a lease is not a version


def test_backends_and_config_accept_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path), LocalObjectStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalObjectStore)
    s = config.load({"home": tmp_path, "feature_store": "s3://bucket/features/", "model_dir": f"file://{tmp_path}/m"})
    assert s.feature_store == "s3://bucket/features" and s.model_dir == tmp_path / "m"
    assert config.load({"home": tmp_path}).feature_store == tmp_path / "features"
    assert relative_key("s3://b/f/live/sensor/x.avro", "s3://b/f") == "live/sensor/x.avro"
    assert relative_key(tmp_path / "live" / "x.avro", tmp_path) == "live/x.avro"
    # a file:// URL is percent-decoded: Path.as_uri() of "a b" is ".../a%20b", the same directory
    spaced = tmp_path / "pct store"
    assert config.load({"home": tmp_path, "feature_store": spaced.as_uri()}).feature_store == spaced
    assert open_store(spaced.as_uri()).put("k", b"v") is None and (spaced / "k").read_bytes() == b"v"


# ---- the feature store -----------------------------------------------------------------------------
def test_store_round_trip(store_url: tuple[str, dict[str, Any]]) -> None:
    url, options = store_url
    store = FeatureStore(url, state_inline_max_bytes=16, storage_options=options)
    big_state = json.dumps({"window": list(range(50))})
    info, written = store.write_batch(_spec(0, 4, state=big_state), _rows(0, 5))
    assert written
    info2, _ = store.write_batch(_spec(5, 9), _rows(5, 5), created_at_ms=info.manifest["created_at_ms"] + 1)
    again, written_again = store.write_batch(_spec(0, 4, state=big_state), _rows(0, 5))
    assert not written_again and again.manifest["sha256"] == info.manifest["sha256"]
    assert [b.batch_id for b in store.batches("sensor")] == [info.batch_id, info2.batch_id]
    assert [b.batch_id for b in store.batches_after("sensor", info.batch_id)] == [info2.batch_id]
    assert store.ranges("sensor", "t.sensor.raw", 0) == [(0, 4), (5, 9)]
    last = store.last_batch("sensor", "t.sensor.raw", 0)
    assert last is not None and last.batch_id == info2.batch_id
    arrays = read_batch(info.path)
    assert arrays["offset"].tolist() == [0, 1, 2, 3, 4] and arrays["x"].shape == (5, 3)
    assert store.featurizer_state("sensor", info.manifest) == big_state  # from its own state object
    store.verify(info)
    with pytest.raises(StoreError, match="overlap"):
        store.write_batch(_spec(3, 7), _rows(3, 5))
    # a second process (another host) sees the same batches through the same URL
    other = FeatureStore(url, storage_options=options)
    assert [b.batch_id for b in other.batches("sensor")] == [info.batch_id, info2.batch_id]
    if url.startswith("s3://"):
        assert isinstance(info.path, str) and info.path.startswith(url + "/live/sensor/")
        assert store.remove_batch("sensor", info.batch_id) > 0
        assert [b.batch_id for b in other.batches("sensor")] == [info2.batch_id]


def test_crash_between_data_and_manifest_leaves_nothing_visible(s3_server: S3Server) -> None:
    url = f"s3://{s3_server.new_bucket()}/features"
    store = FeatureStore(url, state_inline_max_bytes=4, storage_options=s3_server.options())
    assert store.remote is not None
    objects = store.remote.objects

    def killed(key: str, data: bytes) -> bool:
        raise KeyboardInterrupt("writer killed before its manifest")  # what a kill -9 leaves: the data only

    original = objects.create
    objects.create = killed  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        store.write_batch(_spec(0, 4, state='{"long": "state"}'), _rows(0, 5))
    objects.create = original  # type: ignore[method-assign]
    names = objects.names("live/sensor")
    assert any(n.endswith(".avro") for n in names) and any(n.endswith(".state.json") for n in names)
    reader = FeatureStore(url, storage_options=s3_server.options())
    assert reader.batches("sensor") == [] and reader.batch_ids("sensor") == []
    assert reader.last_batch("sensor", "t.sensor.raw", 0) is None  # the worker resumes at offset 0
    assert reader.remove_stale_temp_files("sensor") == 0  # within the grace period: maybe a live writer
    assert store.remote.collect_orphans("sensor", "live", older_than_s=0) == 2
    assert objects.names("live/sensor") == []
    info, written = store.write_batch(_spec(0, 4), _rows(0, 5))  # the restarted writer publishes it
    assert written and [b.batch_id for b in reader.batches("sensor")] == [info.batch_id]


def test_torn_or_tampered_objects_fail_their_sha256(s3_server: S3Server) -> None:
    url = f"s3://{s3_server.new_bucket()}/features"
    store = FeatureStore(url, state_inline_max_bytes=4, storage_options=s3_server.options())
    info, _ = store.write_batch(_spec(0, 4, state='{"long": "state"}'), _rows(0, 5))
    assert store.remote is not None
    objects = store.remote.objects
    avro_key = f"live/sensor/{info.batch_id}.avro"
    data = objects.get(avro_key)
    objects.put(avro_key, data[: len(data) // 2])  # torn
    with pytest.raises(StoreError, match="sha256 .* does not match its manifest"):
        store.verify(info)
    from trainer.data import file_sha256

    assert file_sha256(info.path) == hashlib.sha256(data[: len(data) // 2]).hexdigest()  # reads the URL
    objects.put(f"live/sensor/{info.batch_id}.state.json", b'{"long": "forged"}')  # tampered
    with pytest.raises(StoreError, match="does not match the sha256"):
        store.featurizer_state("sensor", info.manifest)


def test_lineage_keys_resolve_on_another_host(s3_server: S3Server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A version's lineage names batches by store-relative key; a host with other local paths (and
    the store configured only by URL, endpoint from fsspec's config) finds the same bytes."""
    import fsspec

    from trainer.data import DataPlan, lineage
    from trainer.reproduce import _batch, lineage_path

    url = f"s3://{s3_server.new_bucket()}/features"
    store = FeatureStore(url, storage_options=s3_server.options())
    a, _ = store.write_batch(_spec(0, 4), _rows(0, 5))
    b, _ = store.write_batch(_spec(5, 9), _rows(5, 5))
    plan = DataPlan([a], [], [b], {})
    lin = lineage(plan, {a.batch_id: a.manifest["sha256"], b.batch_id: b.manifest["sha256"]}, url)
    files = [e["file"] for e in lin["batches"]]
    assert files == [f"live/sensor/{a.batch_id}.avro", f"live/sensor/{b.batch_id}.avro"]
    assert all("://" not in f and not f.startswith("/") for f in files)
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.options())  # the other host's fsspec config
    other = config.load({"home": tmp_path / "elsewhere", "feature_store": url})
    entry = lin["batches"][0]
    assert lineage_path(other, entry) == f"{url}/{entry['file']}"
    resolved = _batch(other, entry)
    assert resolved.manifest["sha256"] == a.manifest["sha256"]
    assert read_batch(resolved.path)["offset"].tolist() == [0, 1, 2, 3, 4]
    from trainer.exceptions import LineageError

    with pytest.raises(LineageError, match="relative"):
        lineage_path(other, {**entry, "file": "../other/x.avro"})


def test_store_gc_on_object_storage(s3_server: S3Server, tmp_path: Path) -> None:
    """Retention works on s3://: old batches go (manifest first), the newest of the partition stays."""
    from streaming.retention import collect

    url = f"s3://{s3_server.new_bucket()}/f"
    store = FeatureStore(url, storage_options=s3_server.options())
    for i in range(3):
        store.write_batch(_spec(i * 5, i * 5 + 4), _rows(i * 5, 5), created_at_ms=1_000 + i)
    s = config.load({"home": tmp_path, "feature_store": url})
    dry = collect(s, dry_run=True, kinds=["sensor"], retention_days=1, now_ms=10 * 86_400_000, store=store)
    assert len(dry.deleted) == 2 and all(d["bytes"] > 0 for d in dry.deleted) and len(store.batches("sensor")) == 3
    done = collect(s, dry_run=False, kinds=["sensor"], retention_days=1, now_ms=10 * 86_400_000, store=store)
    assert [d["bytes"] for d in done.deleted] == [d["bytes"] for d in dry.deleted]
    assert [b.manifest["ranges"][0]["first_offset"] for b in store.batches("sensor")] == [10]
    assert store.remote is not None and store.remote.objects.names("live/sensor") == sorted(
        f"{store.batches('sensor')[0].batch_id}{ext}" for ext in (".avro", ".json"))


def test_unreachable_object_store_is_backpressure(tmp_path: Path) -> None:
    """The stream worker pauses and retries on BackpressureError; an S3 outage must be one."""
    from streaming.broker import free_port
    from streaming.exceptions import BackpressureError

    dead = {"key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"}}
    store = FeatureStore("s3://nobucket/f", storage_options=dead)
    with pytest.raises(BackpressureError, match="pauses and retries"):
        store.write_batch(_spec(0, 4), _rows(0, 5))


def test_remote_store_refuses_directory_only_operations(s3_server: S3Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    from streaming.promote import hold_live
    from streamlearn.status import _last_batch_age

    url = f"s3://{s3_server.new_bucket()}/f"
    store = FeatureStore(url, storage_options=s3_server.options())
    with pytest.raises(StoreError, match="object storage"):
        store.directory("sensor")
    info, _ = store.write_batch(_spec(0, 4), _rows(0, 5), created_at_ms=1_000)
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.options())
    monkeypatch.chdir(tmp_path)
    s = config.load({"home": tmp_path / "home", "feature_store": url})
    assert _last_batch_age(s, "sensor", now=11.0) == 10.0  # status reads the manifest's time, no stat
    with hold_live(s, "sensor") as pending:  # the stream worker's promotion guard: nothing to hold
        assert pending is None
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # no URL made into a local dir


def test_unsupported_conditional_backend_says_so(tmp_path: Path) -> None:
    objects = FsspecObjectStore("memory://objstore-test/x")
    objects.put("k", b"v")
    assert objects.get("k") == b"v"
    with pytest.raises(ObjectStoreError, match="conditional writes"):
        objects.create("k2", b"v")


def _dead_endpoint() -> dict[str, Any]:
    from streaming.broker import free_port

    return {"key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"}}


def test_an_unreachable_endpoint_is_an_os_error_every_caller_handles(caplog: pytest.LogCaptureFixture) -> None:
    """botocore's EndpointConnectionError is no OSError: it escaped the lease keeper (its thread died, so
    the trainer could never lead again, then the trainer itself) and the stream worker's start-up cleanup."""
    from streaming.exceptions import ObjectStoreUnavailableError
    from streaming.lease import Lease, LeaseKeeper, ObjectLeaseStore

    objects = FsspecObjectStore("s3://nobucket/x", _dead_endpoint())
    for call in (lambda: objects.get("k"), lambda: objects.get_versioned("k"), lambda: objects.names("p"),
                 lambda: objects.exists("k"), lambda: objects.create("k", b"v")):
        with pytest.raises(ObjectStoreUnavailableError, match="nobucket") as info:
            call()
        assert isinstance(info.value, OSError)
    keeper = LeaseKeeper(Lease(ObjectLeaseStore(objects, "m/leader.json"), "m", ttl_s=30.0))
    assert keeper.step() is None  # an unreachable lease store: not held, and no exception
    store = FeatureStore("s3://nobucket/f", storage_options=_dead_endpoint())
    assert store.remove_stale_temp_files("sensor") == 0  # was a traceback before the worker's first poll
    assert any("left for later" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", [b"[]", b'{"batch_id": "x", "created_at_ms": 1, '], ids=["list", "truncated"])
def test_a_damaged_remote_manifest_is_named_not_skipped(s3_server: S3Server, damage: bytes) -> None:
    """A JSON list was an AttributeError in every listing; a truncated manifest made its batch vanish."""
    url = f"s3://{s3_server.new_bucket()}/features"
    store = FeatureStore(url, storage_options=s3_server.options())
    store.write_batch(_spec(0, 4), _rows(0, 5))
    info, _ = store.write_batch(_spec(5, 9), _rows(5, 5))
    assert store.remote is not None
    store.remote.objects.put(f"live/sensor/{info.batch_id}.json", damage)
    fresh = FeatureStore(url, storage_options=s3_server.options())
    with pytest.raises(StoreError, match=rf"manifest .*{info.batch_id}\.json is unreadable .*streamlearn replay"):
        fresh.batches("sensor")
