"""Avro schema compatibility, following the reader/writer resolution rules of the Avro spec.

Why our own checker: fastavro resolves schemas while decoding but has no "can this reader read
that writer" check, and the registry must refuse an incompatible schema *before* any data is
written with it. Every message names the offending field so the person evolving a schema knows
what to change, e.g. ``reader field 'unit' of SensorReading has no default and is missing from the
writer schema`` or ``field 'value' type changed from double to string``.

Modes (Confluent names): BACKWARD = the new schema can read data written with the old one;
FORWARD = the old schema can read data written with the new one; FULL = both; ``*_TRANSITIVE``
checks every earlier version instead of only the latest; NONE checks nothing.
"""

from __future__ import annotations

from typing import Any

import fastavro

from schemas.catalog import schema_to_dict
from schemas.exceptions import InvalidCompatibilityLevelError, InvalidSchemaError

LEVELS: tuple[str, ...] = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
DEFAULT_LEVEL = "BACKWARD"

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
#: writer type -> reader types that may read it (besides itself).
_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}


def normalize_level(level: str) -> str:
    """Upper-case ``level`` and check it is a known mode; raises InvalidCompatibilityLevelError."""
    value = str(level).strip().upper()
    if value not in LEVELS:
        raise InvalidCompatibilityLevelError(
            f"level: unknown compatibility level {level!r}; use one of {', '.join(LEVELS)}"
        )
    return value


class ParsedSchema:
    """A parsed schema plus its table of named types, so string references can be resolved."""

    def __init__(self, schema: Any) -> None:
        self.named: dict[str, Any] = {}
        try:
            self.root = fastavro.parse_schema(schema_to_dict(schema), named_schemas=self.named)
        except InvalidSchemaError:
            raise
        except Exception as exc:
            raise InvalidSchemaError(f"schema: not a valid Avro schema: {exc}") from exc

    def resolve(self, node: Any) -> Any:
        """Replace a named-type reference by its definition; unwrap ``{"type": "long"}`` forms."""
        while True:
            if isinstance(node, str):
                if node in _PRIMITIVES:
                    return node
                if node in self.named:
                    node = self.named[node]
                    continue
                return node
            if isinstance(node, dict) and not isinstance(node.get("type"), str | type(None)):
                return node
            if isinstance(node, dict) and node.get("type") in _PRIMITIVES:
                return node["type"]
            return node


def _kind(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return "union"
    return str(node.get("type"))


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def type_label(sch: ParsedSchema, node: Any, depth: int = 0) -> str:
    """Human name of a type for messages: ``double``, ``SensorReading``, ``array<float>``..."""
    node = sch.resolve(node)
    kind = _kind(node)
    if kind in _PRIMITIVES:
        return kind
    if kind == "union":
        return "union[" + ", ".join(type_label(sch, b, depth + 1) for b in node) + "]"
    if kind in ("record", "enum", "fixed", "error"):
        return _short(node["name"])
    if depth > 3:
        return kind
    if kind == "array":
        return f"array<{type_label(sch, node['items'], depth + 1)}>"
    if kind == "map":
        return f"map<{type_label(sch, node['values'], depth + 1)}>"
    return kind


def _node_key(node: Any) -> Any:
    """A resolved schema node as a memo key: a named type by its name, a primitive by itself, any other
    node (array, map, union) by identity (the parsed schemas live as long as the check)."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict) and "name" in node:
        return ("named", node["name"])
    return ("node", id(node))


class _Checker:
    """Collects the reasons ``reader`` cannot read data written with ``writer``.

    ``reader_is_new`` only orients messages: type changes are always told as "from old to new".
    """

    def __init__(self, reader: ParsedSchema, writer: ParsedSchema, reader_is_new: bool) -> None:
        self.r = reader
        self.w = writer
        self.reader_is_new = reader_is_new
        self.errors: list[str] = []
        self._seen: set[tuple[str, str]] = set()
        #: readable() answers by (reader node, writer node), shared with every sub-checker of one check.
        #: Why: each union branch re-checked its whole subtree, so records nested in unions cost
        #: exponentially (a 3 KB schema of 12 levels blocked the registry for minutes).
        self._memo: dict[tuple[Any, Any], bool] = {}

    def changed(self, path: str, rnode: Any, wnode: Any) -> None:
        old, new = (type_label(self.w, wnode), type_label(self.r, rnode))
        if not self.reader_is_new:
            old, new = new, old
        where = f"field '{path}'" if path else "schema"
        self.errors.append(f"{where} type changed from {old} to {new}")

    def readable(self, rnode: Any, wnode: Any) -> bool:
        """Whether the reader type can read the writer type, without recording errors."""
        key = (_node_key(self.r.resolve(rnode)), _node_key(self.w.resolve(wnode)))
        known = self._memo.get(key)
        if known is not None:
            return known
        sub = _Checker(self.r, self.w, self.reader_is_new)
        sub._seen = set(self._seen)
        sub._memo = self._memo
        sub.check(rnode, wnode, "")
        self._memo[key] = not sub.errors
        return not sub.errors

    def check(self, rnode: Any, wnode: Any, path: str) -> None:
        rnode, wnode = self.r.resolve(rnode), self.w.resolve(wnode)
        rk, wk = _kind(rnode), _kind(wnode)
        if wk == "union":
            bad = [b for b in wnode if not self._reader_accepts(rnode, b)]
            if bad:
                self.changed(path, rnode, wnode)
            return
        if rk == "union":
            if not self._reader_accepts(rnode, wnode):
                self.changed(path, rnode, wnode)
            return
        if rk in _PRIMITIVES or wk in _PRIMITIVES:
            if not (rk == wk or rk in _PROMOTIONS.get(wk, ())):
                self.changed(path, rnode, wnode)
            return
        if rk != wk:
            self.changed(path, rnode, wnode)
            return
        if rk in ("record", "enum", "fixed", "error") and not self._names_match(rnode, wnode):
            self.changed(path, rnode, wnode)
            return
        if rk in ("record", "error"):
            self._record(rnode, wnode, path)
        elif rk == "enum":
            self._enum(rnode, wnode, path)
        elif rk == "fixed":
            if rnode.get("size") != wnode.get("size"):
                old, new = wnode.get("size"), rnode.get("size")
                if not self.reader_is_new:
                    old, new = new, old
                where = f"field '{path}'" if path else "schema"
                self.errors.append(f"{where} fixed {_short(rnode['name'])} size changed from {old} to {new}")
        elif rk == "array":
            self.check(rnode["items"], wnode["items"], f"{path}[]" if path else "[]")
        elif rk == "map":
            self.check(rnode["values"], wnode["values"], f"{path}{{}}" if path else "{}")

    def _reader_accepts(self, rnode: Any, wbranch: Any) -> bool:
        rnode = self.r.resolve(rnode)
        branches = rnode if isinstance(rnode, list) else [rnode]
        return any(self.readable(b, wbranch) for b in branches)

    @staticmethod
    def _names_match(rnode: dict[str, Any], wnode: dict[str, Any]) -> bool:
        rname, wname = rnode["name"], wnode["name"]
        if rname == wname or _short(rname) == _short(wname):
            return True
        aliases = rnode.get("aliases") or []
        return wname in aliases or _short(wname) in {_short(a) for a in aliases}

    def _record(self, rnode: dict[str, Any], wnode: dict[str, Any], path: str) -> None:
        key = (rnode["name"], wnode["name"])
        if key in self._seen:  # recursive type: already being checked higher up
            return
        self._seen.add(key)
        # Only the reader's aliases count (the Avro spec, Java Avro, Confluent and fastavro's decoder): a
        # writer field's aliases let a rename pass here that the decoder then could not read.
        wfields = {f["name"]: f for f in wnode.get("fields", [])}
        for rf in rnode.get("fields", []):
            name = rf["name"]
            fpath = f"{path}.{name}" if path else name
            wf = wfields.get(name)
            if wf is None:
                for alias in rf.get("aliases") or []:
                    wf = wfields.get(alias)
                    if wf is not None:
                        break
            if wf is None:
                if "default" not in rf:
                    self.errors.append(
                        f"reader field '{fpath}' of {_short(rnode['name'])} has no default "
                        f"and is missing from the writer schema"
                    )
                continue
            self.check(rf["type"], wf["type"], fpath)
        self._seen.discard(key)

    def _enum(self, rnode: dict[str, Any], wnode: dict[str, Any], path: str) -> None:
        if "default" in rnode:
            return
        rsyms = set(rnode.get("symbols", []))
        missing = [s for s in wnode.get("symbols", []) if s not in rsyms]
        if missing:
            where = f"field '{path}'" if path else "schema"
            self.errors.append(
                f"{where} enum {_short(rnode['name'])} has no symbol(s) {', '.join(missing)} "
                f"of the writer schema and no default"
            )


def reader_errors(reader: Any, writer: Any, *, reader_is_new: bool = True) -> list[str]:
    """Why ``reader`` cannot read data written with ``writer``; empty when it can."""
    checker = _Checker(ParsedSchema(reader), ParsedSchema(writer), reader_is_new)
    checker.check(checker.r.root, checker.w.root, "")
    return list(dict.fromkeys(checker.errors))


def check_compatibility(level: str, new: Any, previous: list[Any]) -> list[str]:
    """Reasons ``new`` breaks ``level`` against ``previous`` (oldest first); empty = compatible."""
    mode = normalize_level(level)
    if mode == "NONE" or not previous:
        ParsedSchema(new)  # still reject an invalid schema
        return []
    targets = previous if mode.endswith("_TRANSITIVE") else previous[-1:]
    errors: list[str] = []
    for old in reversed(targets):
        if mode.startswith(("BACKWARD", "FULL")):
            errors += reader_errors(new, old, reader_is_new=True)
        if mode.startswith(("FORWARD", "FULL")):
            errors += reader_errors(old, new, reader_is_new=False)
    return list(dict.fromkeys(errors))
