"""The Confluent REST subset: every endpoint and error code through the ASGI app, then the HTTP
client against a real server thread, and two file registries on one directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from schemas import catalog
from schemas.exceptions import (
    IncompatibleSchemaError,
    InvalidCompatibilityLevelError,
    InvalidSchemaError,
    SchemaNotFoundError,
    SubjectNotFoundError,
    VersionNotFoundError,
)
from schemas.http_client import HttpRegistryClient
from schemas.registry import FileRegistry
from schemas.serde import AvroDeserializer, AvroSerializer
from schemas.server import CONTENT_TYPE, create_app, start_in_thread

SENSOR = catalog.load_schema("SensorReading")
WEBLOG = catalog.load_schema("WebLogEvent")
HEADERS = {"Content-Type": CONTENT_TYPE, "Accept": CONTENT_TYPE}


def _v2() -> dict[str, Any]:
    v2 = json.loads(json.dumps(SENSOR))
    v2["fields"].append({"name": "site", "type": ["null", "string"], "default": None})
    return v2


def _body(schema: dict[str, Any]) -> str:
    return json.dumps({"schema": json.dumps(schema)})


@pytest.fixture()
def client(tmp_path: Path) -> TestClient:
    return TestClient(create_app(FileRegistry(tmp_path)))


def _err(resp: Any, status: int, code: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(CONTENT_TYPE)
    assert resp.json()["error_code"] == code
    message: str = resp.json()["message"]
    return message


def test_register_get_lookup_and_list(client: TestClient) -> None:
    resp = client.post("/subjects/s-value/versions", content=_body(SENSOR), headers=HEADERS)
    assert resp.status_code == 200 and resp.json() == {"id": 1}
    assert resp.headers["content-type"].startswith(CONTENT_TYPE)
    # plain application/json works too, and registering again is idempotent
    assert client.post("/subjects/s-value/versions", json={"schema": json.dumps(SENSOR)}).json() == {"id": 1}
    resp = client.post("/subjects/s-value/versions", content=_body(_v2()), headers=HEADERS)
    assert resp.json() == {"id": 2}
    assert json.loads(client.get("/schemas/ids/1").json()["schema"]) == SENSOR
    assert client.get("/schemas/ids/2/versions").json() == [{"subject": "s-value", "version": 2}]
    assert client.get("/schemas/types").json() == ["AVRO"]
    assert client.get("/subjects").json() == ["s-value"]
    assert client.get("/subjects/s-value/versions").json() == [1, 2]
    latest = client.get("/subjects/s-value/versions/latest").json()
    assert (latest["subject"], latest["version"], latest["id"]) == ("s-value", 2, 2)
    assert client.get("/subjects/s-value/versions/1").json()["id"] == 1
    assert client.get("/subjects/s-value/versions/1/schema").json() == SENSOR
    found = client.post("/subjects/s-value", content=_body(SENSOR), headers=HEADERS).json()
    assert (found["subject"], found["id"], found["version"]) == ("s-value", 1, 1)
    assert json.loads(found["schema"]) == SENSOR
    assert client.delete("/subjects/s-value").json() == [1, 2]
    assert client.get("/subjects").json() == []
    assert client.get("/schemas/ids/1").status_code == 200  # ids outlive their subject


def test_error_codes(client: TestClient) -> None:
    client.post("/subjects/s/versions", content=_body(SENSOR), headers=HEADERS)
    assert _err(client.get("/subjects/nope/versions"), 404, 40401) == "Subject 'nope' not found."
    _err(client.get("/subjects/nope/versions/latest"), 404, 40401)
    assert "Version 9 not found" in _err(client.get("/subjects/s/versions/9"), 404, 40402)
    _err(client.get("/schemas/ids/77"), 404, 40403)
    _err(client.post("/subjects/s", content=_body(WEBLOG), headers=HEADERS), 404, 40403)
    _err(client.post("/subjects/nope", content=_body(WEBLOG), headers=HEADERS), 404, 40401)
    _err(client.get("/subjects/s/versions/zero"), 422, 42202)
    _err(client.get("/subjects/s/versions/0"), 422, 42202)
    _err(client.post("/subjects/s/versions", json={"schema": "{not json"}), 422, 42201)
    _err(client.post("/subjects/s/versions", json={"schema": '{"type": "nope"}'}), 422, 42201)
    _err(client.post("/subjects/s/versions", json={"nothing": 1}), 422, 42201)
    _err(client.post("/subjects/s/versions", json={"schema": "{}", "schemaType": "PROTOBUF"}), 422, 42201)
    _err(client.post("/subjects/s/versions", content=b"not json", headers=HEADERS), 400, 400)
    bad = json.loads(json.dumps(SENSOR))
    bad["fields"][2]["type"] = "string"
    message = _err(client.post("/subjects/s/versions", content=_body(bad), headers=HEADERS), 409, 409)
    assert "field 'value' type changed from double to string" in message
    _err(client.put("/config", json={"compatibility": "SIDEWAYS"}), 422, 42203)
    _err(client.put("/config/s", json={}), 422, 42203)
    _err(client.get("/config/s"), 404, 40408)
    _err(client.delete("/subjects/nope"), 404, 40401)


def test_store_failure_is_500(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path)
    client = TestClient(create_app(registry), raise_server_exceptions=False)
    (tmp_path / "schemas.jsonl").write_text("garbage\n")
    _err(client.get("/subjects"), 500, 50001)


def test_compatibility_endpoint(client: TestClient) -> None:
    url = "/compatibility/subjects/s/versions/latest"
    assert client.post(url, content=_body(SENSOR), headers=HEADERS).json() == {"is_compatible": True}
    client.post("/subjects/s/versions", content=_body(SENSOR), headers=HEADERS)
    assert client.post(url, content=_body(_v2()), headers=HEADERS).json() == {"is_compatible": True}
    broken = _v2()
    broken["fields"].append({"name": "zone", "type": "string"})
    verbose = client.post(url + "?verbose=true", content=_body(broken), headers=HEADERS).json()
    assert verbose == {
        "is_compatible": False,
        "messages": [
            "reader field 'zone' of SensorReading has no default and is missing from the writer schema"
        ],
    }
    assert client.post("/compatibility/subjects/s/versions/1", content=_body(broken)).json() == {
        "is_compatible": False
    }
    assert client.post("/compatibility/subjects/s/versions", content=_body(_v2())).json()["is_compatible"]
    _err(client.post("/compatibility/subjects/s/versions/4", content=_body(SENSOR)), 404, 40402)


def test_config_endpoints(client: TestClient) -> None:
    assert client.get("/config").json() == {"compatibilityLevel": "BACKWARD"}
    assert client.put("/config", json={"compatibility": "full"}).json() == {"compatibility": "FULL"}
    assert client.get("/config").json() == {"compatibilityLevel": "FULL"}
    assert client.get("/config/s?defaultToGlobal=true").json() == {"compatibilityLevel": "FULL"}
    assert client.put("/config/s", json={"compatibility": "NONE"}).json() == {"compatibility": "NONE"}
    assert client.get("/config/s").json() == {"compatibilityLevel": "NONE"}
    assert client.delete("/config/s").json() == {"compatibilityLevel": "NONE"}
    assert client.get("/config/s?defaultToGlobal=true").json() == {"compatibilityLevel": "FULL"}


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[FileRegistry, HttpRegistryClient]]:
    registry = FileRegistry(tmp_path)
    server = start_in_thread(registry)
    try:
        yield registry, HttpRegistryClient(server.url, timeout=10)
    finally:
        server.stop()


def test_http_client_round_trip(served: tuple[FileRegistry, HttpRegistryClient]) -> None:
    registry, http = served
    assert http.register("s-value", SENSOR) == 1
    assert http.register("s-value", SENSOR) == 1
    assert registry.latest("s-value").id == 1  # really stored server-side
    assert json.loads(http.get_schema(1)) == SENSOR
    assert http.lookup("s-value", SENSOR).version == 1
    assert http.test_compatibility("s-value", _v2()) == []
    assert http.test_compatibility("new-subject", WEBLOG) == []
    assert http.register("s-value", _v2()) == 2
    assert http.versions("s-value") == [1, 2]
    assert http.subjects() == ["s-value"]
    assert http.get_version("s-value", 1).id == 1
    assert http.latest("s-value").version == 2
    assert http.set_config("FULL", "s-value") == "FULL"
    assert http.get_config("s-value") == "FULL"
    assert http.get_config("other") == "BACKWARD"
    assert http.delete_config("s-value") == "FULL"
    assert http.set_config("NONE") == "NONE"
    assert http.get_config() == "NONE"
    # the serde works unchanged over HTTP
    ser = AvroSerializer(http, "w-value", WEBLOG)
    record = {"event_id": "e", "client_ip": "1.2.3.4", "timestamp": 1_700_000_000_007, "method": "GET",
              "path": "/", "status": 200}
    value = AvroDeserializer(HttpRegistryClient(http.url))(ser(record)).value
    assert value["timestamp"] == 1_700_000_000_007 and value["client_ip"] == "1.2.3.4"
    assert http.delete_subject("s-value") == [1, 2]


def test_http_client_typed_errors(served: tuple[FileRegistry, HttpRegistryClient]) -> None:
    _, http = served
    http.register("s", SENSOR)
    with pytest.raises(SubjectNotFoundError, match="Subject 'nope' not found"):
        http.versions("nope")
    with pytest.raises(VersionNotFoundError):
        http.get_version("s", 5)
    with pytest.raises(SchemaNotFoundError) as info:
        http.get_schema(42)
    assert info.value.error_code == 40403
    with pytest.raises(InvalidSchemaError):
        http.register("s", '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}')
    bad = json.loads(json.dumps(SENSOR))
    bad["fields"][2]["type"] = "string"
    with pytest.raises(IncompatibleSchemaError, match="field 'value' type changed from double to string"):
        http.register("s", bad)
    assert http.test_compatibility("s", bad) == ["field 'value' type changed from double to string"]
    with pytest.raises(InvalidCompatibilityLevelError):
        http.set_config("SIDEWAYS")


def test_two_file_registries_on_one_directory_share_ids(tmp_path: Path) -> None:
    first, second = FileRegistry(tmp_path), FileRegistry(tmp_path)
    client_a, client_b = TestClient(create_app(first)), TestClient(create_app(second))
    assert client_a.post("/subjects/a/versions", content=_body(SENSOR)).json() == {"id": 1}
    assert client_b.post("/subjects/b/versions", content=_body(WEBLOG)).json() == {"id": 2}
    assert json.loads(client_a.get("/schemas/ids/2").json()["schema"]) == WEBLOG
    assert client_b.get("/subjects").json() == ["a", "b"]


def _record(fields: list[dict[str, Any]], name: str = "R", namespace: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "record", "name": name, "fields": fields}
    if namespace:
        out["namespace"] = namespace
    return out


_X = _record([{"name": "i", "type": "int"}], "X")


@pytest.mark.parametrize(("field", "where"), [
    ({"name": "m", "type": {"type": "array", "items": "int"}, "default": ["x"]}, "array<int>"),
    ({"name": "r", "type": _X, "default": {"i": "nope"}}, "type X"),
    ({"name": "r", "type": _X, "default": {}}, "type X"),
    ({"name": "m", "type": {"type": "map", "values": {"type": "map", "values": "int"}}, "default": {"a": {"b": "x"}}},
     "map<map<int>>"),
    ({"name": "f", "type": "float", "default": "1.5"}, "type float"),
    ({"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A"]}, "default": "B"}, "type E"),
    ({"name": "x", "type": {"type": "fixed", "name": "F", "size": 2}, "default": "abc"}, "type F"),
    ({"name": "b", "type": "bytes", "default": "\u0100"}, "type bytes"),
], ids=["array-item", "record-field", "record-missing-field", "nested-map", "float-as-text", "enum-symbol",
        "fixed-size", "bytes-code-point"])
def test_a_default_of_the_wrong_type_at_any_depth_is_42201(client: TestClient, field: dict[str, Any],
                                                           where: str) -> None:
    """fastavro checks only a primitive field's default: these were registered, and a reader filling a missing
    field from one got a value of the wrong type."""
    message = _err(client.post("/subjects/d-value/versions", content=_body(_record([field])), headers=HEADERS),
                   422, 42201)
    assert f"schema.{field['name']}: default" in message and where in message, message


@pytest.mark.parametrize("field", [
    {"name": "m", "type": {"type": "array", "items": "int"}, "default": [1, 2]},
    {"name": "r", "type": _record([{"name": "i", "type": "int"}, {"name": "j", "type": "int", "default": 0}], "Y"),
     "default": {"i": 3}},
    {"name": "f", "type": "float", "default": 1},
    {"name": "u", "type": ["string", "null"], "default": None},  # any branch: Avro 1.12 (AVRO-3649)
    {"name": "x", "type": {"type": "fixed", "name": "F", "size": 2}, "default": "\u00ff\u0000"},
    {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}, "default": 0},
], ids=["array", "record-with-defaulted-field", "float-from-int", "union-second-branch", "fixed", "logical"])
def test_defaults_of_the_right_type_are_registered(client: TestClient, field: dict[str, Any]) -> None:
    resp = client.post("/subjects/d-value/versions", content=_body(_record([field])), headers=HEADERS)
    assert resp.status_code == 200, resp.text


def test_a_union_is_checked_by_full_names(client: TestClient) -> None:
    """By short name, one type twice ([a.X, "a.X"]) was accepted and two legal types (a.X, b.X) refused."""
    twice = _record([{"name": "u", "type": [_record([{"name": "i", "type": "int"}], "X", "a"), "a.X"]}])
    message = _err(client.post("/subjects/u-value/versions", content=_body(twice), headers=HEADERS), 422, 42201)
    assert "the union holds 'a.X' twice" in message
    both = _record([{"name": "u", "type": [_record([{"name": "i", "type": "int"}], "X", "a"),
                                           _record([{"name": "i", "type": "int"}], "X", "b")]}])
    assert client.post("/subjects/u-value/versions", content=_body(both), headers=HEADERS).status_code == 200


@pytest.mark.parametrize(("subject", "says"), [
    ("s" * 10_000, "10000 characters, over the limit of 255"),
    ("a\nb-value", "control character '\\n'"),
    ("a\x00b-value", "control character '\\x00'"),
    (" ", "must be a non-empty name"),
], ids=["long", "newline", "nul", "blank"])
def test_a_subject_name_the_registry_will_not_store_is_42208(tmp_path: Path, subject: str, says: str) -> None:
    """Any subject was stored as sent: a 100,000-character one added 100 KB to the log and to every /subjects
    answer, and a newline split `schemas list` across lines."""
    client = TestClient(create_app(FileRegistry(tmp_path)))
    message = _err(client.post(f"/subjects/{quote(subject, safe='')}/versions", content=_body(SENSOR),
                               headers=HEADERS), 422, 42208)
    assert says in message, message
    _err(client.put(f"/config/{quote(subject, safe='')}", json={"compatibility": "NONE"}, headers=HEADERS),
         422, 42208)
    assert client.get("/subjects").json() == []
    assert FileRegistry(tmp_path).register("s" * 249 + "-value", SENSOR) > 0  # the longest topic's subject
