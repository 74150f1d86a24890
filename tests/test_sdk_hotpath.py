"""The per-record shortcuts of the SDK's publish path accept and refuse exactly what the full checks do.

No broker: the validator's exact-type fast path (``_Compiler.always_valid``) against the per-field
check it skips, and ``decode_many``'s header shortcut against per-record decoding (docs/SDK_PERF.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from schemas import serde
from schemas.exceptions import RecordValidationError
from schemas.registry import FileRegistry
from schemas.validate import _Compiler, _Invalid, compile_validator

VALUES: list[Any] = [None, True, False, 0, 1, -(2**31) - 1, 2**31, 2**63, -(2**63) - 1, 2**70, 1.5, float("nan"),
                     "s", "", b"b", bytearray(b"x"), memoryview(b"m"), [], [1], {}, {"a": 1}, ("t",), object()]
TYPES: list[Any] = ["null", "boolean", "int", "long", "float", "double", "string", "bytes",
                    ["null", "string"], ["null", "double"], ["null", "long"], ["string", "int"], ["null", "boolean"],
                    {"type": "long", "logicalType": "timestamp-millis"}, {"type": "string"},
                    {"type": "enum", "name": "E", "symbols": ["A", "B"]},
                    {"type": "fixed", "name": "F", "size": 1},
                    {"type": "array", "items": "string"}, {"type": "map", "values": "double"},
                    ["null", {"type": "enum", "name": "E2", "symbols": ["s"]}]]


def _accepts(check: Any, value: Any) -> bool:
    try:
        check(value)
    except _Invalid:
        return False
    return True


@pytest.mark.parametrize("field_type", TYPES, ids=repr)
def test_the_fast_path_of_a_record_field_accepts_exactly_what_the_field_check_accepts(field_type: Any) -> None:
    schema = {"type": "record", "name": "R", "fields": [{"name": "f", "type": field_type}]}
    validate = compile_validator(schema)
    field_check = _Compiler({}).compile(field_type)
    for value in VALUES:
        expected = _accepts(field_check, value)
        try:
            validate({"f": value})
            got = True
        except RecordValidationError as exc:
            got = False
            assert str(exc).startswith("R.f"), exc  # the error still names the field
        assert got == expected, (field_type, value)


def test_long_fields_are_never_fast_pathed_so_their_range_is_checked() -> None:
    validate = compile_validator({"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"},
                                                                           {"name": "d", "type": "double"}]})
    with pytest.raises(RecordValidationError, match=r"R\.n.*out of range"):
        validate({"n": 2**70, "d": 1.0})
    with pytest.raises(RecordValidationError, match=r"R\.d"):
        validate({"n": 1, "d": True})


def test_decode_many_with_mixed_schemas_and_bad_framing_matches_per_record_decoding() -> None:
    registry = FileRegistry(Path(tempfile.mkdtemp(prefix="sl-hotpath-")))
    a = serde.AvroSerializer(registry, "a-value", {"type": "record", "name": "A", "fields": [
        {"name": "x", "type": "string"}]})
    b = serde.AvroSerializer(registry, "b-value", {"type": "record", "name": "B", "fields": [
        {"name": "y", "type": "long"}, {"name": "z", "type": ["null", "string"]}]})
    good_a, good_b = a({"x": "hello"}), b({"y": 7, "z": None})
    payloads: list[Any] = [good_a, good_a, good_b, good_a + b"\x00", good_b[:-1] + b"\x04", good_b,
                           b"\x01" + good_a[1:], good_a[:3], None, good_a, bytearray(good_b), memoryview(good_a)]
    des = serde.AvroDeserializer(registry)
    many = des.decode_many(payloads)
    for payload, got in zip(payloads, many, strict=True):
        try:
            want: Any = des(payload)
        except Exception as exc:  # noqa: BLE001 - compared by class and message
            want = exc
        if isinstance(want, Exception):
            assert type(got) is type(want) and str(got) == str(want), (payload, got, want)
        else:
            assert got == want, payload
