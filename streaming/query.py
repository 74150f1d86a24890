"""Queries over the columnar store: feature rows and predictions, one bounded page at a time.

The engine behind ``GET /query`` (the control API) and ``streamlearn query``; both call
:func:`query_features` / :func:`query_predictions` and turn the errors into answers:
:class:`QueryError` is a bad argument (HTTP 400, the message names it), :class:`QueryTooLargeError`
a request over a configured bound (HTTP 413, the message names the setting and what to narrow).

How a page is found (docs/COLUMNAR.md, "Queries"):

1. the files come from the partition's ``_manifest.json`` (never a directory listing, so a crashed
   compaction's leftovers are never read), pruned by the manifest's min/max time of each file, the
   cursor, and for a ``batch`` filter by the file's lineage;
2. pass one reads only the ordering columns ``(time, topic, partition, offset)`` with the filters
   pushed down to the Parquet row groups (pyarrow.dataset), keeping the first ``limit + 1`` keys
   after the cursor; files are visited by their minimum time, a file's row groups in order (each file
   is sorted by time), and the scan stops at the first file or row group that starts after the page;
3. pass two reads the full rows between the cursor and the page's last key.

Order is ``(time, topic, partition, offset)``, unique per row, so pages never repeat or skip a row.
The cursor is that last key plus a digest of the query, signed with a key kept under the columnar
directory: a cursor altered or taken from another query is refused. Time ranges are half-open:
``start_ms <= t < end_ms``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from streaming.columnar import CompactReport, compact_all
from streaming.columnar_format import (
    FEATURE_SCHEMA,
    PREDICTION_SCHEMA,
    check_name,
    columnar_root,
    features_dir,
    load_manifest,
    predictions_dir,
)
from streaming.config import Settings, env_name
from streaming.exceptions import ColumnarChangedError, QueryError, QueryTooLargeError
from streaming.fsutil import create_atomic
from streaming.query_json import page_bytes, table_rows

__all__ = ["ARROW_STREAM", "PARQUET", "CompactReport", "QueryError", "QueryLimits", "QueryPage", "QueryTooLargeError",
           "compact_all", "query_features", "query_predictions"]

#: Media types of :meth:`QueryPage.to_arrow_ipc` and :meth:`QueryPage.to_parquet` (for ``Accept`` negotiation).
ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
_MAX_TEXT = 1000  # longest key / batch id / request id accepted as a filter
_CURSOR_VERSION = 1


@dataclass(frozen=True)
class QueryLimits:
    """Bounds of one request: rows per page, Parquet rows scanned, Arrow bytes held, seconds spent."""

    max_rows: int
    max_scan_rows: int
    max_bytes: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> QueryLimits:
        return cls(max_rows=settings.query_max_rows, max_scan_rows=settings.query_max_scan_rows,
                   max_bytes=settings.query_max_bytes, timeout_s=settings.query_timeout_s)


@dataclass
class QueryPage:
    """One page of a query: its rows, the cursor of the next page (None on the last) and how many
    Parquet rows were scanned to find it."""

    table: pa.Table
    next_cursor: str | None
    scanned_rows: int

    def to_json(self) -> dict[str, Any]:
        """``{"rows": [...], "count": n, "next_cursor": ...}``; maps become objects, NaN/inf become null."""
        rows = table_rows(self.table)
        return {"rows": rows, "count": len(rows), "next_cursor": self.next_cursor}

    def to_json_bytes(self) -> bytes:
        """:meth:`to_json` encoded as UTF-8 JSON, what ``GET /query`` answers (column-wise, one encoder
        call: ``streaming/query_json.py``)."""
        return page_bytes(table_rows(self.table), self.next_cursor)

    def to_arrow_ipc(self) -> bytes:
        """The rows as an Arrow IPC stream (media type ``application/vnd.apache.arrow.stream``)."""
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)
        return sink.getvalue()

    def to_parquet(self) -> bytes:
        """The rows as one Parquet file."""
        sink = io.BytesIO()
        pq.write_table(self.table, sink, compression="zstd")
        return sink.getvalue()


# ---- arguments -----------------------------------------------------------------------------------
def _name(what: str, value: Any) -> str:
    return check_name(what, value, QueryError)


def _text(what: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT or "\x00" in value:
        raise QueryError(f"{what}: must be a non-empty string of at most {_MAX_TEXT} characters, got {value!r:.80}")
    return value


def _int(what: str, value: Any, minimum: int = -(2**62), maximum: int = 2**62) -> int | None:
    """An integer argument within bounds the int64 (or int32) column it is compared with can hold."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise QueryError(f"{what}: must be an integer, got {value!r:.80}")
    if value < minimum:
        raise QueryError(f"{what}: must be >= {minimum}, got {value}")
    if value > maximum:
        raise QueryError(f"{what}: must be <= {maximum}, got {value}")
    return value


def _check_common(start_ms: Any, end_ms: Any, limit: Any, limits: QueryLimits) -> None:
    _int("start_ms", start_ms)
    _int("end_ms", end_ms)
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise QueryError(f"start_ms/end_ms: the range is half-open [start_ms, end_ms) and must not be empty; got "
                         f"start_ms={start_ms} end_ms={end_ms}")
    _int("limit", limit, 1)
    if limit > limits.max_rows:
        raise QueryTooLargeError(
            f"limit: {limit} rows is over query_max_rows ({limits.max_rows}, env {env_name('query_max_rows')}); ask "
            f"for at most {limits.max_rows} rows per page and follow next_cursor", "query_max_rows")


# ---- cursor --------------------------------------------------------------------------------------
def _secret(settings: Settings) -> bytes:
    """The key that signs cursors: 32 random bytes under the columnar directory, created once."""
    path = columnar_root(settings) / ".cursor_key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        create_atomic(path, os.urandom(32))  # two first queries at once: one wins, both read its key
        return path.read_bytes()


def _scope(query: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cursor(secret: bytes, scope: str, key: tuple[int, str, int, int]) -> str:
    payload = json.dumps([_CURSOR_VERSION, scope, *key], separators=(",", ":")).encode()
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:16]
    return f"{_b64(payload)}.{_b64(mac)}"


def decode_cursor(secret: bytes, scope: str, cursor: str) -> tuple[int, str, int, int]:
    """The last key of the previous page; QueryError when the cursor was altered or is another query's."""
    bad = QueryError("cursor: not a cursor of this query (altered, truncated, or from a query with other "
                     "filters); repeat the query without cursor to start from the first page")
    if not isinstance(cursor, str) or len(cursor) > 2000 or cursor.count(".") != 1:
        raise bad
    try:
        payload_text, mac_text = cursor.split(".")
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except ValueError:
        raise bad from None
    if not hmac.compare_digest(hmac.new(secret, payload, hashlib.sha256).digest()[:16], mac):
        raise bad
    try:
        version, their_scope, t, topic, partition, offset = json.loads(payload)
    except ValueError:
        raise bad from None
    if version != _CURSOR_VERSION or their_scope != scope:
        raise bad
    return int(t), str(topic), int(partition), int(offset)


# ---- the scan ------------------------------------------------------------------------------------
def _after(tcol: str, key: tuple[int, str, int, int]) -> ds.Expression:
    """Rows strictly after ``key`` in (time, topic, partition, offset) order (``t >= key_t`` first: pushdown)."""
    t, topic, partition, offset = key
    f = ds.field
    tie = (f("topic") > topic) | ((f("topic") == topic) & ((f("partition") > partition) |
                                                          ((f("partition") == partition) & (f("offset") > offset))))
    return (f(tcol) >= t) & ((f(tcol) > t) | ((f(tcol) == t) & tie))


def _at_or_before(tcol: str, key: tuple[int, str, int, int]) -> ds.Expression:
    t, topic, partition, offset = key
    f = ds.field
    tie = (f("topic") < topic) | ((f("topic") == topic) & ((f("partition") < partition) |
                                                          ((f("partition") == partition) & (f("offset") <= offset))))
    return (f(tcol) <= t) & ((f(tcol) < t) | ((f(tcol) == t) & tie))


@dataclass
class _Plan:
    directory: Path
    files: list[dict[str, Any]]  # manifest entries, pruned
    tcol: str
    filter: ds.Expression | None
    constants: dict[str, str]
    columns: list[str]


def _too_slow(deadline: float, limits: QueryLimits) -> None:
    if time.monotonic() > deadline:
        raise QueryTooLargeError(
            f"query ran over query_timeout_s ({limits.timeout_s} s, env {env_name('query_timeout_s')}); narrow the "
            "time range or filter by key/batch (request_id/version for predictions)", "query_timeout_s")


def _run(plan: _Plan, limit: int, after: tuple[int, str, int, int] | None, limits: QueryLimits,
         secret: bytes, scope: str) -> QueryPage:
    deadline = time.monotonic() + limits.timeout_s
    order = [(plan.tcol, "ascending"), ("topic", "ascending"), ("partition", "ascending"), ("offset", "ascending")]
    key_cols = [plan.tcol, "topic", "partition", "offset"]
    base = plan.filter
    if after is not None:
        base = _after(plan.tcol, after) if base is None else base & _after(plan.tcol, after)
    files = sorted(plan.files, key=lambda e: (e["tmin"], e["path"]))
    best: pa.Table | None = None  # the first limit + 1 keys seen so far, sorted
    used: list[str] = []
    scanned = 0
    for entry in files:
        if best is not None and best.num_rows > limit and entry["tmin"] > best[plan.tcol][limit].as_py():
            break  # files are visited by their first time: none later can hold a key of this page
        _too_slow(deadline, limits)
        path = plan.directory / entry["path"]
        if not path.exists():
            raise ColumnarChangedError(
                f"columnar file {path} is listed in its manifest but missing (a compaction rebuilt the copy "
                f"meanwhile: repeat the query); if it stays missing, delete {plan.directory} and run "
                "`streamlearn store compact` to rebuild it")
        dataset = ds.dataset(str(path), format="parquet")
        # Row groups left after pushdown, in file order = time order (files are sorted by time): read them one
        # by one and stop once the page is full and the next group starts after it.
        groups = [g for frag in dataset.get_fragments(filter=base) for g in frag.split_by_row_group(filter=base)]
        contributed = False
        for group in groups:
            if best is not None and best.num_rows > limit and _min_time(group, plan.tcol, -1) > best[plan.tcol][
                    limit].as_py():
                break
            _too_slow(deadline, limits)
            rows = sum(rg.num_rows for rg in group.row_groups)
            if scanned + rows > limits.max_scan_rows:
                raise QueryTooLargeError(
                    f"query would scan more than query_max_scan_rows ({limits.max_scan_rows} rows, env "
                    f"{env_name('query_max_scan_rows')}); narrow the time range (start_ms/end_ms) or filter by "
                    "key/batch (request_id/version for predictions)", "query_max_scan_rows")
            scanned += rows
            keys = group.to_table(columns=key_cols, filter=base)
            if keys.num_rows:
                contributed = True
                best = keys if best is None else pa.concat_tables([best, keys])
                best = best.take(pc.sort_indices(best, sort_keys=order)[: limit + 1])
        if contributed:
            used.append(entry["path"])
    if best is None or best.num_rows == 0:
        return QueryPage(_empty(plan), None, scanned)
    more = best.num_rows > limit
    last_row = best.slice(min(limit, best.num_rows) - 1, 1).to_pylist()[0]
    last = (int(last_row[plan.tcol]), str(last_row["topic"]), int(last_row["partition"]), int(last_row["offset"]))
    page_filter = _at_or_before(plan.tcol, last) if base is None else base & _at_or_before(plan.tcol, last)
    parts: list[pa.Table] = []
    held = 0
    for rel in used:
        _too_slow(deadline, limits)
        part = ds.dataset(str(plan.directory / rel), format="parquet").to_table(columns=plan.columns,
                                                                                filter=page_filter)
        held += part.nbytes
        if held > limits.max_bytes:
            raise QueryTooLargeError(
                f"page would hold more than query_max_bytes ({limits.max_bytes} bytes, env "
                f"{env_name('query_max_bytes')}); ask for fewer rows (limit) per page", "query_max_bytes")
        parts.append(part)
    table = pa.concat_tables(parts)
    table = table.take(pc.sort_indices(table, sort_keys=order))
    table = _with_constants(table, plan)
    return QueryPage(table, encode_cursor(secret, scope, last) if more else None, scanned)


def _min_time(group: Any, tcol: str, default: int) -> int:
    """The smallest time of a row-group fragment from its Parquet statistics (``default`` when absent)."""
    try:
        return int(group.row_groups[0].statistics[tcol]["min"])
    except (IndexError, KeyError, TypeError, ValueError):
        return default


def _with_constants(table: pa.Table, plan: _Plan) -> pa.Table:
    for i, (name, value) in enumerate(plan.constants.items()):
        table = table.add_column(i, name, pa.array([value] * table.num_rows, pa.string()))
    return table


def _empty(plan: _Plan) -> pa.Table:
    schema = FEATURE_SCHEMA if plan.tcol == "event_time_ms" else PREDICTION_SCHEMA
    return _with_constants(schema.empty_table().select(plan.columns), plan)


def _time_pruned(files: list[dict[str, Any]], lo: str, hi: str, start_ms: int | None, end_ms: int | None,
                 after: tuple[int, str, int, int] | None) -> list[dict[str, Any]]:
    out = []
    for e in files:
        tmin, tmax = int(e[lo]), int(e[hi])
        if (start_ms is not None and tmax < start_ms) or (end_ms is not None and tmin >= end_ms):
            continue
        if after is not None and tmax < after[0]:
            continue
        out.append({**e, "tmin": tmin})
    return out


def _time_filter(tcol: str, start_ms: int | None, end_ms: int | None) -> list[ds.Expression]:
    out = []
    if start_ms is not None:
        out.append(ds.field(tcol) >= start_ms)
    if end_ms is not None:
        out.append(ds.field(tcol) < end_ms)
    return out


def _and(parts: list[ds.Expression]) -> ds.Expression | None:
    if not parts:
        return None
    expr = parts[0]
    for p in parts[1:]:
        expr = expr & p
    return expr


FEATURE_COLUMNS = ["key", "event_time_ms", "topic", "partition", "offset", "batch_id", "featurizer_version",
                   "labels", "x"]
PREDICTION_COLUMNS = ["model_version", "request_id", "request_time_ms", "answer_time_ms", "outputs",
                      "predicted_label", "latency_ms", "error", "input_topic", "input_partition", "input_offset",
                      "topic", "partition", "offset"]


def query_features(settings: Settings, *, kind: str, namespace: str = "live", start_ms: int | None = None,
                   end_ms: int | None = None, key: str | None = None, batch: str | None = None,
                   limit: int = 1000, cursor: str | None = None, limits: QueryLimits | None = None) -> QueryPage:
    """Feature rows of ``kind`` in ``namespace`` with ``start_ms <= event_time_ms < end_ms``, optionally of
    one ``key`` or one source ``batch`` id, ordered by (event_time_ms, topic, partition, offset); at most
    ``limit`` rows, the rest behind ``next_cursor``. Reads only what ``streamlearn store compact`` wrote."""
    limits = limits or QueryLimits.from_settings(settings)
    _name("kind", kind)
    _name("namespace", namespace)
    _text("key", key)
    _text("batch", batch)
    _check_common(start_ms, end_ms, limit, limits)
    query = {"what": "features", "kind": kind, "namespace": namespace, "start_ms": start_ms, "end_ms": end_ms,
             "key": key, "batch": batch}
    secret, scope = _secret(settings), _scope(query)
    after = decode_cursor(secret, scope, cursor) if cursor is not None else None
    directory = features_dir(columnar_root(settings), namespace, kind)
    files = load_manifest(directory)["files"]
    if batch is not None:  # lineage prunes: only files that batch contributed to
        files = [e for e in files if any(s["batch_id"] == batch for s in e["sources"])]
    filters = _time_filter("event_time_ms", start_ms, end_ms)
    if key is not None:
        filters.append(ds.field("key") == key)
    if batch is not None:
        filters.append(ds.field("batch_id") == batch)
    plan = _Plan(directory, _time_pruned(files, "event_time_min_ms", "event_time_max_ms", start_ms, end_ms, after),
                 "event_time_ms", _and(filters), {"namespace": namespace, "kind": kind}, FEATURE_COLUMNS)
    return _run(plan, limit, after, limits, secret, scope)


def query_predictions(settings: Settings, *, model: str, version: int | None = None, start_ms: int | None = None,
                      end_ms: int | None = None, request_id: str | None = None, limit: int = 1000,
                      cursor: str | None = None, limits: QueryLimits | None = None) -> QueryPage:
    """Answers of ``model`` with ``start_ms <= answer_time_ms < end_ms`` (the time the answer was
    published), optionally of one model ``version`` or one ``request_id``, ordered by (answer_time_ms,
    topic, partition, offset); paged like :func:`query_features`."""
    limits = limits or QueryLimits.from_settings(settings)
    _name("model", model)
    _int("version", version, 0, 2**31 - 1)
    _text("request_id", request_id)
    _check_common(start_ms, end_ms, limit, limits)
    query = {"what": "predictions", "model": model, "version": version, "start_ms": start_ms, "end_ms": end_ms,
             "request_id": request_id}
    secret, scope = _secret(settings), _scope(query)
    after = decode_cursor(secret, scope, cursor) if cursor is not None else None
    directory = predictions_dir(columnar_root(settings), model)
    files = load_manifest(directory)["files"]
    filters = _time_filter("answer_time_ms", start_ms, end_ms)
    if version is not None:
        filters.append(ds.field("model_version") == version)
    if request_id is not None:
        filters.append(ds.field("request_id") == request_id)
    plan = _Plan(directory, _time_pruned(files, "answer_time_min_ms", "answer_time_max_ms", start_ms, end_ms, after),
                 "answer_time_ms", _and(filters), {"model": model}, PREDICTION_COLUMNS)
    return _run(plan, limit, after, limits, secret, scope)
