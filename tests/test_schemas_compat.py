"""Compatibility modes x schema changes, with the exact messages a person evolving a schema sees,
and records read across versions both ways through the deserializer."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from schemas import catalog, compat
from schemas.exceptions import IncompatibleReaderError, IncompatibleSchemaError, InvalidCompatibilityLevelError
from schemas.registry import FileRegistry
from schemas.serde import AvroDeserializer, AvroSerializer

BASE: dict[str, Any] = {
    "type": "record",
    "name": "SensorReading",
    "namespace": "io.streamlearn.events",
    "fields": [
        {"name": "sensor_id", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "count", "type": "int"},
        {"name": "unit", "type": "string"},
        {"name": "label", "type": ["null", "boolean"], "default": None},
    ],
}


def _changed(change: str) -> dict[str, Any]:
    new = copy.deepcopy(BASE)
    fields = new["fields"]
    if change == "add_with_default":
        fields.append({"name": "site", "type": "string", "default": "unknown"})
    elif change == "add_without_default":
        fields.append({"name": "site", "type": "string"})
    elif change == "remove_with_default":
        new["fields"] = [f for f in fields if f["name"] != "label"]
    elif change == "remove_without_default":
        new["fields"] = [f for f in fields if f["name"] != "unit"]
    elif change == "change_type":
        fields[1]["type"] = "string"
    elif change == "promote_type":
        fields[2]["type"] = "long"
    else:
        raise AssertionError(change)
    return new


MISSING_SITE = "reader field 'site' of SensorReading has no default and is missing from the writer schema"
MISSING_UNIT = "reader field 'unit' of SensorReading has no default and is missing from the writer schema"
VALUE_CHANGED = "field 'value' type changed from double to string"
COUNT_PROMOTED = "field 'count' type changed from int to long"

#: change -> (errors when the new schema reads old data, errors when old reads new data)
DIRECTIONS: dict[str, tuple[list[str], list[str]]] = {
    "add_with_default": ([], []),
    "add_without_default": ([MISSING_SITE], []),
    "remove_with_default": ([], []),
    "remove_without_default": ([], [MISSING_UNIT]),
    "change_type": ([VALUE_CHANGED], [VALUE_CHANGED]),
    "promote_type": ([], [COUNT_PROMOTED]),
}


def _expected(mode: str, change: str) -> list[str]:
    backward, forward = DIRECTIONS[change]
    if mode == "NONE":
        return []
    out: list[str] = []
    if mode.startswith(("BACKWARD", "FULL")):
        out += backward
    if mode.startswith(("FORWARD", "FULL")):
        out += forward
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("change", sorted(DIRECTIONS))
@pytest.mark.parametrize("mode", compat.LEVELS)
def test_mode_by_change_matrix(tmp_path: Path, mode: str, change: str) -> None:
    registry = FileRegistry(tmp_path)
    registry.set_config(mode, "s-value")
    first = registry.register("s-value", BASE)
    new = _changed(change)
    expected = _expected(mode, change)
    assert registry.test_compatibility("s-value", new) == expected
    if expected:
        with pytest.raises(IncompatibleSchemaError) as info:
            registry.register("s-value", new)
        assert info.value.messages == expected
        assert info.value.mode == mode
        assert registry.versions("s-value") == [1]
    else:
        assert registry.register("s-value", new) == first + 1
        assert registry.versions("s-value") == [1, 2]


def test_default_mode_is_backward(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path)
    assert registry.get_config() == "BACKWARD"
    registry.register("s-value", BASE)
    with pytest.raises(IncompatibleSchemaError, match=MISSING_SITE):
        registry.register("s-value", _changed("add_without_default"))


def test_transitive_modes_check_every_earlier_version(tmp_path: Path) -> None:
    v1 = copy.deepcopy(BASE)
    v2 = _changed("add_with_default")
    v3 = _changed("add_without_default")  # readable from v2 (has 'site'), not from v1
    for mode, errors in (("BACKWARD", []), ("BACKWARD_TRANSITIVE", [MISSING_SITE])):
        registry = FileRegistry(tmp_path / mode)
        registry.set_config(mode)
        registry.register("s-value", v1)
        registry.register("s-value", v2)
        assert registry.test_compatibility("s-value", v3) == errors
        assert registry.test_compatibility("s-value", v3, version=1) == [MISSING_SITE]
    # FORWARD: v1 requires 'unit'; v2 gives it a default; v3 drops it.
    f1 = copy.deepcopy(BASE)
    f2 = copy.deepcopy(BASE)
    f2["fields"][3]["default"] = "celsius"
    f3 = _changed("remove_without_default")
    for mode, errors in (("FORWARD", []), ("FORWARD_TRANSITIVE", [MISSING_UNIT])):
        registry = FileRegistry(tmp_path / mode)
        registry.set_config(mode)
        registry.register("s-value", f1)
        registry.register("s-value", f2)
        assert registry.test_compatibility("s-value", f3) == errors


@pytest.mark.parametrize(
    ("old", "new", "errors"),
    [
        ("int", "long", []), ("int", "double", []), ("long", "float", []), ("float", "double", []),
        ("string", "bytes", []), ("bytes", "string", []),
        ("long", "int", ["field 'x' type changed from long to int"]),
        ("double", "float", ["field 'x' type changed from double to float"]),
        ("string", ["null", "string"], []),
        (["null", "string"], "string", ["field 'x' type changed from union[null, string] to string"]),
        (["null", "int"], ["null", "long"], []),
        ({"type": "array", "items": "int"}, {"type": "array", "items": "long"}, []),
        ({"type": "array", "items": "long"}, {"type": "array", "items": "int"},
         ["field 'x[]' type changed from long to int"]),
        ({"type": "map", "values": "string"}, {"type": "map", "values": "int"},
         ["field 'x{}' type changed from string to int"]),
        ({"type": "fixed", "name": "F", "size": 4}, {"type": "fixed", "name": "F", "size": 8},
         ["field 'x' fixed F size changed from 4 to 8"]),
        ({"type": "fixed", "name": "F", "size": 4}, {"type": "fixed", "name": "G", "size": 4},
         ["field 'x' type changed from F to G"]),
        ({"type": "enum", "name": "E", "symbols": ["A", "B"]},
         {"type": "enum", "name": "E", "symbols": ["A"]},
         ["field 'x' enum E has no symbol(s) B of the writer schema and no default"]),
        ({"type": "enum", "name": "E", "symbols": ["A", "B"]},
         {"type": "enum", "name": "E", "symbols": ["A", "Z"], "default": "Z"}, []),
        ({"type": "record", "name": "In", "fields": [{"name": "a", "type": "int"}]},
         {"type": "record", "name": "In",
          "fields": [{"name": "a", "type": "int"}, {"name": "b", "type": "int"}]},
         ["reader field 'x.b' of In has no default and is missing from the writer schema"]),
    ],
)
def test_backward_resolution_rules(old: Any, new: Any, errors: list[str]) -> None:
    def wrap(t: Any) -> dict[str, Any]:
        return {"type": "record", "name": "R", "fields": [{"name": "x", "type": t}]}

    assert compat.check_compatibility("BACKWARD", wrap(new), [wrap(old)]) == errors


def test_invalid_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidCompatibilityLevelError, match="use one of NONE, BACKWARD"):
        FileRegistry(tmp_path).set_config("SIDEWAYS")
    assert compat.normalize_level("full_transitive") == "FULL_TRANSITIVE"


def test_field_aliases_count_as_the_same_field() -> None:
    old = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}
    new = {"type": "record", "name": "R", "fields": [{"name": "b", "type": "int", "aliases": ["a"]}]}
    assert compat.check_compatibility("BACKWARD", new, [old]) == []


@pytest.mark.parametrize("level", ["BACKWARD", "FORWARD"])
def test_a_writer_field_alias_does_not_count(tmp_path: Path, level: str) -> None:
    """Only the reader's aliases resolve a rename (the Avro spec; fastavro's decoder reads so). Counting the
    writer's let a rename pass that the decoder could not read: the gateway answered such a record 500 and a
    Subscriber with a reader schema crashed on it at every restart."""
    aliased = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "string", "aliases": ["b"]}]}
    renamed = {"type": "record", "name": "R", "fields": [{"name": "b", "type": "string"}]}
    old, new = (aliased, renamed) if level == "BACKWARD" else (renamed, aliased)
    errors = compat.check_compatibility(level, new, [old])
    assert errors and "has no default and is missing from the writer schema" in errors[0], errors
    registry = FileRegistry(tmp_path)
    registry.set_config("NONE")
    written = AvroSerializer(registry, "w-value", aliased)({"a": "x"})
    with pytest.raises(IncompatibleReaderError, match="cannot read records written with schema id"):
        AvroDeserializer(registry, reader_schema=renamed)(written)


def test_records_evolve_read_both_ways(tmp_path: Path) -> None:
    """A v1 consumer reads v2 records and a v2 consumer reads v1 records (FULL-compatible change)."""
    registry = FileRegistry(tmp_path)
    registry.set_config("FULL")
    v1 = catalog.load_schema("SensorReading")
    v2 = copy.deepcopy(v1)
    v2["fields"].append({"name": "site", "type": ["null", "string"], "default": None})
    v2["fields"] = [f for f in v2["fields"] if f["name"] != "event_id"]  # had a default
    old_writer = AvroSerializer(registry, "s-value", v1)
    new_writer = AvroSerializer(registry, "s-value", v2)
    base = {"sensor_id": "s1", "timestamp": 1_700_000_000_001, "value": 3.5, "values": {}, "unit": "c",
            "label": None}
    old_bytes = old_writer({**base, "event_id": "e1"})
    new_bytes = new_writer({**base, "site": "lab"})
    assert new_writer.schema_id != old_writer.schema_id

    v1_reader = AvroDeserializer(registry, reader_schema=v1)
    v2_reader = AvroDeserializer(registry, reader_schema=v2)
    assert v1_reader(new_bytes).value == {**base, "event_id": None}  # default filled, 'site' dropped
    assert v1_reader(new_bytes).schema_id == new_writer.schema_id
    assert v2_reader(old_bytes).value == {**base, "site": None}  # default filled, 'event_id' dropped
    assert v1_reader(old_bytes).value == {**base, "event_id": "e1"}
    assert type(v2_reader(old_bytes).value["timestamp"]) is int


def _nested_unions(depth: int, extra: bool = False) -> dict:
    """R0..R<depth>: each record has four fields ["null", R<i+1>], the first defining R<i+1> inline (3 KB
    at depth 12, inside every size, depth and node limit)."""
    def rec(i: int) -> dict:
        if i == depth:
            return {"type": "record", "name": f"R{i}", "fields": [{"name": "v", "type": "int"}]}
        fields = [{"name": "f0", "type": ["null", rec(i + 1)]}]
        fields += [{"name": f"f{j}", "type": ["null", f"R{i + 1}"]} for j in range(1, 4)]
        if i == 0 and extra:
            fields.append({"name": "extra", "type": "int", "default": 0})
        return {"type": "record", "name": f"R{i}", "fields": fields}
    return rec(0)


def test_records_nested_in_unions_are_checked_once_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each union branch re-checked its whole subtree: exponential in the depth (depth 10 took 1.2 s, 11
    blocked the registry server ~3 minutes, 12 did not finish). Counting the records checked keeps the
    test free of wall-clock limits: a few per level now, thousands at depth 7 before."""
    calls = 0
    real = compat._Checker._record

    def counting(self: Any, rnode: Any, wnode: Any, path: str) -> None:
        nonlocal calls
        calls += 1
        real(self, rnode, wnode, path)

    monkeypatch.setattr(compat._Checker, "_record", counting)
    new, old = _nested_unions(7, extra=True), _nested_unions(7)
    assert compat.check_compatibility("FULL_TRANSITIVE", new, [old]) == []
    assert calls < 100, calls
    assert compat.check_compatibility("FULL_TRANSITIVE", _nested_unions(30, extra=True), [_nested_unions(30)]) == []
