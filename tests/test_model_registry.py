"""The model registry's on-disk contract: atomic versions, integrity checks, promotion, retention.

These tests need no TensorFlow: a "SavedModel" here is the file layout serving checks for
(saved_model.pb + variables/), filled with random bytes. The TF round trip is covered by the
trainer tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from streaming.exceptions import StreamingError
from streaming.model_registry import (
    ModelIntegrityError,
    ModelNotFoundError,
    ModelRegistry,
    ModelRegistryError,
)
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]


def fake_export(reg: ModelRegistry, name: str, payload: bytes = b"weights", n_shards: int = 1) -> Path:
    staging = reg.staging(name)
    (staging / "saved_model.pb").write_bytes(b"pb:" + payload)
    (staging / "variables").mkdir()
    (staging / "variables" / "variables.index").write_bytes(b"index:" + payload)
    for i in range(n_shards):
        (staging / "variables" / f"variables.data-{i:05d}-of-{n_shards:05d}").write_bytes(payload * 10)
    (staging / "assets").mkdir()
    return staging


def test_publish_creates_numbered_versions_with_manifest(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    v1 = reg.publish("m", fake_export(reg, "m", b"a"), {"task": "classification"})
    v2 = reg.publish("m", fake_export(reg, "m", b"b"), {"task": "classification"})
    assert (v1, v2) == (1, 2)
    assert reg.versions("m") == [1, 2]
    meta = reg.verify("m", 2)
    assert meta["version"] == 2 and meta["name"] == "m" and meta["task"] == "classification"
    assert set(meta["manifest"]) == {
        "saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001"
    }
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".tmp-")]
    assert [e["action"] for e in reg.history("m")] == ["CREATED", "CREATED"]
    assert reg.promoted("m") is None


def test_publish_copies_a_staging_dir_from_elsewhere(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    outside = tmp_path / "export"
    (outside / "variables").mkdir(parents=True)
    (outside / "saved_model.pb").write_bytes(b"pb")
    (outside / "variables" / "variables.index").write_bytes(b"ix")
    assert reg.publish("m", outside, {}) == 1
    reg.verify("m", 1)


def test_publish_refuses_an_incomplete_export(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    staging = reg.staging("m")
    (staging / "saved_model.pb").write_bytes(b"pb")
    with pytest.raises(ModelIntegrityError, match="variables"):
        reg.publish("m", staging, {})
    assert reg.versions("m") == []


@pytest.mark.parametrize("damage", ["tamper", "missing_pb", "missing_variables", "extra_file", "bad_json"])
def test_verify_detects_damage(tmp_path: Path, damage: str) -> None:
    reg = ModelRegistry(tmp_path)
    v = reg.publish("m", fake_export(reg, "m"), {})
    vdir = reg.version_dir("m", v)
    if damage == "tamper":
        (vdir / "variables" / "variables.data-00000-of-00001").write_bytes(b"evil")
        expected = "sha256 mismatch"
    elif damage == "missing_pb":
        (vdir / "saved_model.pb").unlink()
        expected = "saved_model.pb is missing"
    elif damage == "missing_variables":
        import shutil

        shutil.rmtree(vdir / "variables")
        expected = "variables/ is missing"
    elif damage == "extra_file":
        (vdir / "variables" / "sneaky").write_bytes(b"x")
        expected = "not in the manifest"
    else:
        (vdir / "metadata.json").write_text("{not json")
        expected = "not valid JSON"
    with pytest.raises(ModelIntegrityError, match=expected) as info:
        reg.verify("m", v)
    assert isinstance(info.value, StreamingError)
    with pytest.raises(ModelIntegrityError):
        reg.set_promoted("m", v, "should refuse a damaged version")
    assert reg.promoted("m") is None


def test_unknown_version_and_bad_names(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no version 3"):
        reg.version_dir("m", 3)
    with pytest.raises(ModelRegistryError, match="not a valid model name"):
        reg.versions("../escape")
    assert reg.versions("never") == [] and reg.promoted("never") is None and reg.names() == []


def test_promote_rollback_walks_back_through_promotions(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    for i in range(4):
        reg.publish("m", fake_export(reg, "m", bytes([i])), {})
    assert reg.set_promoted("m", 1, "first") is None
    assert reg.set_promoted("m", 2, "better") == 1
    assert reg.set_promoted("m", 4, "better again") == 2
    reg.record("m", 3, "REJECTED", "worse", candidate_score=0.5, current_score=0.7)
    assert reg.rollback("m") == 2
    assert reg.promoted("m") == 2
    assert reg.rollback("m") == 1
    with pytest.raises(ModelRegistryError, match="no earlier promoted version"):
        reg.rollback("m")
    actions = [(e["action"], e["version"]) for e in reg.history("m")]
    assert actions[4:] == [("PROMOTED", 1), ("PROMOTED", 2), ("PROMOTED", 4), ("REJECTED", 3),
                           ("ROLLED_BACK", 2), ("ROLLED_BACK", 1)]
    rejected = reg.history("m")[7]
    assert rejected["candidate_score"] == 0.5 and rejected["current_score"] == 0.7
    state = json.loads((tmp_path / "m" / "state.json").read_text())
    assert state["promoted"] == 1


def test_rollback_skips_a_damaged_earlier_version(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    for i in range(3):
        reg.publish("m", fake_export(reg, "m", bytes([i])), {})
        reg.set_promoted("m", i + 1, "ok")
    (reg.version_dir("m", 2) / "saved_model.pb").write_bytes(b"corrupt")
    assert reg.rollback("m") == 1


def test_rollback_of_a_misspelt_model_names_the_models_and_creates_nothing(tmp_path: Path) -> None:
    """The writer lock's mkdir used to run first, so `models rollback typo` left a phantom model
    `typo` that `models list` showed from then on."""
    reg = ModelRegistry(tmp_path)
    reg.publish("m", fake_export(reg, "m", b"x"), {})
    with pytest.raises(ModelRegistryError, match=r"there is no model 'mm' .*\(models: m\)"):
        reg.rollback("mm")
    assert reg.names() == ["m"]


def test_retention_keeps_last_k_the_promoted_one_and_its_rollback_targets(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    for i in range(8):
        reg.publish("m", fake_export(reg, "m", bytes([i])), {})
    reg.set_promoted("m", 1, "ok")
    reg.set_promoted("m", 2, "ok")
    reg.set_promoted("m", 5, "ok")
    reg.rollback("m")  # promoted is 2 again; 5 was rolled back from: nothing rolls back to it
    deleted = reg.apply_retention("m", keep_last=2)
    assert deleted == [3, 4, 5, 6]
    assert reg.versions("m") == [1, 2, 7, 8]  # 1: the rollback target of 2
    assert reg.rollback("m") == 1
    for v in reg.versions("m"):
        reg.verify("m", v)
    # numbers are never reused, even when the newest versions were deleted
    assert reg.publish("m", fake_export(reg, "m"), {}) == 9
    with pytest.raises(ModelRegistryError, match="keep_last"):
        reg.apply_retention("m", 0)


def test_clean_staging_removes_only_dead_writers_exports(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    mine = reg.staging("m")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(proc.stdout)
    dead = tmp_path / "m" / f".tmp-{dead_pid}-abc"
    dead.mkdir()
    removed = reg.clean_staging("m")
    assert removed == [dead]
    assert mine.is_dir()


def test_concurrent_reader_never_sees_partial_versions(tmp_path: Path) -> None:
    """A serving-like reader polls while a writer publishes and promotes; every listed version verifies."""
    reg = ModelRegistry(tmp_path)
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        reader_reg = ModelRegistry(tmp_path)
        while not done.is_set():
            try:
                for v in reader_reg.versions("m"):
                    try:
                        reader_reg.verify("m", v)
                    except (FileNotFoundError, ModelRegistryError):
                        if v in reader_reg.versions("m"):  # still listed: it was partial, not deleted
                            raise
                p = reader_reg.promoted("m")
                if p is not None:
                    reader_reg.verify("m", p)
            except BaseException as exc:  # collected, asserted below
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            v = reg.publish("m", fake_export(reg, "m", bytes([i]) * 1000, n_shards=3), {})
            reg.set_promoted("m", v, "test")
            reg.apply_retention("m", keep_last=3)
    finally:
        done.set()
        thread.join(timeout=30)
    assert not errors, errors[0]


WRITER = r"""
import sys, os
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from streaming.model_registry import ModelRegistry
reg = ModelRegistry(Path(sys.argv[1]))
i = 0
print("ready", flush=True)
while True:
    st = reg.staging("m")
    (st / "saved_model.pb").write_bytes(os.urandom(20000))
    (st / "variables").mkdir()
    (st / "variables" / "variables.index").write_bytes(os.urandom(1000))
    for s in range(4):
        (st / "variables" / f"variables.data-{s:05d}-of-00004").write_bytes(os.urandom(50000))
    v = reg.publish("m", st, {"i": i})
    i += 1
"""


@pytest.mark.parametrize("publishes_before_kill", [2, 5])
def test_kill_9_during_export_leaves_registry_consistent(tmp_path: Path, publishes_before_kill: int) -> None:
    reg = ModelRegistry(tmp_path)
    v = reg.publish("m", fake_export(reg, "m"), {})
    reg.set_promoted("m", v, "baseline")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_until(lambda: len(reg.versions("m")) >= 1 + publishes_before_kill, timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for version in reg.versions("m"):
        reg.verify("m", version)  # every listed version is complete
    assert reg.promoted("m") == v
    reg.clean_staging("m")
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    before = reg.versions("m")
    assert reg.publish("m", fake_export(reg, "m"), {}) == before[-1] + 1


@pytest.mark.parametrize("text", ['{"promoted": 1, "history": [', "", "[]", '{"promoted": "abc"}',
                                  '{"history": 5}'])
def test_a_damaged_state_file_is_an_error_that_says_how_to_recover(tmp_path: Path, text: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated or hand-edited state.json gave JSONDecodeError/AttributeError/ValueError tracebacks from
    `models list|show|promote`, `tf-serving-config` and `train`; `models list` failed for every model."""
    from streamlearn.cli import main

    reg = ModelRegistry(tmp_path / "models")
    reg.publish("good", fake_export(reg, "good"), {"task": "classification"})
    reg.set_promoted("good", 1, "test")
    reg.publish("bad", fake_export(reg, "bad"), {"task": "classification"})
    (tmp_path / "models" / "bad" / "state.json").write_text(text)
    with pytest.raises(ModelRegistryError, match=r"is damaged .*versions beside it are intact.*move it aside"):
        reg.promoted("bad")
    assert reg.versions("bad") == [1]
    assert main(["--home", str(tmp_path), "models", "list"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "state.json of model 'bad' is damaged" in err
    assert any(line.startswith("good ") and " 1 " in line for line in out.splitlines()), out  # the others listed
    (tmp_path / "models" / "bad" / "state.json").rename(tmp_path / "state.json.aside")
    assert reg.promoted("bad") is None and reg.publish("bad", fake_export(reg, "bad"), {}) == 2  # no reuse


def test_metadata_that_is_json_but_not_an_object_is_a_damaged_version(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`[]` in metadata.json was a TypeError traceback from `models show` (AttributeError from promote)."""
    from streamlearn.cli import main

    reg = ModelRegistry(tmp_path / "models")
    reg.publish("m", fake_export(reg, "m"), {"task": "classification"})
    (tmp_path / "models" / "m" / "1" / "metadata.json").write_text("[]")
    with pytest.raises(ModelIntegrityError, match="is a JSON list, not an object"):
        reg.metadata("m", 1)
    assert main(["--home", str(tmp_path), "models", "show", "m/1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not an object" in err


def test_a_model_promoted_again_and_again_keeps_a_bounded_registry(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every version ever promoted was kept and the stack and history only grew: in a 25-minute soak
    199 versions left 29 on disk, and `store gc` could free no batch (all were some kept lineage)."""
    from streaming import model_registry

    monkeypatch.setattr(model_registry, "HISTORY_KEEP", 40)
    reg = ModelRegistry(tmp_path)
    for _ in range(60):
        v = reg.publish("m", fake_export(reg, "m"), {})
        reg.set_promoted("m", v, "better")
        reg.apply_retention("m", keep_last=3)
    state = reg.state("m")
    assert reg.versions("m") == [57, 58, 59, 60] and state["promoted_stack"] == [57, 58, 59, 60]
    assert len(state["history"]) <= 40 + 3 * len(reg.versions("m"))
    assert {e["version"] for e in state["history"][-40:]} <= set(range(40, 61))  # the newest entries stay
    assert [reg.rollback("m") for _ in range(3)] == [59, 58, 57]


def test_version_directories_are_ascii_numbers_without_a_leading_zero(tmp_path: Path) -> None:
    """A hand copy "01" of version 1 listed it twice; "²" is str.isdigit() and int("²") raised."""
    reg = ModelRegistry(tmp_path)
    reg.publish("m", fake_export(reg, "m"), {})
    for odd in ("01", "²", "١"):
        (tmp_path / "m" / odd).mkdir()
    assert reg.versions("m") == [1]
