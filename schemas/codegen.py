"""Avro encoders and decoders generated as Python source, one pair per schema.

Why: the SDK's goals are relative to raw kafka-python (publish >= 0.8x, consume >= 0.7x), and
fastavro spends most of its time on generic dispatch (a union field costs it a validation pass per
branch). Code generated for one schema does only what that schema needs: a field is a local
variable, ``["null", "string"]`` is one ``if``, a small length is one table lookup. Measured on
WebLogEvent it is several times faster than ``schemaless_writer``/``schemaless_reader``.

Correctness rules:

* The encoder's checks are *at least* as strict as :mod:`schemas.validate`: anything it is not
  sure of (a ``str`` subclass, an int for a double inside an ambiguous union, a bytes default...)
  raises :class:`Unsupported`, and the caller falls back to the validator (for the error message)
  and fastavro (for the bytes). So the fast path can only ever be a shortcut, never a different
  answer; tests compare both byte for byte.
* The decoder bounds every declared length and block count by the bytes that remain (or, for
  zero-byte items, by a total budget) *before* looping or slicing, so a hostile payload fails in
  microseconds. It raises :class:`TruncatedRecordError` / :class:`MalformedRecordError`; an
  ``IndexError`` escaping it means the body ended early (the caller maps it).

Reader/writer schema resolution is not generated: that path stays with fastavro.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from schemas.exceptions import MalformedRecordError, TruncatedRecordError

Encoder = Callable[[Any, bytearray], None]
Decoder = Callable[[bytes, int, int], tuple[Any, int]]

MAX_ZERO_SIZE_ITEMS = 1_000_000
_PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")


class Unsupported(Exception):
    """Internal: the fast encoder cannot vouch for this value; use the slow, general path."""


def _zigzag_bytes(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: Encoded longs -64..63 (one byte each), indexed by value + 64.
_SMALL = tuple(_zigzag_bytes(n) for n in range(-64, 64))


def _read_long(b: bytes, p: int, e: int) -> tuple[int, int]:
    """Slow path of a varint (more than one byte); ``p`` points at its first byte."""
    shift = result = 0
    while True:
        if p >= e:
            raise TruncatedRecordError("data: Avro body ends inside a variable-length integer")
        c = b[p]
        p += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return (result >> 1) ^ -(result & 1), p
        shift += 7
        if shift > 63:
            raise MalformedRecordError("data: Avro varint longer than 10 bytes")


def _truncated(what: str, need: int, have: int) -> TruncatedRecordError:
    return TruncatedRecordError(f"data: Avro {what} declares {need} but only {have} bytes remain")


def _malformed(message: str) -> MalformedRecordError:
    return MalformedRecordError(f"data: {message}")


class _Gen:
    """Emits the source of one encoder and one decoder module for a parsed schema."""

    def __init__(self, named: dict[str, Any]) -> None:
        self.named = named
        self.ns: dict[str, Any] = {
            "_S": _SMALL, "_zz": _zigzag_bytes, "_U": Unsupported, "_rl": _read_long,
            "_tr": _truncated, "_mal": _malformed,
            "_pd": struct.Struct("<d").pack, "_pf": struct.Struct("<f").pack,
            "_ud": struct.Struct("<d").unpack_from, "_uf": struct.Struct("<f").unpack_from,
            "_ZMAX": MAX_ZERO_SIZE_ITEMS,
        }
        self.funcs: list[str] = []
        self.done: dict[str, str] = {}  # record name -> suffix of its generated functions
        self.counter = 0

    def var(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, value: Any) -> str:
        name = self.var("_k")
        self.ns[name] = value
        return name

    def resolve(self, node: Any) -> Any:
        if isinstance(node, str) and node in self.named:
            return self.named[node]
        if isinstance(node, dict) and node.get("type") in _PRIMITIVES:
            return node["type"]
        if isinstance(node, dict) and isinstance(node.get("type"), dict | list):
            return self.resolve(node["type"])
        return node

    def min_size(self, node: Any, seen: frozenset[str] = frozenset()) -> int:
        node = self.resolve(node)
        if isinstance(node, str):
            return {"null": 0, "float": 4, "double": 8}.get(node, 1)
        if isinstance(node, list):
            return 1
        kind = node["type"]
        if kind in ("record", "error"):
            if node["name"] in seen:
                return 1
            return sum(self.min_size(f["type"], seen | {node["name"]}) for f in node["fields"])
        if kind == "fixed":
            return int(node["size"])
        return 1

    # -- encoder -------------------------------------------------------------------------------
    def enc(self, node: Any, v: str, ind: str) -> list[str]:  # noqa: C901 - one case per Avro type
        node = self.resolve(node)
        o = "o"
        if isinstance(node, list):
            return self.enc_union(node, v, ind)
        kind = node if isinstance(node, str) else node["type"]
        if kind == "null":
            return [f"{ind}if {v} is not None: raise _U"]
        if kind == "boolean":
            return [f"{ind}if {v} is True: {o} += b'\\x01'", f"{ind}elif {v} is False: {o} += b'\\x00'",
                    f"{ind}else: raise _U"]
        if kind in ("int", "long"):
            bits = 31 if kind == "int" else 63
            return [f"{ind}if type({v}) is not int or not {-(2**bits)} <= {v} <= {2**bits - 1}: raise _U",
                    f"{ind}{o} += _S[{v} + 64] if -64 <= {v} < 64 else _zz({v})"]
        if kind in ("float", "double"):
            pack = "_pf" if kind == "float" else "_pd"
            t = self.var("t")
            return [f"{ind}{t} = type({v})", f"{ind}if {t} is not float and {t} is not int: raise _U",
                    f"{ind}{o} += {pack}({v})"]
        if kind in ("string", "bytes"):
            n, b = self.var("n"), self.var("b")
            lines = [f"{ind}if type({v}) is not {'str' if kind == 'string' else 'bytes'}: raise _U"]
            lines.append(f"{ind}{b} = {v}.encode()" if kind == "string" else f"{ind}{b} = {v}")
            return lines + [f"{ind}{n} = len({b})", f"{ind}{o} += _S[{n} + 64] if {n} < 64 else _zz({n})",
                            f"{ind}{o} += {b}"]
        if kind == "fixed":
            return [f"{ind}if type({v}) is not bytes or len({v}) != {int(node['size'])}: raise _U",
                    f"{ind}{o} += {v}"]
        if kind == "enum":
            table = self.const({s: _zigzag_bytes(i) for i, s in enumerate(node["symbols"])})
            x = self.var("e")
            return [f"{ind}if type({v}) is not str: raise _U", f"{ind}{x} = {table}.get({v})",
                    f"{ind}if {x} is None: raise _U", f"{ind}{o} += {x}"]
        if kind in ("array", "map"):
            x, k = self.var("x"), self.var("k")
            pytype = "list" if kind == "array" else "dict"
            lines = [f"{ind}if type({v}) is not {pytype}: raise _U", f"{ind}if {v}:",
                     f"{ind}    {o} += _zz(len({v}))"]
            if kind == "array":
                lines.append(f"{ind}    for {x} in {v}:")
            else:
                lines.append(f"{ind}    for {k}, {x} in {v}.items():")
                lines += self.enc("string", k, ind + "        ")
            lines += self.enc(node["items" if kind == "array" else "values"], x, ind + "        ")
            return lines + [f"{ind}{o} += b'\\x00'"]
        if kind in ("record", "error"):
            return [f"{ind}_enc_{self.record(node)}({v}, {o})"]
        raise Unsupported(f"type {kind!r}")

    def category(self, node: Any) -> str:
        node = self.resolve(node)
        kind = node if isinstance(node, str) else ("union" if isinstance(node, list) else node["type"])
        return {"null": "none", "boolean": "bool", "int": "int", "long": "int", "float": "float",
                "double": "float", "string": "str", "enum": "str", "bytes": "bytes", "fixed": "bytes",
                "array": "list", "map": "dict", "record": "dict", "error": "dict"}.get(kind, "?")

    def enc_union(self, branches: list[Any], v: str, ind: str) -> list[str]:
        cats = [self.category(b) for b in branches]
        if len(set(cats)) != len(cats) or "?" in cats:
            return [f"{ind}raise _U"]  # ambiguous by Python type: let fastavro pick the branch
        tests = {"none": f"{v} is None", "bool": f"{v} is True or {v} is False", "int": f"type({v}) is int",
                 "float": f"type({v}) is float", "str": f"type({v}) is str", "bytes": f"type({v}) is bytes",
                 "list": f"type({v}) is list", "dict": f"type({v}) is dict"}
        lines: list[str] = []
        for i, (branch, cat) in enumerate(zip(branches, cats, strict=True)):
            lines.append(f"{ind}{'if' if i == 0 else 'elif'} {tests[cat]}:")
            lines.append(f"{ind}    o += {_zigzag_bytes(i)!r}")
            lines += self.enc(branch, v, ind + "    ")
        return lines + [f"{ind}else: raise _U"]

    # -- decoder -------------------------------------------------------------------------------
    def read_long(self, x: str, ind: str) -> list[str]:
        c = self.var("c")
        return [f"{ind}{c} = b[p]", f"{ind}if {c} < 128: {x} = ({c} >> 1) ^ -({c} & 1); p += 1",
                f"{ind}else: {x}, p = _rl(b, p, e)"]

    def dec(self, node: Any, x: str, ind: str) -> list[str]:  # noqa: C901 - one case per Avro type
        node = self.resolve(node)
        if isinstance(node, list):
            i = self.var("i")
            lines = self.read_long(i, ind)
            for index, branch in enumerate(node):
                lines.append(f"{ind}{'if' if index == 0 else 'elif'} {i} == {index}:")
                lines += self.dec(branch, x, ind + "    ") or [f"{ind}    pass"]
            return lines + [f"{ind}else: raise _mal('union index %d outside 0..{len(node) - 1}' % {i})"]
        kind = node if isinstance(node, str) else node["type"]
        if kind == "null":
            return [f"{ind}{x} = None"]
        if kind == "boolean":
            c = self.var("c")
            return [f"{ind}{c} = b[p]; p += 1", f"{ind}if {c} > 1: raise _mal('boolean byte %d' % {c})",
                    f"{ind}{x} = {c} == 1"]
        if kind in ("int", "long"):
            return self.read_long(x, ind)
        if kind in ("float", "double"):
            size, unpack = (4, "_uf") if kind == "float" else (8, "_ud")
            return [f"{ind}if p + {size} > e: raise _tr('{kind}', {size}, e - p)",
                    f"{ind}{x} = {unpack}(b, p)[0]; p += {size}"]
        if kind in ("string", "bytes", "fixed"):
            n = self.var("n")
            lines = self.read_long(n, ind) if kind != "fixed" else [f"{ind}{n} = {int(node['size'])}"]
            lines.append(f"{ind}if {n} < 0 or p + {n} > e: raise _tr('{kind} length', {n}, e - p)")
            value = f"b[p:p + {n}].decode()" if kind == "string" else f"b[p:p + {n}]"
            return lines + [f"{ind}{x} = {value}; p += {n}"]
        if kind == "enum":
            i = self.var("i")
            symbols = self.const(tuple(node["symbols"]))
            return self.read_long(i, ind) + [
                f"{ind}if not 0 <= {i} < {len(node['symbols'])}: raise _mal('enum index %d' % {i})",
                f"{ind}{x} = {symbols}[{i}]"]
        if kind in ("array", "map"):
            item = node["items"] if kind == "array" else node["values"]
            n, y, k, z = self.var("n"), self.var("y"), self.var("k"), self.var("z")
            zero = kind == "array" and self.min_size(item) == 0
            lines = [f"{ind}{x} = {'[]' if kind == 'array' else '{}'}"]
            if zero:
                lines.append(f"{ind}{z} = _ZMAX")
            lines.append(f"{ind}while True:")
            lines += self.read_long(n, ind + "    ")
            lines += [f"{ind}    if {n} == 0: break", f"{ind}    if {n} < 0:", f"{ind}        {n} = -{n}"]
            lines += self.read_long(self.var("s"), ind + "        ")
            if zero:
                lines += [f"{ind}    {z} -= {n}",
                          f"{ind}    if {z} < 0: raise _tr('array of empty items', {n}, e - p)"]
            else:
                lines.append(f"{ind}    if {n} > e - p: raise _tr('{kind} block count', {n}, e - p)")
            lines.append(f"{ind}    for _ in range({n}):")
            if kind == "map":
                lines += self.dec("string", k, ind + "        ")
            lines += self.dec(item, y, ind + "        ")
            lines.append(f"{ind}        {x}.append({y})" if kind == "array" else f"{ind}        {x}[{k}] = {y}")
            return lines
        if kind in ("record", "error"):
            return [f"{ind}{x}, p = _dec_{self.record(node)}(b, p, e)"]
        raise Unsupported(f"type {kind!r}")

    # -- records -------------------------------------------------------------------------------
    def record(self, node: dict[str, Any]) -> str:
        name = node["name"]
        if name in self.done:
            return self.done[name]
        suffix = self.var("r")
        self.done[name] = suffix
        enc = [f"def _enc_{suffix}(v, o):", "    if type(v) is not dict: raise _U"]
        dec = [f"def _dec_{suffix}(b, p, e):"]
        names = []
        for field in node["fields"]:
            f = self.var("f")
            if "default" in field:
                enc.append(f"    {f} = v.get({field['name']!r}, {self.const(field['default'])})")
            else:
                enc.append(f"    {f} = v[{field['name']!r}]")
            enc += self.enc(field["type"], f, "    ")
            dec += self.dec(field["type"], f, "    ")
            names.append(f"{field['name']!r}: {f}")
        enc.append("    return None")
        dec.append(f"    return {{{', '.join(names)}}}, p")
        self.funcs += ["\n".join(enc), "\n".join(dec)]
        return suffix


def generate(parsed: Any) -> tuple[Encoder, Decoder] | None:
    """(encode(value, out), decode(buf, pos, end) -> (value, pos)) for a parsed schema, or None
    when the schema uses something not generated (the caller then uses fastavro)."""
    named = dict(parsed.get("__named_schemas", {})) if isinstance(parsed, dict) else {}
    gen = _Gen(named)
    try:
        root_enc = gen.enc(parsed, "v", "    ")
        root_dec = gen.dec(parsed, "x", "    ")
    except (Unsupported, KeyError, TypeError):
        return None
    source = "\n\n".join(
        [*gen.funcs, "def encode(v, o):\n" + "\n".join(root_enc) + "\n    return None",
         "def decode(b, p, e):\n" + "\n".join(root_dec) + "\n    return x, p"]
    )
    ns = dict(gen.ns)
    exec(compile(source, f"<avro codec {parsed.get('name', 'schema') if isinstance(parsed, dict) else ''}>",
                 "exec"), ns)  # noqa: S102 - source built above from a parsed schema, no user strings
    return ns["encode"], ns["decode"]
