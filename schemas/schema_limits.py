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

from schemas.exceptions import InvalidSchemaError
from schemas.httpguard import scan_json

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAMESPACE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


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
        elif kind == "array":
            stack.append((node.get("items"), f"{where}[]"))
        elif kind == "map":
            stack.append((node.get("values"), f"{where}{{}}"))
        elif isinstance(kind, dict | list):
            stack.append((kind, where))


_INT_MAX = 2**31 - 1
_INT_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON; an Avro default must be a finite number")


def _check_union(branches: list[Any], where: str) -> None:
    """A union is non-empty, holds no union directly, and no two branches of one type: each was accepted
    and then made the serializer or the registry's answers fail (Confluent refuses them, 42201)."""
    if not branches:
        raise InvalidSchemaError(f"{where[:200]}: a union needs at least one branch")
    seen: set[str] = set()
    for branch in branches:
        if isinstance(branch, list):
            raise InvalidSchemaError(f"{where[:200]}: a union may not hold a union directly")
        if isinstance(branch, str):
            key = branch
        elif isinstance(branch, dict):
            kind = branch.get("type")
            key = str(branch.get("name")) if kind in ("record", "error", "enum", "fixed") else str(kind)
        else:
            continue  # reported as "a type must be a name, an object or a union list"
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
