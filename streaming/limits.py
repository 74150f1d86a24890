"""Bounds on hostile input shared by every worker: JSON depth/size, id lengths, record sizes.

Why one module: the stream workers, the serving worker and the publisher SDK all take records
from people they do not control. Each must turn any single bad record into that record's error
answer or dead letter, never into a crash, a wedge or unbounded memory (issue 12, item 0). The
limits live here so the numbers are the same everywhere and documented once (docs/SECURITY.md,
"Hostile input (workers)").

* :func:`bounded_json` parses JSON text only after checking its size and nesting depth, so a
  100k-deep ``[[[[...`` cannot raise RecursionError in the parser or anywhere downstream.
* :func:`check_id` caps the length of ids and keys (request ids, sensor ids, client ips, image ids).
* :func:`fit_record` cuts a record (answer or dead letter) so that value + key + headers fit the
  broker's limit with a margin, keeping a sha256 digest, the original sizes and the reason; it
  always cuts a key over MAX_DL_KEY_BYTES (:func:`cut_key`).
* MAX_KEY_BYTES bounds the key of every record the publisher sends (``Publisher._send``).
* :func:`broker_record_limit` asks the broker for the topic's real ``max.message.bytes`` and
  falls back to the configured ``max_record_bytes`` when the broker does not say.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from typing import Any

from schemas.ids import MAX_ID_CHARS as _SCHEMA_MAX_ID_CHARS
from streaming.exceptions import StreamingError

log = logging.getLogger(__name__)

#: Longest id or key (request_id, sensor_id, client_ip, image_id, event_id) in characters. Defined in
#: the schemas layer, whose validator refuses longer ids at publish (schemas/ids.py); one number.
MAX_ID_CHARS = _SCHEMA_MAX_ID_CHARS
#: Largest JSON text a request may carry (``event_json``), in bytes of UTF-8.
MAX_JSON_BYTES = 1_000_000
#: Deepest nesting of arrays/objects accepted in JSON text. Real events are 2 levels deep.
MAX_JSON_DEPTH = 32
#: Default broker record limit when the broker does not report one (noida-db refuses ~1 MiB).
DEFAULT_BROKER_LIMIT = 1_000_000
#: Bytes kept free under the broker limit for the record-batch framing and compression expansion.
MIN_MARGIN_BYTES = 16 * 1024
#: Per-header and per-record framing estimate (varints, attributes, lengths), generously rounded.
HEADER_OVERHEAD = 16
RECORD_OVERHEAD = 128
#: Longest dead-letter key kept as is; a longer key is cut and its digest kept in a header.
MAX_DL_KEY_BYTES = 1024
#: Longest Kafka key the publisher sends (``Publisher._send``; dead letters are cut instead, to
#: MAX_DL_KEY_BYTES). 1,024 = 4 * MAX_ID_CHARS: every id that passes the schemas' id check is at most
#: 4 UTF-8 bytes per character, so no valid record's key is refused, while a key can never crowd
#: out the value (1 KB of a ~1 MB record) nor cost the partitioner's murmur2 or the broker's
#: compaction more than a kilobyte. The same bound as a dead letter's key, so a dead letter of a
#: record we published keeps its key whole.
MAX_KEY_BYTES = 4 * MAX_ID_CHARS


class InputLimitError(StreamingError, ValueError):
    """A record exceeds a hostile-input bound (size, depth, id length); it is answered/dead-lettered."""


_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """Deepest array/object nesting of JSON ``text`` (strings are skipped), without recursion."""
    brackets = _NOT_BRACKET_RE.sub("", _STRING_RE.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: an object naming a key twice is refused (ValueError).

    Python's parser keeps the last value silently, other parsers the first: a proxy or a validator in
    front of us could check one value while we store the other, and a producer's bug stays hidden.
    Costs ~7 us per small event (json.loads 6 -> 13 us), next to ~120 us to publish one."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = ""
        for key, _ in pairs:
            if key in seen:
                dup = key
                break
            seen.add(key)
        raise ValueError(f"key {short(dup, 60)!r} appears more than once in one object; send each field once")
    return out


def bounded_json(text: Any, field: str, *, max_bytes: int = MAX_JSON_BYTES,
                 max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` after checking size and depth, with each object's keys unique
    (:func:`unique_keys`); InputLimitError (naming ``field``) otherwise.

    Raises ValueError subclasses only, so callers that already map ValueError to a per-record
    error need nothing new.
    """
    if not isinstance(text, str | bytes | bytearray):
        raise InputLimitError(f"{field}: expected JSON text, got {type(text).__name__}")
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "replace")
    size = len(text.encode("utf-8", "replace")) if len(text) * 4 > max_bytes else len(text)
    if size > max_bytes:
        raise InputLimitError(f"{field}: {size} bytes of JSON is over the limit of {max_bytes} bytes; "
                              "send a smaller event")
    depth = json_depth(text)
    if depth > max_depth:
        raise InputLimitError(f"{field}: JSON nested {depth} levels deep, over the limit of {max_depth}; "
                              "send a flat raw event object")
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except RecursionError as exc:  # belt and braces: the depth scan should have refused it
        raise InputLimitError(f"{field}: JSON nested too deeply") from exc
    except (TypeError, ValueError) as exc:
        raise InputLimitError(f"{field}: not valid JSON ({str(exc)[:200]})") from exc


def check_id(value: Any, field: str, max_chars: int = MAX_ID_CHARS) -> str:
    """``value`` as a string, refused (InputLimitError naming ``field``) when longer than ``max_chars``."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > max_chars:
        raise InputLimitError(f"{field}: {len(text)} characters, over the limit of {max_chars}; "
                              "use a shorter id")
    return text


def short(text: str, max_chars: int = 120) -> str:
    """``text`` cut for an error message or a log line (ids of hostile length must not flood logs)."""
    return text if len(text) <= max_chars else f"{text[:max_chars]}...({len(text)} chars)"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def headers_size(headers: list[tuple[str, bytes]] | None) -> int:
    return sum(len(k.encode()) + len(v) + HEADER_OVERHEAD for k, v in headers or [])


def effective_limit(broker_limit: int) -> int:
    """The bytes a record may take: the broker's limit less a margin (2%, at least 16 KiB)."""
    return broker_limit - max(MIN_MARGIN_BYTES, broker_limit // 50)


def record_size(value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]] | None) -> int:
    """Estimated bytes of one record on the wire: value + key + headers + framing."""
    return len(value or b"") + len(key or b"") + headers_size(headers) + RECORD_OVERHEAD


def cut_key(key: bytes | None, headers: list[tuple[str, bytes]]) -> bytes | None:
    """``key`` cut to MAX_DL_KEY_BYTES; when cut, its sha256 and size are appended to ``headers``
    (``dl.key_sha256``, ``dl.key_bytes``), so the original can still be found and compared."""
    if key is not None and len(key) > MAX_DL_KEY_BYTES:
        headers += [("dl.key_sha256", digest(key).encode()), ("dl.key_bytes", str(len(key)).encode())]
        return key[:MAX_DL_KEY_BYTES]
    return key


def fit_record(value: bytes, key: bytes | None, headers: list[tuple[str, bytes]] | None, *,
               broker_limit: int, reason: str = "over the broker's record limit"
               ) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """Cut a record so that it fits ``broker_limit`` with the margin; returns (value, key, headers).

    A key over MAX_DL_KEY_BYTES is always cut (:func:`cut_key`), whatever the record's size: a dead
    letter keeps a foreign producer's hostile key only as its head and digest, never as a key that
    the publisher itself would refuse (MAX_KEY_BYTES). A record that fits (with its whole key) keeps
    its value and headers; the two key headers (~130 bytes) then come out of the margin. Otherwise
    header values are cut to 2000 bytes and the value is cut to what is left, with ``dl.truncated``
    (original size, for compatibility), ``dl.value_sha256``, ``dl.value_bytes`` and ``dl.cut_reason``.
    """
    headers = list(headers or [])
    budget = effective_limit(broker_limit)
    if record_size(value, key, headers) <= budget:
        return value, cut_key(key, headers), headers
    key = cut_key(key, headers)
    headers = [(k, v if len(v) <= 2000 else v[:2000]) for k, v in headers]
    extra = [("dl.truncated", str(len(value)).encode()), ("dl.value_sha256", digest(value).encode()),
             ("dl.value_bytes", str(len(value)).encode()), ("dl.cut_reason", reason[:200].encode())]
    headers += extra
    room = budget - record_size(b"", key, headers)
    if room < 0:  # absurd header load: keep only the reason headers
        headers = headers[-len(extra):] + [h for h in headers if h[0] in ("dl.stage", "dl.error_class")]
        room = max(0, budget - record_size(b"", key, headers))
    return value[:room], key, headers


class BrokerLimits:
    """The broker's record size limit per topic, asked once per topic (bounded cache).

    noida-db reports no ``max.message.bytes``; then the configured ``fallback`` is used. Apache
    Kafka reports the topic's value (a per-topic override or the broker's ``message.max.bytes``).
    """

    def __init__(self, bootstrap: str, fallback: int = DEFAULT_BROKER_LIMIT, capacity: int = 256, *,
                 security: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.security = security or {}  # streaming.kafka_security kwargs (SASL/TLS)
        self.fallback = fallback
        self.capacity = capacity
        self._cache: dict[str, int] = {}
        self._lock = threading.Lock()

    def limit(self, topic: str) -> int:
        with self._lock:
            hit = self._cache.get(topic)
        if hit is not None:
            return hit
        value = self._ask(topic)
        with self._lock:
            if len(self._cache) >= self.capacity:
                self._cache.pop(next(iter(self._cache)))
            self._cache[topic] = value
        return value

    def _ask(self, topic: str) -> int:
        try:
            from kafka import KafkaAdminClient
            from kafka.admin import ConfigResource, ConfigResourceType

            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000, **self.security)
            try:
                res = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            finally:
                admin.close()
            entry = _find_config(res, "max.message.bytes")
            if entry is not None and int(entry) > 0:
                return int(entry)  # the broker's word wins over the configured guess
        except Exception as exc:  # an old or minimal broker: the configured limit applies
            log.debug("max.message.bytes of %s unknown (%s); using %d", topic, exc, self.fallback)
        return self.fallback


def _find_config(obj: Any, name: str) -> str | None:
    """Find ``name``'s value in kafka-python's describe_configs answer (nested dicts or lists)."""
    if isinstance(obj, dict):
        if name in obj:
            hit = obj[name]
            return str(hit.get("value")) if isinstance(hit, dict) else str(hit)
        for v in obj.values():
            found = _find_config(v, name)
            if found is not None:
                return found
    elif isinstance(obj, list | tuple):
        for v in obj:
            found = _find_config(v, name)
            if found is not None:
                return found
    return None
