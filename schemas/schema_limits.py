"""Limits on a schema sent to the registry: size, nesting, named things, and Avro's naming rules.

Why before the registry parses it: a 10 MB schema or 200k fields cost every client that fetches
the schema (and every compatibility check); a schema nested 5000 levels deep overflowed the
parser's recursion (a 500). Avro requires names to match ``[A-Za-z_][A-Za-z0-9_]*`` (namespaces:
such names joined by dots); fastavro lets ``"a b"`` through, other clients then fail on it.

The walk is iterative, so no depth can exhaust the interpreter stack.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from schemas.compat import ParsedSchema, type_label
from schemas.exceptions import InvalidSchemaError, InvalidSubjectError
from schemas.httpguard import scan_json

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAMESPACE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


MAX_SUBJECT_CHARS = 255  # Kafka's longest topic name (249) plus "-value"


def check_subject(subject: object) -> str:
    """``subject`` if the registry may store it, else :class:`InvalidSubjectError`.

    Why: any subject was stored as sent, so a 100,000-character name added 100 KB to the registry log and
    to every ``GET /subjects`` answer, and a newline split ``streamlearn schemas list`` across lines.
    """
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidSubjectError("subject: must be a non-empty name, e.g. '<topic>-value'")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise InvalidSubjectError(f"subject: {len(subject)} characters, over the limit of {MAX_SUBJECT_CHARS} "
                                  "(a topic name of up to 249 plus '-value')")
    bad = next((c for c in subject if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if bad is not None:
        raise InvalidSubjectError(f"subject {subject[:60]!r}: control character {bad!r} is not allowed in a name")
    return subject


@dataclass(frozen=True)
class SchemaLimits:
    max_bytes: int = 256 * 1024
    max_depth: int = 64  # JSON nesting of the schema document
    max_nodes: int = 5_000  # types + fields + enum symbols


def check_schema(text: str, limits: SchemaLimits | None = None) -> None:
    """Raise :class:`InvalidSchemaError` (Confluent 42201) when ``text`` breaks a limit or a naming rule."""
    limits = limits or SchemaLimits()
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > limits.max_bytes:
        raise InvalidSchemaError(f"schema: {len(raw)} bytes, over the limit of {limits.max_bytes}; "
                                 "split it into smaller schemas")
    shape = scan_json(raw)
    if shape.depth > limits.max_depth:
        raise InvalidSchemaError(f"schema: nested {shape.depth} levels deep, over the limit of {limits.max_depth}")
    try:
        doc = json.loads(text, parse_constant=_no_constant)  # NaN in a default: a 500 when the schema was read
    except (ValueError, RecursionError) as exc:
        # a bare name such as "string" is valid Avro text too
        raise InvalidSchemaError(f"schema: not JSON ({type(exc).__name__}); send an Avro schema") from exc
    nodes = 0
    stack: list[tuple[Any, str]] = [(doc, "schema")]
    while stack:
        node, where = stack.pop()
        nodes += 1
        if nodes > limits.max_nodes:
            raise InvalidSchemaError(f"schema: more than {limits.max_nodes} types, fields and symbols; "
                                     "split it into smaller schemas")
        if isinstance(node, list):
            _check_union(node, where)
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))
            continue
        if isinstance(node, str):
            if node not in _PRIMITIVES and not NAMESPACE_RE.match(node):
                raise InvalidSchemaError(f"{where[:200]}: type name {node[:60]!r} is not a valid Avro name")
            continue
        if not isinstance(node, dict):
            raise InvalidSchemaError(f"{where[:200]}: a type must be a name, an object or a union list")
        kind = node.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            name = node.get("name")
            if not isinstance(name, str) or not NAMESPACE_RE.match(name):
                raise InvalidSchemaError(f"{where[:200]}: name {str(name)[:60]!r} is not a valid Avro name "
                                         "([A-Za-z_][A-Za-z0-9_]*, dotted for a full name)")
            namespace = node.get("namespace")
            if namespace not in (None, "") and (not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace)):
                raise InvalidSchemaError(f"{where[:200]}: namespace {str(namespace)[:60]!r} is not valid")
            where = f"{where}<{name}>"
        if kind in ("record", "error"):
            fields = node.get("fields")
            if not isinstance(fields, list):
                raise InvalidSchemaError(f"{where[:200]}: 'fields' must be a list")
            names: set[str] = set()
            for field in fields:
                nodes += 1
                fname = field.get("name") if isinstance(field, dict) else None
                if not isinstance(fname, str) or not NAME_RE.match(fname):
                    raise InvalidSchemaError(f"{where[:200]}: field name {str(fname)[:60]!r} is not a valid Avro "
                                             "name ([A-Za-z_][A-Za-z0-9_]*)")
                if fname in names:  # the encoder wrote such a field twice
                    raise InvalidSchemaError(f"{where[:200]}: field {fname!r} is declared twice")
                names.add(fname)
                _check_default(field, f"{where}.{fname}")
                stack.append((field.get("type"), f"{where}.{fname}"))
        elif kind == "enum":
            symbols = node.get("symbols")
            if not isinstance(symbols, list):
                raise InvalidSchemaError(f"{where[:200]}: 'symbols' must be a list")
            nodes += len(symbols)
            for symbol in symbols:
                if not isinstance(symbol, str) or not NAME_RE.match(symbol):
                    raise InvalidSchemaError(f"{where[:200]}: enum symbol {str(symbol)[:60]!r} is not a valid "
                                             "Avro name")
        elif kind == "fixed":
            size = node.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _INT_MAX:
                raise InvalidSchemaError(f"{where[:200]}: fixed size {str(size)[:40]!r} must be an integer "
                                         f"0-{_INT_MAX}")
        elif (inner := _inner(node, kind, where)) is not None:
            stack.append(inner)
    check_defaults(doc)


def _inner(node: dict[str, Any], kind: Any, where: str) -> tuple[Any, str] | None:
    """The type inside an array, a map or a nested type object, with its path; None for other kinds."""
    if kind == "array":
        return node.get("items"), f"{where}[]"
    if kind == "map":
        return node.get("values"), f"{where}{{}}"
    if isinstance(kind, dict | list):
        return kind, where
    return None


_INT_MAX = 2**31 - 1
_INT_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON; an Avro default must be a finite number")


def _check_union(branches: list[Any], where: str) -> None:
    """A union is non-empty and holds no union directly (Confluent refuses both, 42201). Two branches of
    one type are refused after the parse (:func:`_union_twice`), where names are full names."""
    if not branches:
        raise InvalidSchemaError(f"{where[:200]}: a union needs at least one branch")
    for branch in branches:
        if isinstance(branch, list):
            raise InvalidSchemaError(f"{where[:200]}: a union may not hold a union directly")


def _union_twice(branches: list[Any], where: str) -> None:
    """No two branches of one type, by full name (parsed form): each such union was accepted and then made
    the serializer or the registry's answers fail. Compared by short name before, ``[a.X, b.X]`` (legal
    Avro) was refused and ``[X in namespace a, "a.X"]`` (one type twice) was accepted."""
    seen: set[str] = set()
    for branch in branches:
        if isinstance(branch, str):
            key = branch
        elif isinstance(branch, dict):
            kind = branch.get("type")
            key = str(branch.get("name")) if kind in ("record", "error", "enum", "fixed") else str(kind)
        else:
            continue
        if key in seen:
            raise InvalidSchemaError(f"{where[:200]}: the union holds {key[:60]!r} twice")
        seen.add(key)


def _check_default(field: dict[str, Any], where: str) -> None:
    """An int/long field's default fits its type (10**40 was an OverflowError when encoding)."""
    kind, default = field.get("type"), field.get("default")
    bounds = _INT_RANGES.get(kind) if isinstance(kind, str) else None
    if bounds is not None and isinstance(default, int) and not isinstance(default, bool) and not (
            bounds[0] <= default <= bounds[1]):
        raise InvalidSchemaError(f"{where[:200]}: default {str(default)[:40]} does not fit an Avro {kind}")


def check_defaults(doc: Any) -> None:
    """Every field default is a value of its field's type, however deep (arrays, maps, records, named
    references), in Avro's JSON encoding; and no union holds one type twice (by full name).

    Why: fastavro checks only a primitive field's default, so ``"default": ["x"]`` on an array of int, a
    record default with a string for an int field, or ``"1.5"`` for a float were registered; a reader
    that filled a missing field from such a default got a value of the wrong type, silently. Confluent
    refuses them (42201). A union's default may match any of its branches (Avro 1.12, AVRO-3649; older
    readers wanted the first). A schema fastavro cannot parse is left to the parse that reports it.
    """
    try:
        sch = ParsedSchema(doc)
    except InvalidSchemaError:  # the registry's own parse reports it, with its message
        return
    named = sch.named
    seen: set[str] = set()
    stack: list[tuple[Any, str]] = [(sch.root, "schema")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if node in named and node not in seen:
                seen.add(node)
                stack.append((named[node], where))
        elif isinstance(node, list):
            _union_twice(node, where)
            stack.extend((branch, where) for branch in node)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "error"):
                for field in node.get("fields", []):
                    fwhere = f"{where}.{field['name']}"
                    if "default" in field and not _fits(field["type"], field["default"], named, 0):
                        raise InvalidSchemaError(
                            f"{fwhere[:200]}: default {json.dumps(field['default'])[:60]} is not a value of "
                            f"the field's type {type_label(sch, field['type'])}")
                    stack.append((field["type"], fwhere))
            elif (inner := _inner(node, kind, where)) is not None:
                stack.append(inner)


_MAX_DEFAULT_DEPTH = 64  # the schema document itself is at most 64 levels deep (SchemaLimits.max_depth)


def _fits(node: Any, value: Any, named: dict[str, Any], depth: int) -> bool:
    """Whether ``value`` (JSON) is a value of Avro type ``node`` (fastavro's parsed form)."""
    if depth > _MAX_DEFAULT_DEPTH:
        return False
    if isinstance(node, str):
        if node in named:
            return _fits(named[node], value, named, depth + 1)
        return _primitive_fits(node, value)
    if isinstance(node, list):
        return any(_fits(branch, value, named, depth + 1) for branch in node)
    if not isinstance(node, dict):
        return False
    kind = node.get("type")
    if kind in ("record", "error"):
        return isinstance(value, dict) and all(
            _fits(f["type"], value[f["name"]], named, depth + 1) if f["name"] in value else "default" in f
            for f in node.get("fields", []))
    if kind == "enum":
        return isinstance(value, str) and value in node.get("symbols", [])
    if kind == "fixed":
        return isinstance(value, str) and len(value) == node.get("size") and all(ord(c) < 256 for c in value)
    if kind == "array":
        return isinstance(value, list) and all(_fits(node.get("items"), v, named, depth + 1) for v in value)
    if kind == "map":
        return isinstance(value, dict) and all(_fits(node.get("values"), v, named, depth + 1) for v in value.values())
    return _fits(kind, value, named, depth + 1)  # {"type": "long", "logicalType": ...}: the underlying type


def _primitive_fits(kind: str, value: Any) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if kind in ("float", "double"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "bytes":  # JSON strings whose code points 0-255 are the bytes
        return isinstance(value, str) and all(ord(c) < 256 for c in value)
    return False
