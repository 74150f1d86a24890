"""A fast record validator compiled from a parsed Avro schema, with errors that name the field.

Why not ``fastavro.validation.validate(raise_errors=True)``: its messages do not say which field
failed in a way a person can act on (no map key, a missing field reads "is None", one line per union
branch), and it re-walks the schema dict on every call (7-50x slower per record, measured by
the codec table of ``benchmarks/bench_sdk.py``; docs/AVRO.md). And fastavro's writer alone is not a
check: it writes ``True`` as a long. So this is the one validation path, fastavro the one codec. Here a schema
is compiled once into a tree of small closures (cached per schema); checking a valid record costs
one call per field and builds no strings. Only on failure is the field path (``values[humidity]``,
``outputs[3]``, ``inner.x``) assembled, as the internal error unwinds.

Semantics match what ``fastavro.schemaless_writer`` accepts: ints for float/double, a missing key
for a field with a default (the default is written), extra keys ignored (Avro drops unknown fields).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from schemas.exceptions import RecordValidationError
from schemas.ids import ID_FIELDS, MAX_ID_CHARS

Check = Callable[[Any], None]

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


class _Invalid(Exception):
    """Internal: carries the failing value and reason; ``path`` grows as the stack unwinds."""

    def __init__(self, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason
        self.path: list[str] = []


def _type_name(node: Any) -> str:
    if isinstance(node, str):
        return node.rsplit(".", 1)[-1]
    if isinstance(node, list):
        return " or ".join(_type_name(b) for b in node)
    if isinstance(node, dict):
        if "name" in node and node.get("type") in ("record", "enum", "fixed", "error"):
            return f"{node['type']} {str(node['name']).rsplit('.', 1)[-1]}"
        return str(node.get("type"))
    return str(node)


class _Compiler:
    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.cache: dict[str, Check] = {}

    def compile(self, node: Any) -> Check:
        if isinstance(node, str) and node in self.named:
            node = self.named[node]
        if isinstance(node, dict) and node.get("type") in ("record", "error", "enum", "fixed"):
            name = node["name"]
            cached = self.cache.get(name)
            if cached is not None:
                return cached
            holder: list[Check] = []
            self.cache[name] = _lazy(lambda: holder[0])  # recursive references resolve later
            self.named.setdefault(name, node)
            holder.append(self._named(node))
            self.cache[name] = holder[0]
            return holder[0]
        if isinstance(node, dict) and isinstance(node.get("type"), str) and node["type"] not in (
            "record", "error", "enum", "fixed", "array", "map"
        ):
            return self.compile(node["type"])
        if isinstance(node, list):
            return self._union(node)
        kind = node if isinstance(node, str) else node.get("type")
        if kind == "null":
            return _check_null
        if kind == "boolean":
            return _check_boolean
        if kind == "int":
            return _int_check("int", *_INT32)
        if kind == "long":
            return _int_check("long", *_INT64)
        if kind in ("float", "double"):
            return _float_check(kind)
        if kind == "string":
            return _check_string
        if kind == "bytes":
            return _check_bytes
        if kind == "array":
            return _array_check(self.compile(node["items"]), _type_name(node["items"]))
        if kind == "map":
            return _map_check(self.compile(node["values"]), _type_name(node["values"]))
        raise RecordValidationError("schema", "", node, f"unsupported Avro type {kind!r}")

    def _named(self, node: dict[str, Any]) -> Check:
        if node["type"] == "fixed":
            return _fixed_check(node)
        if node["type"] == "enum":
            return _enum_check(node)
        return self._record(node)

    def _union(self, branches: list[Any]) -> Check:
        checks = [self.compile(b) for b in branches]
        expected = "one of " + ", ".join(_type_name(b) for b in branches)
        has_null = "null" in branches
        others = [c for b, c in zip(branches, checks, strict=True) if b != "null"]
        if has_null and len(others) == 1:
            only = others[0]

            def check_optional(value: Any) -> None:
                if value is not None:
                    try:
                        only(value)
                    except _Invalid as exc:
                        if exc.path:
                            raise  # a nested field failed: its own message is the useful one
                        raise _Invalid(value, f"expected {expected}") from None

            return check_optional

        def check_union(value: Any) -> None:
            first: _Invalid | None = None
            for check in checks:
                try:
                    check(value)
                    return
                except _Invalid as exc:
                    first = first or exc
            if first is not None and first.path and len(checks) - int(has_null) == 1:
                raise first  # only one real candidate: its deeper error is the useful one
            raise _Invalid(value, f"expected {expected}")

        return check_union

    def always_valid(self, node: Any, seen: frozenset[str] = frozenset()) -> frozenset[type]:
        """The Python types every value of which ``node``'s check accepts, whatever the value.

        Why: a record's check called one closure per field; for most fields (strings, doubles,
        optional strings, ...) the exact type of the value already decides, and a set lookup costs
        a fraction of a Python call (the publish hot path, docs/SDK_PERF.md). Only exact types whose
        check has no further condition are listed (not int/long: their range is checked; not bool
        for a double: it is refused), so the fast path accepts exactly what the check accepts."""
        if isinstance(node, str) and node in self.named:
            if node in seen:
                return frozenset()
            return self.always_valid(self.named[node], seen | {node})
        if isinstance(node, list):
            return frozenset().union(*(self.always_valid(b, seen) for b in node))
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str | list) and kind not in ("record", "error", "enum", "fixed", "array", "map"):
                return self.always_valid(kind, seen)
            return frozenset()
        return _ALWAYS_VALID.get(node, frozenset())

    def _record(self, node: dict[str, Any]) -> Check:
        name = _type_name(node["name"])
        id_names = ID_FIELDS.get(name, ())
        fields = [(f["name"], self.compile(f["type"]), "default" in f, self.always_valid(f["type"]),
                   f["name"] in id_names) for f in node.get("fields", [])]
        fields.sort(key=lambda field: field[4])  # id fields last (stable: schema order otherwise)
        return _record_check(name, fields)


def _record_check(name: str, fields: list[tuple[str, Check, bool, frozenset[type], bool]]) -> Check:
    """The check of one record: every field in schema order, the id fields (schemas.ids.ID_FIELDS) last,
    which are also capped at MAX_ID_CHARS.

    The exact type of a value usually decides its field (``fast``, see ``_Compiler.always_valid``):
    a set lookup instead of a call on the publish hot path (docs/SDK_PERF.md). An id field costs one
    more ``len()``; only a string is measured (an optional id may be None). The error shows at most
    120 characters of the id (RecordValidationError cuts its repr), so a hostile id never becomes a
    huge message.
    """
    cap = MAX_ID_CHARS  # a closure variable: cheaper to read per record than the module global

    def check_record(value: Any) -> None:
        if type(value) is not dict and not isinstance(value, Mapping):  # the ABC check costs a call
            raise _Invalid(value, f"expected a dict for record {name}")
        for fname, check, has_default, fast, is_id in fields:
            try:
                item = value[fname]
            except KeyError:
                if has_default:
                    continue
                exc = _Invalid(MISSING, "missing required field (it has no default)")
                exc.path.append(fname)
                raise exc from None
            if type(item) not in fast:
                try:
                    check(item)
                except _Invalid as exc:
                    exc.path.append(fname)
                    raise
            if is_id and isinstance(item, str) and len(item) > cap:
                too_long = _Invalid(item, f"{len(item)} characters, over the limit of {cap} for an id "
                                          "(MAX_ID_CHARS); use a shorter id")
                too_long.path.append(fname)
                raise too_long

    return check_record


#: Exact types that pass a primitive's check for every value (see ``_Compiler.always_valid``).
_ALWAYS_VALID: dict[str, frozenset[type]] = {
    "null": frozenset({type(None)}),
    "boolean": frozenset({bool}),
    "string": frozenset({str}),
    "bytes": frozenset({bytes, bytearray, memoryview}),
    "float": frozenset({float, int}),
    "double": frozenset({float, int}),
}


def _lazy(get: Callable[[], Check]) -> Check:
    def check(value: Any) -> None:
        get()(value)

    return check


def _check_null(value: Any) -> None:
    if value is not None:
        raise _Invalid(value, "expected null")


def _check_boolean(value: Any) -> None:
    if value is not True and value is not False:
        raise _Invalid(value, "expected boolean")


def _int_check(kind: str, low: int, high: int) -> Check:
    def check(value: Any) -> None:
        if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
            raise _Invalid(value, f"expected {kind}")
        if not low <= value <= high:
            raise _Invalid(value, f"expected {kind}: out of range {low}..{high}")

    return check


def _float_check(kind: str) -> Check:
    def check(value: Any) -> None:
        cls = type(value)
        if cls is not float and cls is not int:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _Invalid(value, f"expected {kind}")

    return check


def _check_string(value: Any) -> None:
    if type(value) is not str and not isinstance(value, str):
        raise _Invalid(value, "expected string")


def _check_bytes(value: Any) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _Invalid(value, "expected bytes")


def _fixed_check(node: dict[str, Any]) -> Check:
    size = int(node["size"])
    name = _type_name(node["name"])

    def check(value: Any) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) != size:
            raise _Invalid(value, f"expected fixed {name} of {size} bytes")

    return check


def _enum_check(node: dict[str, Any]) -> Check:
    symbols = frozenset(node["symbols"])
    shown = ", ".join(node["symbols"])

    def check(value: Any) -> None:
        if value not in symbols if isinstance(value, str) else True:
            raise _Invalid(value, f"expected one of the symbols {shown}")

    return check


def _array_check(item: Check, item_name: str) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, list | tuple):
            raise _Invalid(value, f"expected an array (list) of {item_name}")
        for i, element in enumerate(value):
            try:
                item(element)
            except _Invalid as exc:
                exc.path.append(f"[{i}]")
                raise

    return check


def _map_check(item: Check, item_name: str) -> Check:
    def check(value: Any) -> None:
        if not isinstance(value, Mapping):
            raise _Invalid(value, f"expected a map (dict of string to {item_name})")
        for key, element in value.items():
            if not isinstance(key, str):
                exc = _Invalid(key, "expected string map keys")
                exc.path.append(f"[{key!r}]")
                raise exc
            try:
                item(element)
            except _Invalid as exc:
                exc.path.append(f"[{key}]")
                raise

    return check


def _join(parts: list[str]) -> str:
    out = ""
    for part in reversed(parts):
        out += part if part.startswith("[") or not out else "." + part
    return out


def compile_validator(parsed: Any) -> Callable[[Any], None]:
    """A function ``check(record)`` raising :class:`RecordValidationError` naming the field path."""
    named: dict[str, Any] = dict(parsed.get("__named_schemas", {})) if isinstance(parsed, dict) else {}
    inner = _Compiler(named).compile(parsed)
    root = _type_name(parsed["name"]) if isinstance(parsed, dict) and "name" in parsed else "value"

    def validate(record: Any) -> None:
        try:
            inner(record)
        except _Invalid as exc:
            raise RecordValidationError(root, _join(exc.path), exc.value, exc.reason) from None

    return validate
