"""Parsers of web-server access logs into ``WebLogEvent`` dicts (schemas/WebLogEvent.avsc).

Two input shapes, auto-detected per line:

* The Apache/Nginx **combined** log format, ``%h %l %u %t "%r" %>s %b "%{Referer}i"
  "%{User-agent}i"``, and its **common** subset (no referrer/agent). Extra quoted fields after
  the user agent (e.g. nginx's ``"$http_x_forwarded_for"``) are ignored. An optional trailing
  request time is read as latency: an integer is Apache's ``%D`` (microseconds), a number with a
  decimal point is nginx's ``$request_time`` (seconds). Fields after it (``$upstream_response_time``,
  ``rt=... uct="..."`` timings, Apache ``combinedio``'s ``%I %O``) are ignored; when such fields follow,
  only a number with a decimal point is read as the latency. Real logs contain a user agent cut off
  without its closing quote (the shared 10,000-line sample has one); it is accepted as is.
  Apache's **vhost_combined** (``%v:%p`` first, Debian's default for virtual hosts) is read too; the
  virtual host is not kept, as the schema has no field for it and no feature uses it.
* **JSON** objects, one per line (nginx ``escape=json`` formats, app servers). Field names of
  the schema are accepted, plus the usual nginx/Apache aliases (see :data:`_JSON_ALIASES`).
  Timestamps: CLF or ISO 8601 text, or epoch numbers in ONE unit per file or stream (a
  :class:`~streaming.eventtime.TimestampReader`: ``--timestamp-unit``, epoch ms by default).

``event_id`` is stable: sha1 of ``source`` and the byte position of the line when the caller
knows it (file sources: replaying the same file position gives the same id, which is what the
tailer's dedupe relies on), else sha1 of ``source`` and the line content.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ingest.exceptions import InputRejectedError, LogParseError
from streaming.eventtime import EventTimePolicy, TimestampReader
from streaming.exceptions import EventTimeError, FeatureValidationError
from streaming.features.weblog import request_fields
from streaming.limits import bounded_json

_Q = r'"((?:[^"\\]|\\.)*)"'
_COMBINED = re.compile(  # no "^": match() anchors it, at 0 or past a vhost_combined prefix
    r"(\S+) (\S+) (\S+) \[([^\]]+)\] " + _Q + r" (\d{3}) (\d+|-)"
    r'(?: "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)"?(?: "(?:[^"\\]|\\.)*")*)?'
    r"(?: (\d+(?:\.\d+)?))?\s*$"
)
#: Fields after the request time (nginx's ``$upstream_response_time``: "0.005 0.004", "0.005 -";
#: ``rt=0.005 uct="0.001"`` timings; Apache ``combinedio``'s ``%I %O``), tried only when a line does not
#: match :data:`_COMBINED`. The user agent's closing quote is required here (a cut-off agent would let
#: the fields start at any space in it: quadratic); a field starts with a plain character and may hold
#: ``"quoted"`` parts (``uct="0.001"``), so a referrer/agent pair is never taken for such fields; the
#: repetitions are possessive, so a broken line fails in linear time.
_COMBINED_MORE = re.compile(
    r"(\S+) (\S+) (\S+) \[([^\]]+)\] " + _Q + r" (\d{3}) (\d+|-)"
    r'(?: "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)"(?: "(?:[^"\\]|\\.)*")*+)?'
    r"(?: (\d+(?:\.\d+)?))?"
    r'((?:\s+[^\s"](?:[^\s"]|"[^"]*+")*+)++)\s*$'
)
#: Apache's ``vhost_combined`` (Debian/Ubuntu's other_vhosts_access.log): ``%v:%p`` (always with the
#: port) before the combined fields. Tried only when a line does not match :data:`_COMBINED`, so plain
#: logs pay nothing for it; the port is required, and a shifted client of ``-`` refused, so a plain line
#: that failed for another reason (a user name with a space) is never read one field to the left.
_VHOST = re.compile(r"^\S+:\d{1,5} (?=\S+ \S+ \S+ \[)")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, 1)}
_METHOD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")

#: JSON key aliases, per schema field, first match wins. A dotted alias is a path into nested objects
#: (or a flattened key of that name): Caddy (``request.method``), Google Cloud load balancers
#: (``httpRequest.requestMethod``), Elastic Common Schema as Filebeat writes it (``http.request.method``,
#: ``source.ip``) and Traefik (``RequestMethod``) access logs were dead-lettered line by line before.
_JSON_ALIASES: dict[str, tuple[str, ...]] = {
    "client_ip": ("client_ip", "remote_addr", "clientip", "client", "ip", "host", "request.client_ip",
                  "request.remote_ip", "httpRequest.remoteIp", "source.ip", "client.ip", "source.address",
                  "ClientHost"),
    "ident": ("ident",),
    "user": ("user", "remote_user", "auth", "user_id", "user.name", "ClientUsername"),
    "timestamp": ("timestamp", "time", "@timestamp", "time_iso8601", "time_local", "ts", "StartUTC"),
    "method": ("method", "request_method", "verb", "request.method", "httpRequest.requestMethod",
               "http.request.method", "RequestMethod"),
    "path": ("path", "request_uri", "uri", "url", "request.uri", "httpRequest.requestUrl", "url.original",
             "url.path", "RequestPath"),
    "protocol": ("protocol", "server_protocol", "httpversion", "request.proto", "httpRequest.protocol",
                 "RequestProtocol"),
    "status": ("status", "response", "status_code", "httpRequest.status", "http.response.status_code",
               "DownstreamStatus"),
    "bytes_sent": ("bytes_sent", "body_bytes_sent", "bytes", "size", "response_bytes", "httpRequest.responseSize",
                   "http.response.body.bytes", "DownstreamContentSize"),
    "referrer": ("referrer", "http_referer", "referer", "request.headers.Referer", "httpRequest.referer",
                 "http.request.referrer", "request_Referer"),
    "user_agent": ("user_agent", "http_user_agent", "agent", "useragent", "request.headers.User-Agent",
                   "httpRequest.userAgent", "user_agent.original", "request_User-Agent"),
    "label": ("label",),
    "event_id": ("event_id", "request_id", "id"),
}

#: Latency fields of JSON logs and the factor to milliseconds, first match wins. A string value may end
#: in its unit, as Google Cloud writes it (``"0.0123s"``).
_JSON_LATENCY: tuple[tuple[str, float], ...] = (
    ("latency_ms", 1.0), ("duration_ms", 1.0), ("request_time", 1000.0),
    ("duration", 1000.0),  # Caddy: seconds
    ("httpRequest.latency", 1000.0),  # "0.0123s"
    ("event.duration", 1e-6), ("Duration", 1e-6),  # ECS and Traefik: nanoseconds
)


def event_id_for(source: str, position: int | None, content: str | bytes) -> str:
    """Stable id: sha1 of source and byte position when known, else of source and content."""
    h = hashlib.sha1(source.encode("utf-8", "backslashreplace"))
    h.update(b"\x00")
    if position is not None:
        h.update(b"@%d" % position)
    else:
        h.update(content.encode("utf-8", "backslashreplace") if isinstance(content, str) else content)
    return h.hexdigest()


def parse_clf_time(text: str) -> int:
    """``17/May/2015:10:05:03 +0000`` -> epoch milliseconds (UTC).

    Hand-rolled rather than ``strptime`` because it runs once per line on the hot path
    (about 5x faster) and because ``%b`` would follow the process locale.
    """
    try:
        day = int(text[0:2])
        month = _MONTHS[text[3:6]]
        year = int(text[7:11])
        hour, minute, second = int(text[12:14]), int(text[15:17]), int(text[18:20])
        if text[2] != "/" or text[6] != "/" or text[11] != ":" or text[20] != " ":
            raise ValueError(text)
        tz = text[21:]
        sign = -1 if tz[0] == "-" else 1
        if tz[0] not in "+-" or len(tz) != 5:
            raise ValueError(tz)
        offset = sign * (int(tz[1:3]) * 3600 + int(tz[3:5]) * 60)
        # Zone offsets on Earth run from -12:00 to +14:00; "+9900" was read as 99 hours.
        if not (1 <= day <= 31 and hour < 24 and minute < 60 and second < 61 and int(tz[3:5]) < 60
                and int(tz[1:3]) <= 14):
            raise ValueError(text)
        # 31/Feb used to be read as 3 Mar (timegm carries days over): a date that does not exist is refused.
        month_days = calendar.monthrange(year, month)[1] if day > 28 else 31
    except (ValueError, KeyError, IndexError) as exc:
        raise LogParseError(
            f"timestamp [{text}] is not 'dd/Mon/yyyy:HH:MM:SS +zzzz'; fix the log format", "bad_timestamp"
        ) from exc
    if day > month_days:
        raise LogParseError(f"timestamp [{text}] names day {day} of a month of {month_days} days; fix the log",
                            "bad_timestamp")
    return (calendar.timegm((year, month, day, hour, minute, second)) - offset) * 1000


def _unescape(s: str) -> str:
    if "\\" not in s:
        return s
    return s.replace('\\"', '"').replace("\\\\", "\\")


def _dash(s: str | None) -> str | None:
    return None if s is None or s == "-" or s == "" else s


def _split_request(request: str) -> tuple[str, str, str | None]:
    if request == "-" or request == "":
        # Apache logs '-' for connections closed before a request line (408s). Kept as an
        # event: such connections are exactly what attack detection wants to see.
        return "-", "-", None
    parts = request.split(" ")
    if len(parts) == 3 and _METHOD.match(parts[0]):
        return parts[0], parts[1], parts[2]
    if len(parts) == 2 and _METHOD.match(parts[0]):
        return parts[0], parts[1], None
    if len(parts) > 3 and _METHOD.match(parts[0]) and parts[-1].startswith("HTTP/"):
        return parts[0], " ".join(parts[1:-1]), parts[-1]
    # Anything else the server logged as the request line: a TLS handshake sent to the plain-HTTP port
    # (Apache writes "\x16\x03\x01..."), a binary probe, a line of junk, answered 400 or 408. Kept as an
    # event, as the 408s above and as Logstash's COMBINEDAPACHELOG keeps it (``rawrequest``): the log
    # line is well-formed, and internet-facing logs hold a few percent of these, which a bot or attack
    # model needs to see. No method could be read: "-"; the path is the request text as the server wrote it.
    return "-", request, None


def _match(line: str, pattern: re.Pattern[str]) -> re.Match[str] | None:
    """``pattern`` at the start of ``line``, or past a ``vhost_combined`` prefix (see :data:`_VHOST`)."""
    m = pattern.match(line)
    if m is None:
        vhost = _VHOST.match(line)
        if vhost is not None:
            m = pattern.match(line, vhost.end())
            if m is not None and m.group(1) == "-":
                m = None
    return m


def parse_combined(
    line: str, *, source: str, position: int | None = None, event_id: str | None = None
) -> dict[str, Any]:
    """One combined/common log line -> WebLogEvent dict. Raises :class:`LogParseError`."""
    m = _match(line, _COMBINED) or _match(line, _COMBINED_MORE)
    if m is None:
        raise LogParseError(f"line is not in the combined/common log format: {line[:120]!r}", "not_combined_format")
    host, ident, user, ts, request, status, size, referrer, agent, rt = m.groups()[:10]
    method, path, protocol = _split_request(_unescape(request))
    latency: float | None = None
    if rt is not None and (m.re is _COMBINED or "." in rt):
        # With more fields after it only a decimal number is known to be a time (nginx's
        # $request_time, seconds); an integer there may be combinedio's %I (bytes): no latency.
        latency = float(rt) * 1000.0 if "." in rt else int(rt) / 1000.0
    return {
        "event_id": event_id or event_id_for(source, position, line),
        "client_ip": host,
        "ident": _dash(ident),
        "user": _dash(user),
        "timestamp": parse_clf_time(ts),
        "method": method,
        "path": path,
        "protocol": protocol,
        "status": int(status),
        "bytes_sent": 0 if size == "-" else int(size),
        "referrer": _dash(_unescape(referrer)) if referrer is not None else None,
        "user_agent": _dash(_unescape(agent)) if agent is not None else None,
        "latency_ms": latency,
        "label": None,
        "source": source,
    }


def _lookup(obj: dict[str, Any], key: str) -> Any:
    """``obj[key]``, or for a dotted key the value at that path through nested objects; a list holding
    one value (Caddy's headers) gives that value; an object is no value (``url`` in ECS is one)."""
    value = obj.get(key)
    if value is None and "." in key:
        value = obj
        for part in key.split("."):
            if not isinstance(value, dict):
                return None
            value = value.get(part)
    if isinstance(value, list):
        value = value[0] if value and not isinstance(value[0], dict | list) else None
    return None if isinstance(value, dict) else value


def _pick(obj: dict[str, Any], field: str) -> Any:
    for key in _JSON_ALIASES[field]:
        value = _lookup(obj, key)
        if value is not None:
            return value
    return None


def _request_target(url: str) -> str:
    """The path and query of an absolute URL (Google Cloud logs ``requestUrl`` whole); others unchanged,
    so a JSON log's path is what a combined log's request line holds."""
    if not url.startswith(("http://", "https://")):
        return url
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _whole(value: Any) -> int:
    """An integer field of a JSON log line: an int, a float with no fraction (``200.0``) or a string of
    digits. ``int()`` cut ``200.7`` to 200 and ``12.9`` bytes to 12 without a word."""
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def _json_latency(obj: dict[str, Any]) -> float | None:
    """Latency in ms from the first latency field present (ValueError/TypeError when it is no number)."""
    for key, factor in _JSON_LATENCY:
        value = _lookup(obj, key)
        if value is None:
            continue
        if isinstance(value, str) and value.endswith("s") and key == "httpRequest.latency":
            value = value[:-1]
        return float(value) * factor
    return None


#: Numeric JSON timestamps without a declared unit: epoch ms (the gateway's and SDK's unit).
_DEFAULT_READER = TimestampReader("ms")


def _json_time(value: Any, reader: TimestampReader | None = None) -> int:
    """A JSON log timestamp: CLF text, ISO 8601 text, or an epoch number in the reader's unit
    (one unit per file or stream, see :mod:`streaming.eventtime`; never guessed per line)."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) >= 26 and text[2] == "/" and text[6] == "/":
            return parse_clf_time(text)
    try:
        return (reader or _DEFAULT_READER)(value)
    except EventTimeError as exc:
        raise LogParseError(str(exc), exc.reason) from exc


def _opt_str(obj: dict[str, Any], field: str) -> str | None:
    value = _pick(obj, field)
    return _dash(str(value)) if value is not None else None


def parse_json(line: str, *, source: str, position: int | None = None, event_id: str | None = None,
               read_time: TimestampReader | None = None, policy: EventTimePolicy | None = None) -> dict[str, Any]:
    """One JSON log object -> WebLogEvent dict. Raises :class:`LogParseError` with every problem of
    the fields (``reasons``, value problems first) and, given a ``policy``, the event-time window."""
    try:
        obj = bounded_json(line, "line")  # size and depth first: a 100k-deep line must not raise RecursionError
    except ValueError as exc:
        raise LogParseError(f"line is not valid JSON: {exc}", "bad_json") from exc
    if not isinstance(obj, dict):
        raise LogParseError("JSON log line must be an object", "bad_json")
    return parse_object(obj, lambda: line, source=source, position=position, event_id=event_id,
                        read_time=read_time, policy=policy)


def parse_object(obj: dict[str, Any], text: Callable[[], str], *, source: str, position: int | None = None,
                 event_id: str | None = None, read_time: TimestampReader | None = None,
                 policy: EventTimePolicy | None = None) -> dict[str, Any]:
    """:func:`parse_json` of an object already parsed, within the bounds ``bounded_json`` checks.

    Why apart: the HTTP gateway parses a whole batch body once; going back to text per event (dump,
    then parse again) cost about a fifth of its CPU. ``text()`` is the line the derived ``event_id``
    hashes; it is called only for an event that names no id of its own."""
    client_ip = _pick(obj, "client_ip")
    if client_ip is None:
        raise LogParseError("JSON log line has no client address (client_ip / remote_addr)", "missing_field")
    ts = _pick(obj, "timestamp")
    if ts is None:
        raise LogParseError("JSON log line has no timestamp (timestamp / time / @timestamp)", "missing_field")
    method, path, protocol = _pick(obj, "method"), _pick(obj, "path"), _pick(obj, "protocol")
    if method is None or path is None:
        request = obj.get("request")
        if not isinstance(request, str):
            raise LogParseError("JSON log line needs 'request' or 'method' + 'path'", "missing_field")
        method, path, protocol = _split_request(request)
    # Every problem of the fields below is collected; value problems (latency, size) first.
    values: list[LogParseError] = []
    others: list[LogParseError] = []
    size = _pick(obj, "bytes_sent")
    bytes_sent = 0
    try:
        bytes_sent = 0 if size in (None, "-", "") else _whole(size)
    except (TypeError, ValueError):
        values.append(LogParseError(f"bytes_sent {size!r:.40} must be an integer or '-'", "bad_bytes"))
    latency: float | None = None
    try:
        latency = _json_latency(obj)
    except (TypeError, ValueError):
        names = " / ".join(k for k, _ in _JSON_LATENCY)
        values.append(LogParseError(f"latency ({names}) must be a number", "bad_latency"))
    if latency is not None and not math.isfinite(latency):
        values.append(LogParseError(f"latency {latency!r} is not finite", "bad_latency"))
    status = _pick(obj, "status")
    status_i = 0
    try:
        status_i = _whole(status)
        if isinstance(status, bool) or not 100 <= status_i <= 999:
            raise ValueError(status)
    except (TypeError, ValueError):
        others.append(LogParseError(f"status {status!r:.40} must be an HTTP status code 100-999", "bad_status"))
    timestamp = 0
    try:
        timestamp = _json_time(ts, read_time)
        if policy is not None:
            others.extend(LogParseError(str(p), p.reason) for p in policy.problems(timestamp))
    except LogParseError as exc:
        others.append(exc)
    if values or others:
        raise LogParseError.combine(values + others)
    label = _opt_str(obj, "label")
    supplied_id = _pick(obj, "event_id")
    return usable({
        "event_id": str(supplied_id) if supplied_id is not None else event_id or event_id_for(source, position, text()),
        "client_ip": str(client_ip),
        "ident": _opt_str(obj, "ident"),
        "user": _opt_str(obj, "user"),
        "timestamp": timestamp,
        "method": str(method),
        "path": _request_target(str(path)),
        "protocol": _dash(str(protocol)) if protocol is not None else None,
        "status": status_i,
        "bytes_sent": bytes_sent,
        "referrer": _opt_str(obj, "referrer"),
        "user_agent": _opt_str(obj, "user_agent"),
        "latency_ms": latency,
        "label": label,
        "source": source,
    })


def parse_line(
    line: str | bytes, *, source: str, position: int | None = None, event_id: str | None = None,
    read_time: TimestampReader | None = None, policy: EventTimePolicy | None = None,
) -> dict[str, Any]:
    """Auto-detect the shape of one log line (JSON when it starts with ``{``) and parse it.

    ``line`` may carry its trailing newline. Bytes are decoded as UTF-8 with invalid bytes kept
    as ``\\xNN`` escapes (the way Apache itself escapes them), so no input byte is lost.
    ``event_id``, when given, is used instead of computing one (a JSON line's own id still wins).
    """
    text = line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line
    # A byte-order mark (a log saved by a Windows editor) is not part of the client address; left in,
    # it became client_ip "\ufeff10.0.0.1" and made a first JSON line "not JSON".
    text = text.rstrip("\r\n").removeprefix("\ufeff")
    stripped = text.lstrip()
    if not stripped:
        raise LogParseError("line is empty", "empty")
    try:
        if stripped.startswith("{"):
            return parse_json(stripped, source=source, position=position, event_id=event_id, read_time=read_time,
                              policy=policy)
        return check_time(usable(parse_combined(text, source=source, position=position, event_id=event_id)), policy)
    except InputRejectedError:
        raise
    except (ValueError, OverflowError) as exc:
        # A number the parsers' own checks let through: 400 digits of latency (int too large to convert to
        # float), 5,000 digits of bytes (Python's int-digit limit), a JSON 1e400 (float infinity to int).
        # Uncaught, one such line crashed `ingest weblog` at every restart; it is one line's dead letter.
        raise LogParseError(f"a number in the line is out of range ({type(exc).__name__}: {str(exc)[:120]})",
                            "bad_number") from exc


#: The reason code of a field the features cannot use (:func:`usable`).
_FIELD_REASONS = {"bytes_sent": "bad_bytes", "latency_ms": "bad_latency", "status": "bad_status", "path": "bad_path",
                  "user_agent": "bad_user_agent", "client_ip": "bad_client_ip", "method": "bad_method"}


def usable(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` when the web-log features can use each of its fields, else LogParseError with the field's
    reason. Why at ingestion: such a line (a negative size, a latency of 1e400 read as infinity, a
    200,000-character path, an empty client address) was published and then dead-lettered by every
    stream worker; refused here, it is one dead letter where it was read, with its line number. Any
    three-digit status is kept (000 and 999 are in real logs): the features refuse those themselves."""
    try:
        request_fields(record, any_status=True)
    except FeatureValidationError as exc:
        field = str(exc).split(":", 1)[0].rsplit(".", 1)[-1]
        raise LogParseError(f"{exc}; the web-log features cannot use it", _FIELD_REASONS.get(field, "bad_field")) \
            from exc
    return record


def check_time(record: dict[str, Any], policy: EventTimePolicy | None, now: int | None = None) -> dict[str, Any]:
    """Apply the event-time window to a parsed event (LogParseError with the policy's reason)."""
    if policy is not None:
        try:
            policy.check(record["timestamp"], now)
        except EventTimeError as exc:
            raise LogParseError(str(exc), exc.reason) from exc
    return record


def format_combined(record: dict[str, Any], *, with_latency: bool = True) -> str:
    """Render a WebLogEvent dict as a combined log line (inverse of :func:`parse_combined`).

    Used by the demo traffic generator to write realistic access.log files for the tailer.
    """
    ts = datetime.fromtimestamp(record["timestamp"] / 1000.0, tz=UTC)
    when = f"{ts.day:02d}/{_MONTH_NAMES[ts.month - 1]}/{ts.year}:{ts:%H:%M:%S} +0000"
    request = f"{record['method']} {record['path']}" + (f" {record['protocol']}" if record.get("protocol") else "")

    def q(v: str | None) -> str:
        return "-" if v is None else v.replace("\\", "\\\\").replace('"', '\\"')

    line = (
        f"{record['client_ip']} {record.get('ident') or '-'} {record.get('user') or '-'} [{when}] "
        f'"{q(request)}" {record["status"]} {record.get("bytes_sent") or "-"} '
        f'"{q(record.get("referrer"))}" "{q(record.get("user_agent"))}"'
    )
    if with_latency and record.get("latency_ms") is not None:
        line += f" {int(round(record['latency_ms'] * 1000))}"
    return line
