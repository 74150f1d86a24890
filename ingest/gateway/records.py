"""Request bodies of the ingest gateway -> validated event records, one :class:`Item` per record.

Why the gateway reuses the file sources' parsers (``ingest.weblog.parse_json``,
``ingest.sensors.validate``, ``ingest.images.inspect``): an event must be acceptable or not
regardless of how it arrived, so there is one definition of a valid event. Schema validation then
happens once more when the publisher encodes the record (``Publisher.encode``).

Nothing here touches Kafka; every function is pure apart from the registry lookups of Avro bodies,
so it is tested without a broker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ingest import images, sensors, weblog
from ingest.exceptions import InputRejectedError, SensorValidationError
from ingest.gateway.errors import BadRequestError, RecordRejectedError
from schemas.catalog import load_schema
from schemas.exceptions import RecordValidationError, RegistryUnavailableError, SchemaError
from schemas.registry import SchemaRegistry
from schemas.serde import AvroDeserializer, unframe
from streaming import eventtime, topics
from streaming.clock import now_ms
from streaming.config import ConfigError
from streaming.eventtime import UNITS, EventTimePolicy, TimestampReader
from streaming.exceptions import EventTimeError
from streaming.image_formats import halved
from streaming.limits import MAX_ID_CHARS, MAX_JSON_BYTES, MAX_JSON_DEPTH, unique_keys
from streaming.topics import KINDS

JSON_TYPES = frozenset({"application/json", "text/json", ""})
AVRO_TYPES = frozenset({"application/vnd.streamlearn.avro", "application/octet-stream"})
#: ``source`` written into events that arrive through the gateway (lineage).
SOURCE = "gateway"

_IMAGE_FIELDS = {"image_id", "timestamp", "content_type", "width", "height", "data", "label", "source"}
_SENSOR_FIELDS = {"sensor_id", "timestamp", "value", "values", "unit", "label", "event_id"}


@dataclass
class Item:
    """One record of a request and what became of it."""

    index: int
    #: What is dead-lettered when the record is rejected: the body's bytes, or the JSON element
    #: (serialized only when needed, because almost every element is accepted).
    source: bytes | Any
    record: dict[str, Any] | None = None
    key: str | None = None  # idempotency key (the event's id)
    error: BaseException | str | None = None
    status: str = "pending"  # accepted | duplicate | rejected
    retryable: bool = False  # rejected because Kafka did not ack: resend
    meta: dict[str, Any] = field(default_factory=dict)  # topic, partition, offset
    journal_error: str = ""  # sent, but the gateway's journal could not be made durable: not accepted

    @property
    def original(self) -> bytes:
        if isinstance(self.source, bytes):
            return self.source
        try:
            return json.dumps(self.source, ensure_ascii=False).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError, RecursionError):
            return repr(self.source).encode("utf-8", "backslashreplace")

    def reject(self, error: BaseException | str) -> None:
        self.error, self.status, self.record = error, "rejected", None

    def reason_fields(self) -> dict[str, str]:
        """``reason`` (the first problem) and, when there are several, ``reasons`` (all, value first)."""
        out: dict[str, str] = {}
        if isinstance(self.error, RecordValidationError):  # its .reason is a sentence: the sources' code
            return {"reason": "schema"}
        reason = getattr(self.error, "reason", None)
        if isinstance(reason, str):
            out["reason"] = reason
            reasons = getattr(self.error, "reasons", None)
            if isinstance(reasons, list) and len(reasons) > 1:
                out["reasons"] = ",".join(str(r) for r in reasons)
        return out

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "status": self.status}
        if self.key is not None:
            # Cut to the id limit, as the error text is: a 15 MB id was echoed whole, so a small request
            # pinned a 15 MB answer outside the body budget.
            out["id"] = self.key[:MAX_ID_CHARS]
            if len(self.key) > MAX_ID_CHARS:
                out["id_chars"] = len(self.key)
        if self.error is not None:
            out["error"] = describe(self.error)
            out.update(self.reason_fields())
        if self.retryable:
            out["retryable"] = True
        out.update(self.meta)
        return out


def describe(error: BaseException | str) -> str:
    """A short reason text for responses and dead-letter headers."""
    if isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"[:1000]


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json`` (lowercase, no parameters)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(mtype: str) -> bool:
    return mtype in JSON_TYPES or (mtype.startswith("application/") and mtype.endswith("+json"))


# -- JSON -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimeRules:
    """How the gateway reads and accepts event times (docs/EVENT_TIME.md).

    Numeric timestamps are in one declared ``unit`` (epoch ms by default, setting
    ``ingest_timestamp_unit``); ``auto`` is not offered here, because one client's first request
    must not decide the unit for every other client. ISO 8601 text is always accepted. The
    window is the shared :class:`~streaming.eventtime.EventTimePolicy` (5 minutes of future skew).
    """

    policy: EventTimePolicy = field(default_factory=EventTimePolicy)
    unit: str = "ms"

    def __post_init__(self) -> None:
        if self.unit not in UNITS or self.unit == "auto":
            raise ConfigError(f"setting 'ingest_timestamp_unit' (env STREAMLEARN_INGEST_TIMESTAMP_UNIT, flag "
                              f"--timestamp-unit) must be one of s|ms|us|ns|iso, got {self.unit!r}")

    @classmethod
    def from_settings(cls, settings: Any, *, backfill: bool | None = None, max_age: str | None = None,
                      timezone: str | None = None) -> TimeRules:
        return cls(eventtime.policy(settings, backfill=backfill, max_age=max_age, source="gateway",
                                    timezone=timezone), settings.ingest_timestamp_unit)

    def reader(self) -> TimestampReader:
        return self.policy.reader(self.unit, flag="ingest_timestamp_unit (env STREAMLEARN_INGEST_TIMESTAMP_UNIT)")

    def read(self, value: Any) -> int:
        """One timestamp -> epoch ms (RecordRejectedError with the reason when unreadable)."""
        try:
            return self.reader()(value)
        except EventTimeError as exc:
            raise _rejected(exc) from exc

    def check(self, ts: int) -> int:
        try:
            return self.policy.check(ts)
        except EventTimeError as exc:
            raise _rejected(exc) from exc


def _no_booleans(obj: dict[str, Any], fields: tuple[str, ...]) -> None:
    """JSON ``true`` is not the number 1: refuse booleans where a number is expected."""
    for name in fields:
        value = obj.get(name)
        nested = value.values() if isinstance(value, dict) else [value]
        if any(isinstance(v, bool) for v in nested):
            raise RecordRejectedError(f"{name} holds a boolean; send a number")


LIVE_RULES = TimeRules()


def _rejected(exc: EventTimeError) -> InputRejectedError:
    return InputRejectedError(str(exc), exc.reason)


def _canonical(obj: dict[str, Any]) -> str:
    """The event as one line of canonical JSON: the derived event_id hashes it, so it does not depend on
    key order or whitespace, and the same event posted twice dedupes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _weblog(obj: dict[str, Any], rules: TimeRules, bounded: bool = False) -> dict[str, Any]:
    """``bounded``: the body's size and depth already imply the per-event bounds of ``bounded_json``
    (:func:`parse_json_body`), so the event is read as parsed, and turned into text only when an id is
    derived from it; otherwise it goes through the file source's text path, bounds checked there."""
    _no_booleans(obj, ("latency_ms", "status", "bytes_sent"))
    if bounded:
        return weblog.parse_object(obj, lambda: _canonical(obj), source=SOURCE, read_time=rules.reader(),
                                   policy=rules.policy)
    return weblog.parse_json(_canonical(obj), source=SOURCE, read_time=rules.reader(), policy=rules.policy)


def _sensor(obj: dict[str, Any], rules: TimeRules) -> dict[str, Any]:
    unknown = sorted(set(obj) - _SENSOR_FIELDS)
    if unknown:
        raise RecordRejectedError(f"unknown sensor field(s) {unknown}; put further channels in 'values' "
                                  f"(allowed: {sorted(_SENSOR_FIELDS)})")
    _no_booleans(obj, ("value", "values"))
    record = dict(obj)
    found = []
    if "timestamp" in record:
        try:
            record["timestamp"] = rules.reader()(record["timestamp"])
        except EventTimeError as exc:
            found.append(SensorValidationError(str(exc), exc.reason))
            del record["timestamp"]
    for optional in ("values", "label", "event_id"):
        record.setdefault(optional, {} if optional == "values" else None)
    return sensors.validate(record, policy=rules.policy, problems=found)


def _image(obj: dict[str, Any], rules: TimeRules) -> dict[str, Any]:
    unknown = sorted(set(obj) - _IMAGE_FIELDS)
    if unknown:
        raise RecordRejectedError(f"unknown image field(s) {unknown}; allowed: {sorted(_IMAGE_FIELDS)}")
    encoded = obj.get("data")
    if not isinstance(encoded, str) or not encoded:
        raise RecordRejectedError("data must be the image file encoded as a base64 string")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordRejectedError(f"data is not valid base64 ({exc}); encode the file with standard base64") \
            from exc
    # A still BMP, TIFF, GIF, WebP, ICO, netpbm, AVIF or HEIC is published as PNG; one over a Kafka record
    # (a phone photo) scaled down by halves (streaming/image_formats.py: shrink_to_fit).
    published, info = images.accept(data)
    scaled = published is not data  # converted or scaled: a declared size may be the original's
    data = published
    for name, actual in (("content_type", info.content_type), ("width", info.width), ("height", info.height)):
        declared = obj.get(name)
        if scaled and name != "content_type" and _halved_to(declared, actual):
            continue  # the original's size, which the gateway halved to fit the record
        if declared is not None and declared != actual:
            raise RecordRejectedError(f"{name} {declared!r:.40} does not match the image bytes ({actual!r}); "
                                      f"leave {name} out and the gateway reads it from the image")
    label, source = obj.get("label"), obj.get("source")
    timestamp = rules.check(rules.read(obj["timestamp"])) if obj.get("timestamp") is not None else now_ms()
    record = images.image_record(data, info, label=label, source=source or SOURCE, timestamp=timestamp)
    if obj.get("image_id") is not None:
        record["image_id"] = obj["image_id"]
    return record


def _halved_to(declared: Any, actual: Any) -> bool:
    """Whether ``declared`` is a side that :func:`~streaming.image_formats.shrink_to_fit` halved to ``actual``."""
    return isinstance(declared, int) and not isinstance(declared, bool) and declared > 0 \
        and any(halved(declared, k) == actual for k in range(1, 11))


_BUILDERS = {"weblog": _weblog, "sensor": _sensor, "image": _image}


def event_key(kind: str, record: dict[str, Any]) -> str:
    """The idempotency key of an event (``streaming.topics.event_key``; see the gateway module
    docstring); an event without one is rejected."""
    key = topics.event_key(kind, record)
    if key is None:
        raise RecordRejectedError(f"a {kind} event needs an id ({'image_id' if kind == 'image' else 'event_id'})")
    return key


#: Errors that mean "this record is bad" (dead-letter it); anything else is a gateway bug.
RECORD_ERRORS: tuple[type[BaseException], ...] = (
    InputRejectedError, RecordRejectedError, SchemaError, ValueError, TypeError, KeyError, OverflowError,
)


def record_item(kind: str, index: int, obj: Any, rules: TimeRules | None = None, *, bounded: bool = False) -> Item:
    """One JSON value of a body -> an :class:`Item`, rejected with the reason when it is not valid.
    ``bounded``: see :func:`parse_json_body`."""
    item = Item(index, obj)
    if not isinstance(obj, dict):
        item.reject(RecordRejectedError(f"element {index} is a {type(obj).__name__}; each event must be "
                                        "a JSON object"))
        return item
    try:
        if kind == "weblog":
            item.record = _weblog(obj, rules or LIVE_RULES, bounded)
        else:
            item.record = _BUILDERS[kind](obj, rules or LIVE_RULES)
        item.key = event_key(kind, item.record)
    except RECORD_ERRORS as exc:
        item.reject(exc)
    return item


def _reject_constant(name: str) -> float:
    # NaN/Infinity are not JSON; keep them as floats so per-record validation names the field.
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


#: How many times longer an event's canonical JSON can be than its text in a body: a number is
#: re-written by ``repr`` ("1e15" -> "1000000000000000.0", 4.5x, the most); strings, keys and
#: literals never grow (an escape is never shorter than what it stands for), and whitespace is dropped.
MAX_REENCODE_GROWTH = 5
#: A number with an exponent outside a string: the only token ``repr`` can write longer than it came
#: (every value follows ``:``, ``,`` or ``[``). Matches inside strings too, which only costs the fast path.
_EXPONENT_NUMBER = re.compile(rb"[:,\[]\s*-?[0-9]+(?:\.[0-9]+)?[eE]")


def events_within_line_bounds(body: bytes, depth: int | None) -> bool:
    """Whether every event of ``body`` surely passes one JSON line's bounds (``bounded_json``: depth and
    size of its canonical text), so it need not be turned back into text to check them. ``depth``: the
    body's nesting from ``scan_json``; None when unknown."""
    if depth is None or depth > MAX_JSON_DEPTH:
        return False
    if len(body) * MAX_REENCODE_GROWTH <= MAX_JSON_BYTES:
        return True
    return len(body) <= MAX_JSON_BYTES and _EXPONENT_NUMBER.search(body) is None


def parse_json_body(kind: str, body: bytes, max_records: int, rules: TimeRules | None = None, *,
                    depth: int | None = None) -> list[Item]:
    """A JSON object (one event) or array (a batch) -> items. Raises BadRequestError for the body.

    ``depth``: the body's nesting, when the caller scanned it (``scan_json``). Each event must pass the
    bounds one line of a file source passes (``streaming.limits.bounded_json``: 1 MB of JSON, 32 levels);
    where the body's own size and depth imply them, events skip the text round trip that checks them."""
    if not body.strip():
        raise BadRequestError("request body is empty; send a JSON object or a JSON array of objects")
    try:
        value = json.loads(body, parse_constant=_reject_constant, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise BadRequestError(f"request body is not valid UTF-8 JSON ({type(exc).__name__}: {exc}); "
                              "send a JSON object or a JSON array of objects") from exc
    bounded = events_within_line_bounds(body, depth)
    if isinstance(value, dict):
        return [record_item(kind, 0, value, rules, bounded=bounded)]
    if not isinstance(value, list):
        raise BadRequestError(f"request body is a JSON {type(value).__name__}; send a JSON object "
                              "(one event) or a JSON array of objects (a batch)")
    if not value:
        raise BadRequestError("request body is an empty JSON array; send at least one event")
    if len(value) > max_records:
        raise BadRequestError(f"batch of {len(value)} events is over the limit of {max_records} per request; "
                              "split it")
    return [record_item(kind, i, obj, rules, bounded=bounded) for i, obj in enumerate(value)]


# -- Avro -----------------------------------------------------------------------------------------
class AvroBodies:
    """Decodes Confluent-framed single-record bodies into records of a kind's built-in schema."""

    def __init__(self, registry: SchemaRegistry, rules: TimeRules | None = None) -> None:
        self.registry = registry
        self.rules = rules or LIVE_RULES
        self._readers = {kind: AvroDeserializer(registry, load_schema(name)) for kind, name in KINDS.items()}

    def item(self, kind: str, body: bytes) -> Item:
        """Decode ``body`` (raises RegistryUnavailableError: that is retried, never dead-lettered)."""
        item = Item(0, body)
        try:
            schema_id, _ = unframe(body)
            writer = json.loads(self.registry.get_schema(schema_id))
            name = writer.get("name", "") if isinstance(writer, dict) else ""
            if name.rsplit(".", 1)[-1] != KINDS[kind]:
                raise RecordRejectedError(f"Avro record of schema id {schema_id} is a "
                                          f"{name or 'non-record'}, not a {KINDS[kind]}; "
                                          "post it to the route of its kind")
            record = dict(self._readers[kind](body).value)
            item.record = _validate_decoded(kind, record, self.rules)
            item.key = event_key(kind, item.record)
        except RegistryUnavailableError:
            raise
        except RECORD_ERRORS as exc:
            item.reject(exc)
        return item


def _validate_decoded(kind: str, record: dict[str, Any], rules: TimeRules) -> dict[str, Any]:
    """The domain checks the JSON path runs, for a record that arrived already Avro-typed."""
    if kind == "sensor":
        return sensors.validate(record, policy=rules.policy)
    rules.check(record["timestamp"])
    if kind == "image":
        info = images.inspect(record["data"])
        if (info.content_type, info.width, info.height) != (record["content_type"], record["width"],
                                                            record["height"]):
            raise RecordRejectedError(f"content_type/width/height {record['content_type']} "
                                      f"{record['width']}x{record['height']} do not match the image bytes "
                                      f"({info.content_type} {info.width}x{info.height})")
        return record
    return weblog.usable(record)  # what the JSON path checks in parse_object: fields the features can use


# -- multipart images -----------------------------------------------------------------------------
def image_file_item(index: int, filename: str | None, data: bytes, *, label: str | None,
                    timestamp: int, rules: TimeRules | None = None) -> Item:
    """One uploaded file -> an ImageEvent item (rejected on bad magic, dimensions, truncation...)."""
    item = Item(index, data)
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1][:200]
    try:
        # The extension is checked against the content only when the client sent one.
        (rules or LIVE_RULES).check(timestamp)
        published, info = images.accept(data, name if "." in name else None)  # BMP, TIFF, GIF... -> PNG
        source = f"{SOURCE}:{name}" if name else SOURCE
        item.record = images.image_record(published, info, label=label, source=source, timestamp=timestamp)
        item.key = event_key("image", item.record)
    except RECORD_ERRORS as exc:
        item.reject(exc)
    return item


def fingerprint(content_type: str, body: bytes) -> str:
    """What an Idempotency-Key is bound to: a replay with another body is a client error."""
    digest = hashlib.sha256(content_type.encode())
    digest.update(b"\x00")
    digest.update(body)
    return digest.hexdigest()
