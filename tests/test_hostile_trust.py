"""Trust (issue 12, item 7, worker parts): metadata digests, lineage paths, plugin sources, bounded memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.checkpoint import HashJournal
from streaming import config
from streaming.exceptions import ModelIntegrityError
from streaming.model_registry import METADATA_FILE, ModelRegistry
from trainer.exceptions import LineageError
from trainer.reproduce import lineage_path


def _fake_version(registry: ModelRegistry, name: str) -> int:
    staging = registry.staging(name)
    (staging / "variables").mkdir()
    (staging / "saved_model.pb").write_bytes(b"pb")
    (staging / "variables" / "variables.index").write_bytes(b"index")
    lineage = {"batches": [{"batch_id": "b1", "role": "train", "file": "live/sensor/b1.avro", "sha256": "x"}]}
    return registry.publish(name, staging, {"lineage": lineage, "featurizer": None})


def test_metadata_json_is_covered_by_its_digest(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    v = _fake_version(registry, "m")
    meta = registry.verify("m", v)
    assert len(meta["metadata_sha256"]) == 64
    path = registry.version_dir("m", v) / METADATA_FILE
    edited = dict(meta, lineage={"batches": [{"batch_id": "b1", "role": "train", "file": "/etc/passwd"}]})
    path.write_text(json.dumps(edited))
    with pytest.raises(ModelIntegrityError, match="metadata.json sha256 mismatch"):
        registry.verify("m", v)
    # Recomputing the in-file digest is not enough: state.json recorded it at creation.
    from streaming.model_registry import metadata_digest

    path.write_text(json.dumps(dict(edited, metadata_sha256=metadata_digest(edited))))
    with pytest.raises(ModelIntegrityError, match="recorded in state.json"):
        registry.verify("m", v)


def test_lineage_paths_must_stay_under_the_feature_store(tmp_path: Path) -> None:
    settings = config.load({"home": tmp_path}, environ={})
    good = lineage_path(settings, {"batch_id": "b", "file": "live/sensor/b.avro"})
    assert good == (settings.feature_store / "live/sensor/b.avro").resolve()
    for bad in ("/etc/passwd.avro", "../../x.avro", "live/../../../x.avro", "", None, "live/a.json", "a\x00.avro"):
        with pytest.raises(LineageError):
            lineage_path(settings, {"batch_id": "b", "file": bad})
    settings.feature_store.mkdir(parents=True)
    (settings.feature_store / "escape").symlink_to(tmp_path.parent)
    with pytest.raises(LineageError, match="leaves the feature store"):
        lineage_path(settings, {"batch_id": "b", "file": "escape/x.avro"})


def test_model_plugins_never_load_from_a_streamlearn_toml_in_the_cwd(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "streamlearn.toml").write_text('partitions = 5\n[models]\nevil = "os:system"\n')
    settings = config.load({"home": tmp_path / "home"}, environ={})
    assert settings.partitions == 5 and settings.model_specs == {}  # settings yes, import targets no
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[models]\nmine = "tests.custom_spec_module:SPEC"\n')
    settings = config.load({"home": tmp_path / "home"}, environ={"STREAMLEARN_CONFIG": str(explicit)})
    assert settings.model_specs == {"mine": "tests.custom_spec_module:SPEC"}


def test_hash_journal_is_bounded_in_memory_and_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "images.journal"
    j = HashJournal(path, max_entries=100)
    for i in range(50):
        j.add_many([(f"T{i}", f"d{i}x{k}") for k in range(10)])
    assert len(j) == 100 and "d49x9" in j and "d0x0" not in j
    j.close()
    j2 = HashJournal(path, max_entries=100)  # 500 lines > 2 * 100: compacted on open
    assert len(j2) == 100 and "d49x9" in j2
    assert len(path.read_text().splitlines()) == 100
    j2.close()
