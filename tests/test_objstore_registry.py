"""The model registry on object storage (issue 16, step 6): versions published atomically
(metadata.json last), verified by sha256 after download, promoted through a compare-and-swap
state.json under a writer lease; against moto's S3 server (tests/s3_helpers.py). No TensorFlow:
the registry checks files and hashes, not graphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from streaming import registry_remote
from streaming.exceptions import ModelIntegrityError, ModelNotFoundError, ModelRegistryError
from streaming.model_registry import ModelRegistry
from streaming.registry_remote import RemoteModelRegistry
from tests.s3_helpers import S3Server


def _export(reg: ModelRegistry, name: str, tag: bytes) -> Path:
    staging = reg.staging(name)
    (staging / "saved_model.pb").write_bytes(b"graph-" + tag)
    (staging / "variables").mkdir()
    (staging / "variables" / "variables.index").write_bytes(b"index-" + tag)
    (staging / "variables" / "variables.data-00000-of-00001").write_bytes(b"weights-" + tag * 100)
    return staging


def _registry(server: S3Server, url: str, cache: Path) -> RemoteModelRegistry:
    reg = ModelRegistry(url, storage_options=server.options(), cache_dir=cache)
    assert isinstance(reg, RemoteModelRegistry)
    return reg


@pytest.fixture()
def remote(s3_server: S3Server, tmp_path: Path) -> tuple[str, S3Server, Path]:
    return f"s3://{s3_server.new_bucket()}/models", s3_server, tmp_path


def test_publish_load_promote_and_lineage_across_hosts(remote: tuple[str, S3Server, Path]) -> None:
    url, server, tmp = remote
    trainer = _registry(server, url, tmp / "trainer-host")
    lineage = {"batches": [{"batch_id": "t.sensor.raw-p0-00000000000000000000-00000000000000000004",
                            "role": "train", "file": "live/sensor/t.sensor.raw-p0-00000000000000000000-"
                                                     "00000000000000000004.avro", "sha256": "ab" * 32}]}
    v1 = trainer.publish("m", _export(trainer, "m", b"1"), {"lineage": lineage, "reason": "first"})
    v2 = trainer.publish("m", _export(trainer, "m", b"2"), {"lineage": lineage})
    assert (v1, v2) == (1, 2)
    trainer.set_promoted("m", v1, "gate passed")

    server_host = _registry(server, url, tmp / "serving-host")  # another machine: empty cache
    assert server_host.names() == ["m"] and server_host.versions("m") == [1, 2]
    assert server_host.promoted("m") == 1 and server_host.latest("m") == 2
    meta = server_host.verify("m", 1)
    assert meta["lineage"] == lineage and meta["version"] == 1
    assert not any(str(tmp) in json.dumps(v) for v in meta["lineage"]["batches"])  # no host paths
    vdir = server_host.version_dir("m", 1)
    assert vdir.is_relative_to(tmp / "serving-host") and (vdir / "saved_model.pb").read_bytes() == b"graph-1"
    assert (vdir / "variables" / "variables.index").is_file()
    server_host.set_promoted("m", 2, "manual")
    assert trainer.rollback("m", "bad canary") == 1
    assert [h["action"] for h in server_host.history("m")] == ["CREATED", "CREATED", "PROMOTED", "PROMOTED",
                                                                 "ROLLED_BACK"]
    with pytest.raises(ModelNotFoundError):
        server_host.version_dir("m", 7)


def test_crash_before_metadata_leaves_no_version(remote: tuple[str, S3Server, Path]) -> None:
    url, server, tmp = remote
    reg = _registry(server, url, tmp / "cache")
    original = reg.objects.create

    def killed_at_metadata(key: str, data: bytes) -> bool:
        if key.endswith("/metadata.json"):
            raise KeyboardInterrupt("trainer killed before metadata.json")
        return original(key, data)

    reg.objects.create = killed_at_metadata  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        reg.publish("m", _export(reg, "m", b"1"), {})
    reg.objects.create = original  # type: ignore[method-assign]
    assert reg.objects.exists("m/1/saved_model.pb")  # the upload happened ...
    reader = _registry(server, url, tmp / "reader")
    assert reader.versions("m") == [] and reader.latest("m") is None  # ... but no version is visible
    assert reader.state("m")["history"] == []
    # no lease is held during an upload, so nothing blocks the restarted writer; it publishes the
    # next number (1 stays claimed by the crash; clean_staging collects its objects, not the number)
    v = reg.publish("m", _export(reg, "m", b"2"), {})
    assert v == 2 and reader.versions("m") == [2]
    reader.verify("m", 2)
    assert reader.clean_staging("m") == []  # within the grace period: maybe a publish in progress
    registry_remote.CLAIM_GRACE_S, grace = 0.0, registry_remote.CLAIM_GRACE_S
    try:
        assert Path("m/1") in reader.clean_staging("m")
    finally:
        registry_remote.CLAIM_GRACE_S = grace
    assert reader.objects.list_keys("m/1") == ["m/1/.claim"]  # the number stays used: never reused


def test_torn_or_tampered_version_fails_sha256(remote: tuple[str, S3Server, Path]) -> None:
    url, server, tmp = remote
    reg = _registry(server, url, tmp / "cache")
    v = reg.publish("m", _export(reg, "m", b"1"), {})
    reg.verify("m", v)
    key = f"m/{v}/variables/variables.data-00000-of-00001"
    data = reg.objects.get(key)
    reg.objects.put(key, data[:10])  # torn upload / tampered shard
    other = _registry(server, url, tmp / "other")
    with pytest.raises(ModelIntegrityError, match="variables.data-00000-of-00001 sha256 mismatch"):
        other.verify("m", v)
    with pytest.raises(ModelIntegrityError):
        other.set_promoted("m", v, "never a damaged version")
    meta: dict[str, Any] = json.loads(reg.objects.get(f"m/{v}/metadata.json"))
    reg.objects.put(key, data)
    meta["lineage"] = {"batches": [{"file": "forged.avro"}]}
    reg.objects.put(f"m/{v}/metadata.json", json.dumps(meta).encode())
    with pytest.raises(ModelIntegrityError, match="metadata.json sha256 mismatch"):
        other.verify("m", v)


def test_writer_lease_excludes_and_expires(remote: tuple[str, S3Server, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers (two hosts) never both hold the lease; a dead holder's lease expires."""
    url, server, tmp = remote
    a = _registry(server, url, tmp / "a")
    b = _registry(server, url, tmp / "b")
    monkeypatch.setattr(registry_remote, "LOCK_WAIT_S", 0.3)
    with a._locked("m"):
        with pytest.raises(ModelRegistryError, match="another writer holds the lease"):
            with b._locked("m"):
                pass
    with b._locked("m"):  # released: b takes it at once
        pass
    dead = json.dumps({"owner": "host-x:1:dead", "expires_at_ms": 1}).encode()  # a holder that died
    a.objects.put("m/.lock", dead)
    with b._locked("m"):
        assert json.loads(b.objects.get("m/.lock"))["owner"] == b._owner


def test_state_compare_and_swap_refuses_a_lost_update(remote: tuple[str, S3Server, Path]) -> None:
    url, server, tmp = remote
    a = _registry(server, url, tmp / "a")
    b = _registry(server, url, tmp / "b")
    a.publish("m", _export(a, "m", b"1"), {})
    state_a = a.state("m")
    b.record("m", 1, "REJECTED", "b wrote in between")
    state_a["promoted"] = 1
    with pytest.raises(ModelRegistryError, match="changed"):
        a._write_state("m", state_a)
    assert [h["action"] for h in b.history("m")] == ["CREATED", "REJECTED"]


@pytest.mark.parametrize("text", [b'{"promoted": 3, "hist', b"[]", b'{"history": 5}'], ids=["cut", "list", "history"])
def test_a_damaged_remote_state_or_metadata_says_how_to_recover(remote: tuple[str, S3Server, Path],
                                                                text: bytes) -> None:
    """The object-storage registry read state.json with a bare json.loads (a JSONDecodeError traceback from
    `models list`) and took any JSON as metadata; it now applies the local registry's checks."""
    url, server, tmp = remote
    reg = _registry(server, url, tmp / "host")
    reg.publish("m", _export(reg, "m", b"1"), {})
    reg.objects.put("m/state.json", text)
    with pytest.raises(ModelRegistryError, match=r"state.json of model 'm' is damaged .*move it aside"):
        reg.promoted("m")
    reg.objects.put("m/1/metadata.json", b"[]")
    with pytest.raises(ModelIntegrityError, match="is a JSON list, not an object"):
        _registry(server, url, tmp / "other-host").metadata("m", 1)


def test_a_registry_in_a_missing_bucket_says_so(s3_server: S3Server, tmp_path: Path) -> None:
    """A typo'd bucket listed as an empty registry (`models list` printed nothing, exit 0)."""
    with pytest.raises(ModelRegistryError, match="bucket does not exist.*STREAMLEARN_MODEL_DIR"):
        _registry(s3_server, "s3://no-such-bucket-here/models", tmp_path / "c").names()
    assert _registry(s3_server, f"s3://{s3_server.new_bucket()}/models", tmp_path / "d").names() == []
