"""The machine-wide file registry: idempotent ids, versions, config, deletes, sharing between
processes, and survival of a writer that died mid-line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import catalog
from schemas.exceptions import (
    InvalidSchemaError,
    InvalidVersionError,
    RegistryStoreError,
    RegistryUnavailableError,
    SchemaNotFoundError,
    SubjectNotFoundError,
    VersionNotFoundError,
)
from schemas.http_client import HttpRegistryClient
from schemas.registry import LOG_NAME, FileRegistry, RegisteredSchema, open_registry

SENSOR = catalog.load_schema("SensorReading")
WEBLOG = catalog.load_schema("WebLogEvent")
ROOT = Path(__file__).resolve().parents[1]


def test_register_is_idempotent_and_ids_are_global(tmp_path: Path) -> None:
    reg = FileRegistry(tmp_path)
    assert reg.register("a-value", SENSOR) == 1
    assert reg.register("a-value", json.dumps(SENSOR, indent=2)) == 1  # same schema, other spelling
    assert reg.register("b-value", SENSOR) == 1  # same schema in another subject: same id
    assert reg.register("w-value", WEBLOG) == 2
    assert reg.versions("a-value") == [1]
    assert reg.subjects() == ["a-value", "b-value", "w-value"]
    assert json.loads(reg.get_schema(2)) == WEBLOG
    latest = reg.latest("a-value")
    assert latest == RegisteredSchema("a-value", 1, 1, reg.get_schema(1))
    assert reg.lookup("b-value", SENSOR).version == 1
    assert reg.get_parsed(1) is reg.get_parsed(1)


def test_versions_and_lookups(tmp_path: Path) -> None:
    reg = FileRegistry(tmp_path)
    v2 = json.loads(json.dumps(SENSOR))
    v2["fields"].append({"name": "site", "type": ["null", "string"], "default": None})
    reg.register("s", SENSOR)
    reg.register("s", v2)
    assert reg.versions("s") == [1, 2]
    assert reg.get_version("s", 1).id == 1
    assert reg.get_version("s", "latest").id == 2
    assert reg.get_version("s", -1).version == 2
    assert reg.get_version("s", "2").id == 2
    with pytest.raises(VersionNotFoundError, match="Version 7 not found for subject 's'"):
        reg.get_version("s", 7)
    with pytest.raises(InvalidVersionError, match="version: 'newest' is not a version; pass a positive integer"):
        reg.get_version("s", "newest")  # it said "0 is not a version"
    with pytest.raises(SubjectNotFoundError, match="Subject 'nope' not found."):
        reg.versions("nope")
    with pytest.raises(SchemaNotFoundError) as info:
        reg.lookup("s", WEBLOG)
    assert info.value.error_code == 40403
    with pytest.raises(SchemaNotFoundError, match="Schema 99 not found"):
        reg.get_schema(99)
    with pytest.raises(InvalidSchemaError):
        reg.register("s", {"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]})


def test_delete_subject_keeps_ids_resolvable(tmp_path: Path) -> None:
    reg = FileRegistry(tmp_path)
    reg.register("s", SENSOR)
    assert reg.delete_subject("s") == [1]
    assert reg.subjects() == []
    assert json.loads(reg.get_schema(1)) == SENSOR  # old data stays decodable
    with pytest.raises(SubjectNotFoundError):
        reg.latest("s")
    assert reg.register("s", SENSOR) == 1
    assert reg.versions("s") == [2]  # version numbers are not reused


def test_config_levels(tmp_path: Path) -> None:
    reg = FileRegistry(tmp_path)
    assert reg.get_config() == "BACKWARD"
    assert reg.set_config("full") == "FULL"
    assert reg.get_config("s") == "FULL"
    reg.set_config("NONE", "s")
    assert reg.get_config("s") == "NONE"
    assert reg.get_config("s", default_to_global=False) == "NONE"
    assert reg.delete_config("s") == "NONE"
    assert reg.get_config("s") == "FULL"
    with pytest.raises(SchemaNotFoundError) as info:
        reg.get_config("s", default_to_global=False)
    assert info.value.error_code == 40408


def test_two_instances_see_each_others_ids(tmp_path: Path) -> None:
    a, b = FileRegistry(tmp_path), FileRegistry(tmp_path)
    assert a.register("s", SENSOR) == 1
    assert json.loads(b.get_schema(1)) == SENSOR
    assert b.register("w", WEBLOG) == 2  # b caught up first: no id collision
    assert a.latest("w").id == 2
    b.set_config("NONE")
    assert a.get_config() == "NONE"


def test_another_process_sees_ids(tmp_path: Path) -> None:
    code = (
        "import sys; from schemas.registry import FileRegistry; from schemas import catalog;"
        "print(FileRegistry(sys.argv[1]).register('w', catalog.load_schema('WebLogEvent')))"
    )
    reg = FileRegistry(tmp_path)
    reg.register("s", SENSOR)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
    assert json.loads(reg.get_schema(2)) == WEBLOG


def test_torn_last_line_is_repaired(tmp_path: Path) -> None:
    FileRegistry(tmp_path).register("s", SENSOR)
    with open(tmp_path / LOG_NAME, "ab") as fh:
        fh.write(b'{"op":"schema","id":2,"sche')  # a writer killed mid-write
    reg = FileRegistry(tmp_path)
    assert reg.versions("s") == [1]
    assert reg.register("w", WEBLOG) == 2
    assert FileRegistry(tmp_path).latest("w").id == 2


def test_corrupt_log_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / LOG_NAME).write_text("not json\n")
    with pytest.raises(RegistryStoreError, match="corrupt entry"):
        FileRegistry(tmp_path).subjects()


def test_open_registry_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_registry(None, tmp_path), FileRegistry)
    assert isinstance(open_registry("http://127.0.0.1:9", tmp_path), HttpRegistryClient)


def test_unreachable_http_registry_is_retryable_error() -> None:
    client = HttpRegistryClient("http://127.0.0.1:9", timeout=2)  # discard port: refused
    with pytest.raises(RegistryUnavailableError, match="unreachable"):
        client.subjects()
    with pytest.raises(RegistryUnavailableError, match="not an http"):
        HttpRegistryClient("localhost:8081")


def test_concurrent_processes_never_share_an_id(tmp_path: Path) -> None:
    """Four processes register distinct schemas at once: the flock makes every id unique."""
    code = (
        "import sys; from schemas.registry import FileRegistry\n"
        "reg = FileRegistry(sys.argv[1])\n"
        "for i in range(5):\n"
        "    name = f'P{sys.argv[2]}_{i}'\n"
        "    s = {'type': 'record', 'name': name, 'fields': [{'name': 'a', 'type': 'int'}]}\n"
        "    print(name, reg.register(name, s))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(n)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    got: dict[str, int] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        got.update((name, int(i)) for name, i in (line.split() for line in out.splitlines()))
    assert sorted(got.values()) == list(range(1, 21))
    reg = FileRegistry(tmp_path)
    for name, schema_id in got.items():
        assert json.loads(reg.get_schema(schema_id))["name"] == name
        assert reg.latest(name).id == schema_id
